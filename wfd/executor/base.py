"""Runs one execution in a fresh child process and reports how it ended.

The child side is the `sandbox` package; sandbox/PROTOCOL.md is the contract.
`Executor` is the one interface the rest of the daemon uses, so the way a
child is started (a fresh interpreter today) can change without touching
HTTP, the control socket or the scheduler.
"""

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from wfd.config import MIB, Limits
from wfd.isolation.cgroups import JOIN_FAILED_EXIT, ExecutionCgroup
from wfd.isolation.layers import Isolation

# How long to keep reading a child's pipes after it exited: a process that
# escaped its group (and so the kill) may still hold them open.
DRAIN_AFTER_EXIT_S = 1.0
# Beyond the response and the settings, a result carries little; this bounds
# what a hostile child can make the daemon buffer.
RESULT_OVERHEAD_BYTES = 1 * MIB
CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Job:
    """What one child is asked to do: run (or, at deploy, check) a workflow."""

    execution_id: str
    name: str
    kind: str
    version: int
    code: str
    limits: Limits
    settings: dict[str, Any] = field(default_factory=dict)
    request: dict[str, Any] | None = None
    mode: str = "run"
    response_bytes: int = 10 * MIB

    def payload(self, result_fd: int, rlimit_nproc: bool = True) -> bytes:
        """The JSON document the child reads on stdin.

        Without `rlimit_nproc` the child leaves RLIMIT_NPROC alone: a pids
        cgroup bounds the execution instead, and RLIMIT_NPROC would count
        every execution's processes together (they share one sandbox uid).
        """
        limits = self.limits
        job: dict[str, Any] = {
            "protocol": 1,
            "mode": self.mode,
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "code": self.code,
            "settings": self.settings,
            "result_fd": result_fd,
            "limits": {
                "memory_bytes": limits.memory_mb * MIB,
                "cpu_s": int(limits.cpu_s),
                "processes": limits.processes if rlimit_nproc else None,
                "open_files": limits.open_files,
                "file_size_bytes": limits.file_size_mb * MIB,
                "tmp_bytes": limits.tmp_mb * MIB,
                "settings_bytes": limits.settings_kb * 1024,
                "response_bytes": self.response_bytes,
            },
        }
        if self.request is not None:
            job["request"] = self.request
        return orjson.dumps(job)


@dataclass
class Outcome:
    """How an execution ended, in the daemon's terms (SPEC 5 statuses)."""

    status: str
    duration_ms: float
    response: dict[str, Any] | None = None
    settings_change: dict[str, Any] | None = None
    error: str | None = None
    traceback: str | None = None
    output: str = ""
    output_truncated: bool = False


class Executor(Protocol):
    """Anything that can run a job in isolation and say how it ended.

    `run` may be cancelled (the daemon interrupts executions still running
    at the end of its shutdown grace period): before re-raising the
    CancelledError it must have killed every process the job started.
    """

    async def start(self) -> None: ...

    async def run(self, job: Job) -> Outcome: ...

    def status(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class ChildLost(Exception):
    """The child's end is unknown: whatever started it is gone. The message says why."""


@dataclass
class _Captured:
    """The first `cap` bytes of a stream, and whether more came after them."""

    cap: int
    chunks: list[bytes] = field(default_factory=list)
    kept: int = 0
    truncated: bool = False

    def add(self, chunk: bytes) -> None:
        room = self.cap - self.kept
        if room > 0:
            self.chunks.append(chunk[:room])
            self.kept += len(self.chunks[-1])
        if len(chunk) > room:
            self.truncated = True

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class Pipes:
    """One execution's three pipes, made by the daemon whichever way the child starts.

    The child gets the job's reading end, the output's and the result's
    writing ends (`theirs`); the daemon keeps the other three, so draining,
    capping and judging are the same code for every executor.
    """

    def __init__(self) -> None:
        self.job_r, self.job_w = os.pipe()
        self.output_r, self.output_w = os.pipe()
        self.result_r, self.result_w = os.pipe()

    def theirs(self) -> list[int]:
        return [self.job_r, self.output_w, self.result_w]

    def close_theirs(self) -> None:
        """Once the child holds its ends: EOF on ours then means it is done."""
        for fd in self.theirs():
            os.close(fd)

    def close_ours(self) -> None:
        for fd in (self.job_w, self.output_r, self.result_r):
            os.close(fd)


async def supervise(job: Job, payload: bytes, pipes: Pipes, started: float,
                    ended: "asyncio.Future[int]", kill: Callable[[], None], *,
                    cgroup: ExecutionCgroup | None = None,
                    signal_exits: bool = False) -> Outcome:
    """Feed the job, drain output and result, enforce the timeout, judge.

    `ended` gives the child's return code (negative for a signal) or raises
    ChildLost; `kill` ends the child's whole process group, and `cgroup`, when
    there is one, everything else it started. `signal_exits`: the child is
    bwrap, which reports a signal death as exit 128 + N. The child's ends of
    `pipes` must be closed already; this closes ours.
    """
    output = _Captured(job.limits.output_kb * 1024)
    result = _Captured(job.response_bytes + job.limits.settings_kb * 1024
                       + RESULT_OVERHEAD_BYTES)
    readers = [asyncio.create_task(_drain_fd(pipes.output_r, output)),
               asyncio.create_task(_drain_fd(pipes.result_r, result))]
    feeder = asyncio.create_task(_feed(pipes.job_w, payload))
    timed_out, lost, returncode = False, None, None
    try:
        timed_out = not await _reported_or_ended(ended, readers[1], result,
                                                 job.limits.timeout_s)
        if ended.done():
            returncode = ended.result()
    except ChildLost as exc:
        lost = str(exc)
    finally:
        # Whatever happened, nothing the execution started outlives it.
        kill()
        if not (result.data and not timed_out):
            with contextlib.suppress(ChildLost):
                returncode = await ended
        ended.add_done_callback(_consume)
        if cgroup is not None:
            await asyncio.to_thread(cgroup.kill)
        await asyncio.wait(readers, timeout=DRAIN_AFTER_EXIT_S)
        for task in [*readers, feeder]:
            task.cancel()
        await asyncio.gather(*readers, feeder, return_exceptions=True)
    duration_ms = (time.perf_counter() - started) * 1000
    if lost is not None:
        outcome = Outcome("error", duration_ms, error=lost)
    else:
        how = _Ended(_signal_of(returncode, signal_exits), returncode, timed_out,
                     cgroup is not None and cgroup.memory_oom(),
                     cgroup is not None and returncode == JOIN_FAILED_EXIT)
        outcome = _judge(job, how, result, duration_ms)
    outcome.output = output.data.decode("utf-8", "replace")
    outcome.output_truncated = output.truncated
    if output.truncated:
        outcome.output += f"\n[wfd: output cut here, over the {job.limits.output_kb} KiB limit]"
    return outcome


async def _reported_or_ended(ended: "asyncio.Future[int]", result_reader: asyncio.Task,
                             result: "_Captured", timeout_s: float) -> bool:
    """Wait until the child ends or its result is complete; False at the timeout.

    A complete result ends the execution: the child writes it last, after
    flushing its output, so there is nothing left to wait for but the exit
    (and, for a forked child, its reaping), which would only add latency.
    What it left running is killed by the caller either way.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    waiting: set[asyncio.Future] = {ended, result_reader}
    while True:
        done, _ = await asyncio.wait(waiting, timeout=max(0.0, deadline - loop.time()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if not done:
            return False
        if ended in done or result.data:
            return True
        waiting.discard(result_reader)  # closed without a result: wait for the exit


def _consume(future: "asyncio.Future[int]") -> None:
    """Retrieve an exit nobody waited for, so asyncio does not warn about it."""
    if not future.cancelled():
        future.exception()


async def _feed(fd: int, data: bytes) -> None:
    """Write the job to the child's stdin and close it, never blocking the loop."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    try:
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                await _ready(fd, asyncio.get_running_loop().add_writer,
                             asyncio.get_running_loop().remove_writer)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the child died before reading its job; its exit says why
    finally:
        os.close(fd)


async def _drain_fd(fd: int, into: _Captured) -> None:
    """Read a raw pipe to EOF through the loop, then close it (exactly once).

    A plain add_reader loop rather than connect_read_pipe: under uvloop the
    transport closes the fd itself while the file object wrapping it would
    close the same number again later, possibly someone else's by then.
    """
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                await _ready(fd, loop.add_reader, loop.remove_reader)
                continue
            if not chunk:
                return
            into.add(chunk)
    finally:
        os.close(fd)


async def _ready(fd: int, watch: Callable[..., Any], unwatch: Callable[[int], Any]) -> None:
    """Wait until the loop reports `fd` ready (for reading or writing, by `watch`)."""
    ready = asyncio.get_running_loop().create_future()
    watch(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        unwatch(fd)


def _kill_group(pid: int) -> None:
    """SIGKILL the child's whole process group (it leads its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@dataclass
class _Launch:
    """How one child is started, and the cgroup (if any) that holds everything it forks."""

    argv: list[str]
    cwd: str
    env: dict[str, str]
    cgroup: ExecutionCgroup | None = None
    # bwrap reports a signal death of the sandboxed process as exit 128 + signal.
    signal_exits: bool = False


class SpawnExecutor:
    """Starts a fresh `python -I -m sandbox` for every execution.

    Simple and fully isolated, at the price of an interpreter start-up per
    execution (100-300 ms). The layers around it (bwrap, a cgroup) come from
    `isolation`; under bwrap the working directory is the sandbox's own tmpfs,
    so nothing is created or removed on the host. The zygote executor falls
    back to it while its zygote is down, and the tests run against both.
    """

    def __init__(self, isolation: Isolation | None = None, tmp_root: Path | None = None) -> None:
        self.isolation = isolation or Isolation("none", sys.executable, None, None)
        self.tmp_root = tmp_root
        self.running = 0

    async def start(self) -> None:
        """Nothing to start: every execution brings its own interpreter."""

    async def close(self) -> None:
        """Nothing to stop: executions end with their requests."""

    def status(self) -> dict[str, Any]:
        return {"executor": "spawn"}

    async def run(self, job: Job) -> Outcome:
        self.running += 1
        try:
            if self.isolation.sandboxed:
                return await self._run_with_cgroup(job, "/", {"PATH": CHILD_PATH}, True)
            workdir = tempfile.mkdtemp(prefix=f"wfd-{job.execution_id}-", dir=self.tmp_root)
            try:
                env = {"PATH": CHILD_PATH, "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
                return await self._run_with_cgroup(job, workdir, env, False)
            finally:
                await asyncio.to_thread(shutil.rmtree, workdir, True)
        finally:
            self.running -= 1

    async def _run_with_cgroup(self, job: Job, cwd: str, env: dict[str, str],
                               sandboxed: bool) -> Outcome:
        """Make the execution's cgroup, run the child in it, and always remove it."""
        cgroup = await asyncio.to_thread(self.isolation.cgroup_for, job.limits,
                                         job.execution_id)
        try:
            argv = self.isolation.argv(job.limits, cgroup)
            return await self._spawn(job, _Launch(argv, cwd, env, cgroup, sandboxed))
        finally:
            if cgroup is not None:
                await asyncio.to_thread(cgroup.close)

    async def _spawn(self, job: Job, launch: "_Launch") -> Outcome:
        pipes = Pipes()
        started = time.perf_counter()
        try:
            process = await asyncio.create_subprocess_exec(
                *launch.argv,
                stdin=pipes.job_r, stdout=pipes.output_w, stderr=pipes.output_w,
                pass_fds=(pipes.result_w,),
                start_new_session=True,
                cwd=launch.cwd,
                env=launch.env,
            )
        except BaseException:
            pipes.close_ours()
            raise
        finally:
            pipes.close_theirs()
        ended = asyncio.ensure_future(process.wait())
        payload = job.payload(pipes.result_w, rlimit_nproc=launch.cgroup is None)
        return await supervise(job, payload, pipes, started, ended,
                               lambda: _kill_group(process.pid), cgroup=launch.cgroup,
                               signal_exits=launch.signal_exits)


@dataclass(frozen=True)
class _Ended:
    """How the child ended, as far as the daemon can tell without its result."""

    signal: int | None
    returncode: int | None
    timed_out: bool
    oom_killed: bool
    join_failed: bool


def _signal_of(returncode: int | None, signal_exits: bool) -> int | None:
    """The signal that killed the workflow's process, if one did.

    Under bwrap the daemon's child is bwrap, which exits 128 + N when the
    sandboxed process dies of signal N (a workflow calling os._exit(137)
    therefore looks like SIGKILL: it can only mislabel its own execution).
    """
    if returncode is None:
        return None
    if returncode < 0:
        return -returncode
    if signal_exits and 128 < returncode < 128 + signal.NSIG:
        return returncode - 128
    return None


def _judge(job: Job, ended: _Ended, result: _Captured, duration_ms: float) -> Outcome:
    """Turn a child's exit and its result (if any) into an Outcome.

    A kernel OOM kill in the execution's cgroup decides `memory` over
    anything but a success: a workflow that failed because one of its
    processes was OOM-killed ran out of memory, whatever it said about it.
    """
    limits = job.limits
    if ended.timed_out:
        return Outcome("timeout", duration_ms, error=f"timed out after {limits.timeout_s:g} s")
    if result.truncated:
        return Outcome("error", duration_ms, error="the result was too large")
    oom = (f"the memory limit of {limits.memory_mb} MiB was reached: the kernel killed "
           "a process of the execution")
    if result.data:
        outcome = _parse_result(result.data, duration_ms)
        if ended.oom_killed and outcome.status != "success":
            outcome.status, outcome.error = "memory", f"{oom}; then: {outcome.error}"
        return outcome
    if ended.oom_killed:
        return Outcome("memory", duration_ms, error=oom)
    if ended.signal in (signal.SIGXCPU, signal.SIGKILL):
        return Outcome("cpu", duration_ms, error=f"CPU time limit of {limits.cpu_s} s exceeded")
    if ended.signal is not None:
        name = signal.Signals(ended.signal).name
        return Outcome("error", duration_ms, error=f"the process was killed by {name}")
    if ended.join_failed:
        return Outcome("error", duration_ms, error="boot failed: the process could not "
                       f"join its cgroup (exit {JOIN_FAILED_EXIT})")
    return Outcome("error", duration_ms, error=f"the process exited with code "
                   f"{ended.returncode} without reporting a result")


def _parse_result(data: bytes, duration_ms: float) -> Outcome:
    """Read the child's result, trusting nothing about its shape."""
    try:
        result = orjson.loads(data)
        outcome = result["outcome"]
        if outcome == "success":
            response = result.get("response")
            change = result.get("settings") or {"set": {}, "unset": []}
            if not (_valid_response(response) and isinstance(change.get("set"), dict)
                    and isinstance(change.get("unset"), list)):
                raise ValueError
            return Outcome("success", duration_ms, response=response, settings_change=change)
        if outcome in ("error", "memory"):
            return Outcome(outcome, duration_ms, error=str(result.get("error")),
                           traceback=str(result.get("traceback") or ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return Outcome("error", duration_ms, error="the process reported a malformed result")


def _valid_response(response: Any) -> bool:
    if response is None:
        return True
    return (isinstance(response, dict)
            and type(response.get("status_code")) is int
            and 100 <= response["status_code"] <= 599
            and isinstance(response.get("body"), str)
            and isinstance(response.get("headers"), dict)
            and all(isinstance(k, str) and isinstance(v, str)
                    for k, v in response["headers"].items()))
