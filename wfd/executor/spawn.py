"""The spawn executor: a fresh interpreter for every execution."""

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wfd.domain import Status
from wfd.executor.base import CHILD_PATH, Job, Outcome
from wfd.executor.pipes import Pipes
from wfd.executor.supervise import supervise
from wfd.isolation import network
from wfd.isolation.cgroups import ExecutionCgroup
from wfd.isolation.layers import Isolation


class _NoNetwork(Exception):
    """The execution's network namespace could not be set up; it never ran."""


@contextlib.asynccontextmanager
async def execution_cgroup(isolation: Isolation, job: Job
                           ) -> AsyncIterator[ExecutionCgroup | None]:
    """The execution's cgroup (None without one), removed on every way out.

    It is made in a thread; a cancellation while it is being made (the
    daemon interrupting executions at shutdown) still waits for it and
    removes it, rather than leaving a group nobody knows about.
    """
    making = asyncio.ensure_future(asyncio.to_thread(isolation.cgroup_for, job.limits,
                                                     job.execution_id))
    try:
        cgroup = await asyncio.shield(making)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            late = await making
            if late is not None:
                await asyncio.to_thread(late.close)
        raise
    try:
        yield cgroup
    finally:
        if cgroup is not None:
            await asyncio.to_thread(cgroup.close)


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
    # With the network layer: bwrap's info pipe and block pipe (ours, theirs).
    info: tuple[int, int] | None = None
    block: tuple[int, int] | None = None


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
        async with execution_cgroup(self.isolation, job) as cgroup:
            info = block = None
            try:
                net = None
                if sandboxed and self.isolation.network is not None:
                    info, block = os.pipe2(os.O_CLOEXEC), os.pipe2(os.O_CLOEXEC)
                    net = self.isolation.network.bwrap_options(info[1], block[0])
                try:
                    argv = self.isolation.argv(job.limits, cgroup, job.files, net)
                except BaseException:
                    for fd in (info[1], block[0]) if info and block else ():
                        os.close(fd)
                    raise
                # _spawn closes the child's ends of info and block; ours are closed here.
                return await self._spawn(job, _Launch(argv, cwd, env, cgroup, sandboxed,
                                                      info, block))
            finally:
                for fd in (info[0], block[1]) if info and block else ():
                    os.close(fd)

    async def _spawn(self, job: Job, launch: "_Launch") -> Outcome:
        with Pipes() as pipes:
            started = time.perf_counter()
            theirs = [fd for fd in (launch.info and launch.info[1],
                                    launch.block and launch.block[0]) if fd is not None]
            try:
                process = await asyncio.create_subprocess_exec(
                    *launch.argv,
                    stdin=pipes.job_r, stdout=pipes.output_w, stderr=pipes.output_w,
                    pass_fds=(pipes.result_w, *theirs),
                    start_new_session=True,
                    cwd=launch.cwd,
                    env=launch.env,
                )
            except BaseException:
                pipes.close_all()
                raise
            finally:
                pipes.close_theirs()
                for fd in theirs:
                    os.close(fd)
            attached = None
            try:
                if launch.info is not None:
                    try:
                        attached = await self._connect(process, job, launch)
                    except asyncio.CancelledError:
                        pipes.close_all()  # _connect killed the child
                        raise
                ended = asyncio.ensure_future(process.wait())
                variables = ({"WFD_WORKFLOW_DIR": self.isolation.workflow_dir(job.files)}
                             if job.files else None)
                payload = job.payload(pipes.result_w, rlimit_nproc=launch.cgroup is None,
                                      sandboxed=launch.signal_exits, variables=variables)
                return await supervise(job, payload, pipes, started, ended,
                                       lambda: _kill_group(process.pid), cgroup=launch.cgroup,
                                       signal_exits=launch.signal_exits)
            except _NoNetwork as exc:
                pipes.close_all()
                return Outcome(Status.ERROR, (time.perf_counter() - started) * 1000,
                               error=f"boot failed: the execution's network: {exc}")
            finally:
                if attached is not None:
                    attached.close()

    async def _connect(self, process: asyncio.subprocess.Process, job: Job,
                       launch: "_Launch") -> network.Attached:
        """Give the namespace bwrap made its network, then let bwrap start the workflow.

        bwrap waits on its block pipe meanwhile: the workflow never runs
        without its network, and the set-up does not count against its timeout.
        """
        net, info, block = self.isolation.network, launch.info, launch.block
        if net is None or info is None or block is None:
            raise _NoNetwork("no network layer to set it up")  # _spawn's caller checked
        try:
            pid = await network.child_pid(info[0])
            attached = await net.attach(pid, job.network)
        except BaseException as exc:
            _kill_group(process.pid)
            if not isinstance(exc, network.NetworkError | OSError | TimeoutError):
                raise  # cancelled: the daemon is stopping
            await process.wait()
            raise _NoNetwork(str(exc)) from None
        try:
            os.write(block[1], b"1")
        except OSError as exc:
            attached.close()
            _kill_group(process.pid)
            await process.wait()
            raise _NoNetwork(f"the sandbox ended first ({exc})") from None
        return attached
