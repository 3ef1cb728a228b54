"""Run one job: read it from stdin, run the workflow, write one result to its own pipe.

See PROTOCOL.md beside this file for the contract with the daemon. Like
the whole `sandbox` package it imports only the standard library: it runs
inside every workflow's environment, which holds only that workflow's
packages (README, "Packages, variables and files").
"""

import contextlib
import inspect
import io
import linecache
import os
import sys
import time
import traceback
import types
from typing import Any

from sandbox import limits, protocol, rules, seccomp
from sandbox.request import RequestDict

ARGUMENTS = {"catch": ("_request", "settings"), "pull": ("settings",)}

# Deployed versions the zygote compiled before forking (`remember`), inherited
# by the children it forks afterwards: name -> (version, source, code).
COMPILED: dict[str, tuple[int, str, types.CodeType]] = {}


class WorkflowError(Exception):
    """The workflow's code cannot run: it does not compile or has no usable `workflow`."""


def main() -> int:
    """Cold-spawn entry: read the job from stdin, run it, report."""
    try:
        job = read_job()
    except Exception:
        traceback.print_exc()
        return protocol.EXIT_BOOT_FAILED
    return execute(job)


def read_job() -> dict[str, Any]:
    """The job the daemon wrote on stdin (fd 0), read to EOF."""
    job: dict[str, Any] = protocol.loads(sys.stdin.buffer.read())
    return job


def execute(job: dict[str, Any]) -> int:
    """Apply the job's limits, run or check it, report. Exit 70 only when it cannot start.

    Shared by both ways an execution starts: a fresh interpreter
    (`python -I -m sandbox`) and a child forked by the zygote.
    """
    try:
        limits.apply(job["limits"])
        os.environ.update(job.get("env") or {})
        if job.get("forbid_namespaces"):
            seccomp.forbid_namespaces()
    except Exception:
        traceback.print_exc()
        return protocol.EXIT_BOOT_FAILED
    # Asked by a daemon that times its stages: CLOCK_MONOTONIC, one clock host-wide.
    stamps = {"isolated": time.monotonic()} if job.get("trace") else None
    # Line buffering keeps the output of a workflow killed at its timeout.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    result = check(job) if job["mode"] == "check" else run(job, stamps)
    if stamps is not None:
        result["stages"] = stamps
    report(result, job["result_fd"])
    # os._exit skips joining threads the workflow left running: the execution
    # is over once its result is written.
    os._exit(0)


def load(job: dict[str, Any]) -> types.ModuleType:
    """Compile and execute the workflow file as one module, like a script.

    The file is registered in linecache so tracebacks show its source lines.
    """
    filename = f"{job['name']}.py"
    code = job["code"]
    cached = COMPILED.get(job["name"])
    try:
        if cached is not None and cached[:2] == (job["version"], code):
            compiled = cached[2]
        else:
            compiled = compile(code, filename, "exec")
    except SyntaxError as exc:
        # One line, as the compiler names it: file, line, column and message.
        raise WorkflowError(f'File "{exc.filename}", line {exc.lineno}, column {exc.offset}: '
                            f"{type(exc).__name__}: {exc.msg}") from None
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    module = types.ModuleType("workflow")
    module.__file__ = filename
    sys.modules["workflow"] = module
    exec(compiled, module.__dict__)
    return module


def remember(name: str, version: int, code: str) -> None:
    """Compile a deployed version in the zygote, once, for the children it forks next.

    A version that does not compile here is simply not remembered: its
    executions compile it themselves and report the error.
    """
    try:
        COMPILED[name] = (version, code, compile(code, f"{name}.py", "exec"))
    except Exception:
        COMPILED.pop(name, None)


def entry_point(module: types.ModuleType, kind: str) -> Any:
    """The module's `workflow`, checked to accept the arguments of its kind."""
    function = getattr(module, "workflow", None)
    names = ARGUMENTS[kind]
    expected = f"workflow({', '.join(names)})"
    if not callable(function):
        raise WorkflowError(f"the file defines no callable `workflow`; a {kind} workflow "
                            f"needs {expected}")
    try:
        if not _takes_positional(function, len(names)):
            raise TypeError
    except TypeError:
        raise WorkflowError(f"`workflow` must accept {len(names)} positional argument(s) "
                            f"for a {kind} workflow: {expected}") from None
    except ValueError:
        pass  # builtins without a signature: let the call decide
    return function


def _takes_positional(function: Any, count: int) -> bool:
    """Whether `function` can be called with `count` positional arguments and no others.

    A plain function answers from its code object, a few attribute reads:
    `inspect.signature` costs about half a millisecond in a freshly forked
    child. Anything else (a class, a partial, a decorated function with
    `__wrapped__` or `__signature__`) is asked the way inspect sees it;
    that raises TypeError for a mismatch, ValueError without a signature.
    """
    if (type(function) is not types.FunctionType or hasattr(function, "__wrapped__")
            or hasattr(function, "__signature__")):
        inspect.signature(function).bind(*(None,) * count)
        return True
    code = function.__code__
    required = code.co_argcount - len(function.__defaults__ or ())
    keyword_only = code.co_varnames[code.co_argcount:code.co_argcount + code.co_kwonlyargcount]
    if any(name not in (function.__kwdefaults__ or {}) for name in keyword_only):
        return False
    return required <= count and (count <= code.co_argcount
                                  or bool(code.co_flags & inspect.CO_VARARGS))


def check(job: dict[str, Any]) -> dict[str, Any]:
    """Deploy-time validation: compile, import and inspect, without calling."""
    try:
        entry_point(load(job), job["kind"])
    except WorkflowError as exc:
        return {"outcome": "error", "error": str(exc), "traceback": ""}
    except BaseException as exc:
        return failure("error", exc, prefix="importing the file failed: ")
    return {"outcome": "success"}


def run(job: dict[str, Any], stamps: dict[str, float] | None = None) -> dict[str, Any]:
    """Call the workflow and turn what it did into a result (stamping its stages in `stamps`)."""
    given = job["settings"]
    settings = protocol.loads(protocol.dumps(given))  # the workflow's own copy
    try:
        function = entry_point(load(job), job["kind"])
        if stamps is not None:
            stamps["compiled"] = time.monotonic()
        if job["kind"] == "catch":
            value = function(RequestDict(job["request"]), settings)
        else:
            value = function(settings)
        if stamps is not None:
            stamps["returned"] = time.monotonic()
        caps = job["limits"]
        response = rules.response(value, caps["response_bytes"])
        change = rules.settings_change(given, settings, caps["json_depth"])
    except (WorkflowError, rules.RuleError) as exc:
        return {"outcome": "error", "error": str(exc), "traceback": ""}
    except MemoryError as exc:
        return failure("memory", exc)
    except BaseException as exc:
        return failure("error", exc)
    return {"outcome": "success", "response": response, "settings": change}


def failure(outcome: str, exc: BaseException, prefix: str = "") -> dict[str, Any]:
    """A failed result with a one-line error and the traceback for the log."""
    message = "".join(traceback.format_exception_only(exc)).strip().splitlines()
    return {
        "outcome": outcome,
        "error": prefix + (message[-1] if message else type(exc).__name__),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def report(result: dict[str, Any], fd: int) -> None:
    """Flush the workflow's output, then write the result on its own channel."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # the workflow may have closed it
            stream.flush()
    try:
        data = protocol.dumps(result)
    except protocol.CodecError as exc:  # a response body that is not valid UTF-8, say
        data = protocol.dumps({"outcome": "error", "traceback": "",
                            "error": f"the result cannot be sent to the daemon: {exc}"})
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.close(fd)
