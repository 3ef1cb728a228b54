"""The spawn executor: a fresh interpreter for every execution."""

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wfd.executor.base import CHILD_PATH, Job, Outcome
from wfd.executor.pipes import Pipes
from wfd.executor.supervise import supervise
from wfd.isolation.cgroups import ExecutionCgroup
from wfd.isolation.layers import Isolation


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
            argv = self.isolation.argv(job.limits, cgroup, job.files)
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
        variables = ({"WFD_WORKFLOW_DIR": self.isolation.workflow_dir(job.files)}
                     if job.files else None)
        payload = job.payload(pipes.result_w, rlimit_nproc=launch.cgroup is None,
                              variables=variables)
        return await supervise(job, payload, pipes, started, ended,
                               lambda: _kill_group(process.pid), cgroup=launch.cgroup,
                               signal_exits=launch.signal_exits)
