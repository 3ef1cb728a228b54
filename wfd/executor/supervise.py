"""Supervising one execution and judging how it ended.

`supervise` feeds the job, drains the pipes, enforces the timeout and kills
what is left; `_judge` turns the child's exit and result into an Outcome.
Both executors end every execution here.
"""

import asyncio
import contextlib
import re
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

from sandbox import protocol
from sandbox.protocol import EXIT_JOIN_FAILED
from wfd import stages
from wfd.config import MIB
from wfd.domain import SettingsChange, Status, WorkflowResponse
from wfd.executor.base import ChildLost, Job, Outcome
from wfd.executor.pipes import Captured, Pipes, drain, drain_now, feed
from wfd.isolation.cgroups import ExecutionCgroup

# How long to keep reading a child's pipes after it exited: a process that
# escaped its group (and so the kill) may still hold them open.
DRAIN_AFTER_EXIT_S = 1.0


# Beyond the response and the settings, a result carries little; this bounds
# what a hostile child can make the daemon buffer.
RESULT_OVERHEAD_BYTES = 1 * MIB

# What a response must be to be sent (SPEC 8): a final status, header names
# that are RFC 9110 tokens, values without control characters but HTAB.
FINAL_STATUS_MIN, FINAL_STATUS_MAX = 200, 599
HEADER_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
HEADER_VALUE_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
SHOWN_CHARS = 60


async def supervise(job: Job, payload: list[bytes], pipes: Pipes, started: float,
                    ended: "asyncio.Future[int]", kill: Callable[[], None], *,
                    cgroup: ExecutionCgroup | None = None,
                    signal_exits: bool = False,
                    answer: Callable[[Outcome], None] | None = None) -> Outcome:
    """Feed the job, drain output and result, enforce the timeout, judge.

    `ended` gives the child's return code (negative for a signal) or raises
    ChildLost; `kill` ends the child's whole process group, and `cgroup`, when
    there is one, everything else it started. `signal_exits`: the child is
    bwrap, which reports a signal death as exit 128 + N. The child's ends of
    `pipes` must be closed already; the caller's `with Pipes()` closes ours.

    `answer`, when given, is called with the Outcome as soon as a complete
    success result has arrived (`_answer_early`), before the kill and the
    wait for the exit; this still returns only once everything is killed.
    """
    stages.stamp("handed")
    output = Captured(job.limits.output_kb * 1024)
    result = Captured(job.response_bytes + job.limits.settings_kb * 1024
                       + RESULT_OVERHEAD_BYTES)
    readers = [asyncio.create_task(drain(pipes.output_r, output)),
               asyncio.create_task(drain(pipes.result_r, result))]
    feeder = asyncio.create_task(feed(pipes, payload))
    timed_out, lost, returncode = False, None, None
    try:
        timed_out = not await _reported_or_ended(ended, readers[1], result,
                                                 job.limits.timeout_s)
        stages.stamp("result")
        if ended.done():
            returncode = ended.result()
        # The exit may be seen before the result's EOF: then read what is left.
        complete = readers[1].done() or (ended.done() and drain_now(pipes.result_r, result))
        if answer is not None and not timed_out and complete:
            early = _answer_early(job, result, output, pipes.output_r, started)
            if early is not None:
                answer(early)
    except ChildLost as exc:
        lost = str(exc)
    finally:
        # Whatever happened, nothing the execution started outlives it.
        kill()
        if result.data and not timed_out:
            # Its exit no longer delays the answer; waiting for it here means
            # the cgroup kill below finds its group empty (an execution's
            # namespace dies with its PID 1) instead of chasing exiting pids.
            await asyncio.wait({ended}, timeout=DRAIN_AFTER_EXIT_S)
        else:
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
        outcome = Outcome(Status.ERROR, duration_ms, error=lost)
    else:
        how = _Ended(_signal_of(returncode, signal_exits), returncode, timed_out,
                     cgroup is not None and cgroup.memory_oom(),
                     cgroup is not None and returncode == EXIT_JOIN_FAILED)
        outcome = _judge(job, how, result, duration_ms)
    return _with_output(outcome, output, job)


def _answer_early(job: Job, result: Captured, output: Captured, output_r: int,
                  started: float) -> Outcome | None:
    """The Outcome of a complete success result, or None to judge after the exit.

    The result pipe is at EOF: the workflow's process wrote its result and
    closed it (sandbox/runner.py `report`), after flushing its output. What
    it wrote before is in the output pipe already, so reading that pipe
    until it would block gives the record every byte written before the
    result; anything written after it (by processes the workflow left
    running, about to be killed) is not the execution's.

    Only a success is answered early: it stands whatever happens next (an
    OOM kill while the execution is being killed changes nothing, as in
    `_judge`), while a failure may still turn into `memory` once the
    cgroup's OOM verdict is final, so it waits for the exit like before.
    """
    if not result.data or result.truncated:
        return None
    outcome = _judge(job, _Ended(None, None, False, False, False), result,
                     (time.perf_counter() - started) * 1000)
    if outcome.status != Status.SUCCESS:
        return None
    drain_now(output_r, output)
    return _with_output(outcome, output, job)


def _with_output(outcome: Outcome, output: Captured, job: Job) -> Outcome:
    """The Outcome with the captured output, noting where a cap cut it."""
    outcome.output = output.data.decode("utf-8", "replace")
    outcome.output_truncated = output.truncated
    if output.truncated:
        outcome.output += f"\n[wfd: output cut here, over the {job.limits.output_kb} KiB limit]"
    return outcome


async def _reported_or_ended(ended: "asyncio.Future[int]", result_reader: "asyncio.Task[None]",
                             result: "Captured", timeout_s: float) -> bool:
    """Wait until the child ends or its result is complete; False at the timeout.

    A complete result ends the execution: the child writes it last, after
    flushing its output, so there is nothing left to wait for but the exit
    (and, for a forked child, its reaping), which would only add latency.
    What it left running is killed by the caller either way.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    waiting: set[asyncio.Future[Any]] = {ended, result_reader}
    while True:
        done, _ = await asyncio.wait(waiting, timeout=max(0.0, deadline - loop.time()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if not done:
            return False
        if ended in done or result.data:
            return True
        waiting.discard(result_reader)  # closed without a result: wait for the exit


async def answered_early(
        execution: Callable[[Callable[[Outcome], None]], Coroutine[Any, Any, Outcome]]
) -> Outcome:
    """Run `execution(answer)` as a task; its early answer, or its Outcome if none came.

    An early answer carries the task as its `cleanup`, so the caller can
    respond while the execution is still being killed and reaped. Cancelled
    (the daemon interrupting it at shutdown), it cancels the task and waits
    for it: every process is killed before the cancellation goes on.
    """
    early: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

    def answer(outcome: Outcome) -> None:
        if not early.done():
            early.set_result(outcome)

    task: asyncio.Task[Outcome] = asyncio.create_task(execution(answer))
    try:
        await asyncio.wait({early, task}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    if not early.done():
        return task.result()
    outcome = early.result()
    outcome.cleanup = task
    return outcome


def _consume(future: "asyncio.Future[int]") -> None:
    """Retrieve an exit nobody waited for, so asyncio does not warn about it."""
    if not future.cancelled():
        future.exception()


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
    base = protocol.SIGNAL_EXIT_BASE
    if signal_exits and base < returncode < base + signal.NSIG:
        return returncode - base
    return None


def _judge(job: Job, ended: _Ended, result: Captured, duration_ms: float) -> Outcome:
    """Turn a child's exit and its result (if any) into an Outcome.

    A kernel OOM kill in the execution's cgroup decides `memory` over
    anything but a success: a workflow that failed because one of its
    processes was OOM-killed ran out of memory, whatever it said about it.
    """
    limits = job.limits
    if ended.timed_out:
        return Outcome(Status.TIMEOUT, duration_ms, error=f"timed out after {limits.timeout_s:g} s")
    if result.truncated:
        return Outcome(Status.ERROR, duration_ms, error="the result was too large")
    oom = (f"the memory limit of {limits.memory_mb} MiB was reached: the kernel killed "
           "a process of the execution")
    if result.data:
        outcome = _parse_result(result.data, duration_ms, job.json_depth)
        if ended.oom_killed and outcome.status != Status.SUCCESS:
            outcome.status, outcome.error = Status.MEMORY, f"{oom}; then: {outcome.error}"
        return outcome
    if ended.oom_killed:
        return Outcome(Status.MEMORY, duration_ms, error=oom)
    if ended.signal in (signal.SIGXCPU, signal.SIGKILL):
        return Outcome(Status.CPU, duration_ms,
                       error=f"CPU time limit of {limits.cpu_s} s exceeded")
    if ended.signal is not None:
        name = signal.Signals(ended.signal).name
        return Outcome(Status.ERROR, duration_ms, error=f"the process was killed by {name}")
    if ended.join_failed:
        return Outcome(Status.ERROR, duration_ms, error="boot failed: the process could not "
                       f"join its cgroup (exit {EXIT_JOIN_FAILED})")
    return Outcome(Status.ERROR, duration_ms, error=f"the process exited with code "
                   f"{ended.returncode} without reporting a result")


class _Malformed(Exception):
    """The child's result breaks the protocol; the message says how."""


def _parse_result(data: bytes, duration_ms: float, json_depth: int) -> Outcome:
    """Read the child's result, trusting nothing about its shape.

    A workflow can write to its own result pipe, so anything here may be
    forged: whatever is wrong fails the execution with a message naming it.
    The child checks a workflow's return value too, but what reaches the
    caller is checked here.
    """
    try:
        try:
            result = protocol.loads(data)
        except protocol.CodecError as exc:
            raise _Malformed(f"not JSON ({exc})") from None
        if not isinstance(result, dict):
            raise _Malformed("not a JSON object")
        outcome = result.get("outcome")
        stages.child(result.get("stages"))
        if outcome == Status.SUCCESS:
            response = result.get("response")
            change = _settings_change(result.get("settings"), json_depth)
            problem = response_problem(response)
            if problem is not None:
                return Outcome(Status.ERROR, duration_ms, error=f"invalid response: {problem}")
            return Outcome(Status.SUCCESS, duration_ms,
                           response=cast("WorkflowResponse | None", response),
                           settings_change=change)
        if outcome in (Status.ERROR, Status.MEMORY):
            return Outcome(Status(outcome), duration_ms, error=str(result.get("error")),
                           traceback=str(result.get("traceback") or ""))
        raise _Malformed(f"unknown outcome {str(outcome)[:40]!r}")
    except _Malformed as exc:
        return Outcome(Status.ERROR, duration_ms,
                       error=f"the process reported a malformed result: {exc}")


def _settings_change(change: Any, json_depth: int) -> SettingsChange:
    if change is None:
        return {"set": {}, "unset": []}
    if not (isinstance(change, dict) and isinstance(change.get("set"), dict)
            and isinstance(change.get("unset"), list)):
        raise _Malformed("the settings change is not {set: object, unset: list}")
    if not all(isinstance(key, str) for key in change["unset"]):
        raise _Malformed("the settings change unsets a key that is not a string")
    if protocol.depth(change["set"], json_depth) > json_depth:
        raise _Malformed(f"settings nested deeper than {json_depth} levels")
    return {"set": change["set"], "unset": change["unset"]}


def response_problem(response: Any) -> str | None:
    """The rule a reported response breaks (SPEC 8), or None if it can be sent as is.

    HTTP/1.1 cannot carry a status outside 200-599 as a final answer (1xx are
    interim), a header name that is not a token, or a value with a control
    character: aiohttp would send nothing usable, or a response split in two.
    """
    if response is None:
        return None
    if not isinstance(response, dict):
        return f"the response must be a dict, got {type(response).__name__}"
    status = response.get("status_code")
    if type(status) is not int:
        return f"status_code must be an int, got {type(status).__name__}"
    if not FINAL_STATUS_MIN <= status <= FINAL_STATUS_MAX:
        return (f"status_code must be between {FINAL_STATUS_MIN} and {FINAL_STATUS_MAX}, "
                f"got {status}")
    if not isinstance(response.get("body"), str):
        return f"body must be a str, got {type(response.get('body')).__name__}"
    headers = response.get("headers")
    if not isinstance(headers, dict):
        return f"headers must be a dict, got {type(headers).__name__}"
    for name, value in headers.items():
        if not (isinstance(name, str) and isinstance(value, str)):
            return "headers must map str to str"
        if not HEADER_TOKEN.fullmatch(name):
            return f"header name {_shown(name)} is not an RFC 9110 token"
        if HEADER_VALUE_CONTROL.search(value):
            return (f"header {_shown(name)} has a control character in its value "
                    "(only HTAB is allowed)")
    return None


def _shown(text: str) -> str:
    """A workflow's string in an error message: quoted, escaped and short."""
    return repr(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "...")
