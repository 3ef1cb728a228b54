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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from wfd.config import MIB, Limits

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

    def payload(self, result_fd: int) -> bytes:
        """The JSON document the child reads on stdin."""
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
                "processes": limits.processes,
                "open_files": limits.open_files,
                "file_size_bytes": limits.file_size_mb * MIB,
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

    async def run(self, job: Job) -> Outcome: ...


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


async def _drain(reader: asyncio.StreamReader, into: _Captured) -> None:
    """Read to EOF, keeping what fits, so a chatty child never blocks."""
    while chunk := await reader.read(65536):
        into.add(chunk)


async def _drain_fd(fd: int, into: _Captured) -> None:
    """Read a raw pipe to EOF through the loop, then close it (exactly once).

    A plain add_reader loop rather than connect_read_pipe: under uvloop the
    transport closes the fd itself while the file object wrapping it would
    close the same number again later, possibly someone else's by then.
    """
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    os.set_blocking(fd, False)
    loop.add_reader(fd, readable.set)
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                readable.clear()
                await readable.wait()
                continue
            if not chunk:
                return
            into.add(chunk)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _kill_group(pid: int) -> None:
    """SIGKILL the child's whole process group (it leads its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class SpawnExecutor:
    """Starts a fresh `python -I -m sandbox` for every execution.

    Simple and fully isolated, at the price of an interpreter start-up per
    execution.
    """

    def __init__(self, python: str = sys.executable, tmp_root: Path | None = None) -> None:
        self.python = python
        self.tmp_root = tmp_root
        self.running = 0

    async def run(self, job: Job) -> Outcome:
        workdir = tempfile.mkdtemp(prefix=f"wfd-{job.execution_id}-", dir=self.tmp_root)
        self.running += 1
        try:
            return await self._supervise(job, workdir)
        finally:
            self.running -= 1
            await asyncio.to_thread(shutil.rmtree, workdir, True)

    async def _supervise(self, job: Job, workdir: str) -> Outcome:
        result_r, result_w = os.pipe()
        started = time.perf_counter()
        try:
            process = await asyncio.create_subprocess_exec(
                self.python, "-I", "-m", "sandbox",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                pass_fds=(result_w,),
                start_new_session=True,
                cwd=workdir,
                env={"PATH": CHILD_PATH, "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir},
            )
        except BaseException:
            os.close(result_r)
            raise
        finally:
            os.close(result_w)
        output = _Captured(job.limits.output_kb * 1024)
        result = _Captured(job.response_bytes + job.limits.settings_kb * 1024
                           + RESULT_OVERHEAD_BYTES)
        readers = [asyncio.create_task(_drain(process.stdout, output)),
                   asyncio.create_task(_drain_fd(result_r, result))]
        timed_out = False
        try:
            # Inside the try: a cancellation while the job is being written
            # (a large body) must kill the child too.
            try:
                process.stdin.write(job.payload(result_w))
                await process.stdin.drain()
                process.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the child died before reading its job; its exit says why
            await asyncio.wait_for(process.wait(), job.limits.timeout_s)
        except TimeoutError:
            timed_out = True
        finally:
            # Whatever happened, nothing the execution started outlives it.
            _kill_group(process.pid)
            await process.wait()
            await asyncio.wait(readers, timeout=DRAIN_AFTER_EXIT_S)
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        duration_ms = (time.perf_counter() - started) * 1000
        outcome = _judge(job, process.returncode, result, timed_out, duration_ms)
        outcome.output = output.data.decode("utf-8", "replace")
        outcome.output_truncated = output.truncated
        if output.truncated:
            outcome.output += f"\n[wfd: output cut here, over the {job.limits.output_kb} KiB limit]"
        return outcome


def _judge(job: Job, returncode: int | None, result: _Captured, timed_out: bool,
           duration_ms: float) -> Outcome:
    """Turn a child's exit and its result (if any) into an Outcome."""
    if timed_out:
        return Outcome("timeout", duration_ms,
                       error=f"timed out after {job.limits.timeout_s:g} s")
    if result.truncated:
        return Outcome("error", duration_ms, error="the result was too large")
    if result.data:
        return _parse_result(result.data, duration_ms)
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return Outcome("cpu", duration_ms,
                       error=f"CPU time limit of {job.limits.cpu_s} s exceeded")
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name
        return Outcome("error", duration_ms, error=f"the process was killed by {name}")
    return Outcome("error", duration_ms,
                   error=f"the process exited with code {returncode} without reporting a result")


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
