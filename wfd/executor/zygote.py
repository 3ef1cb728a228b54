"""The zygote executor: executions forked from a preloaded process, supervised.

`ZygoteProcess` is one running zygote seen from the daemon: its process, the
socketpair channel to it, and the executions it holds. `ZygoteExecutor` is
the supervisor: it boots zygotes, restarts one that dies or whose preload
list or installed packages changed, backs off from one that keeps failing to
boot, and cold-spawns while none is ready. sandbox/PROTOCOL.md ("The
zygote") is the contract with `sandbox/zygote.py`.
"""

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from sandbox.protocol import MESSAGE_BYTES, RESULT_FD, ZygoteArgs
from wfd import logs
from wfd.domain import Status
from wfd.executor.base import CHILD_PATH, ChildLost, Job, Outcome
from wfd.executor.pipes import Pipes
from wfd.executor.spare_groups import SpareGroups
from wfd.executor.spawn import SpawnExecutor, execution_cgroup
from wfd.executor.supervise import answered_early, supervise
from wfd.isolation import network
from wfd.isolation.cgroups import ExecutionCgroup
from wfd.isolation.layers import Isolation

BOOT_TIMEOUT_S = 30.0
# How often the supervisor pings the zygote and checks for changed packages;
# a zygote that has not answered for PING_TIMEOUT_S is killed as hung.
WATCH_INTERVAL_S = 1.0
PING_TIMEOUT_S = 10.0
# A zygote that stayed up this long had no boot problem: the backoff resets.
STABLE_S = 10.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 60.0
# Blank cgroups a zygote holds beyond its pool's maximum, so that a burst of
# executions finds groups for the spares it makes (an empty group costs three
# directories); each one used is replaced at once.
STOCK_BURST = 16


class BootFailed(Exception):
    """The zygote could not boot (a preload failed, or it died first)."""


class ZygoteProcess:
    """One running zygote and the executions it holds.

    Made by `launch` once the process runs, so everything here exists for
    its whole life: the process, the channel (already read from) and
    `exited`, which ends with the process.
    """

    def __init__(self, process: asyncio.subprocess.Process, channel: socket.socket,
                 workdirs: str) -> None:
        self.process = process
        self.channel = channel
        self.workdirs = workdirs
        self.booted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending: dict[str, asyncio.Future[int]] = {}
        # The version of each workflow this zygote was asked to compile (`remember`).
        self.compiled: dict[str, int] = {}
        self.pool: dict[str, int] = {}
        self.last_answer = time.monotonic()
        self.network: network.Attached | None = None  # set by `launch`, with the layer
        # With cgroups: the blank groups its spares join ahead of their jobs.
        self.groups: SpareGroups | None = None
        asyncio.get_running_loop().add_reader(channel.fileno(), self._read)
        self.exited: asyncio.Task[int] = asyncio.create_task(self._wait())

    @classmethod
    async def launch(cls, isolation: Isolation, policy: network.Policy,
                     preload: Sequence[str], spares: tuple[int, int],
                     files_root: Path | None = None) -> "ZygoteProcess":
        """Exec the zygote with one end of a socketpair; return once it runs.

        With the network layer its bwrap makes the network namespace it and
        its children share, and this returns once that has its network
        (`policy`); if it cannot have it, the zygote is stopped.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        net = isolation.network
        info = os.pipe2(os.O_CLOEXEC) if net is not None else None
        command = isolation.zygote_command(
            net.bwrap_options(info[1]) if net is not None and info else None, files_root)
        workdirs = tempfile.mkdtemp(prefix="wfd-zygote-")
        env = {"PATH": CHILD_PATH, "LANG": "C.UTF-8", "HOME": workdirs, "TMPDIR": workdirs}
        args = ZygoteArgs(isolation.zygote_mode, theirs.fileno(), workdirs, *spares,
                          tuple(preload))
        try:
            process = await asyncio.create_subprocess_exec(
                *command, *args.argv(),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(), *(info[1:] if info else ())),
                start_new_session=True, env=env)
        except BaseException:
            ours.close()
            shutil.rmtree(workdirs, True)
            if info:
                os.close(info[0])
            raise
        finally:
            theirs.close()
            if info:
                os.close(info[1])
        ours.setblocking(False)
        zygote = cls(process, ours, workdirs)
        if isolation.backend is not None:
            # As many as the pool can hold, and some for a burst: stocked once it is ready.
            zygote.groups = SpareGroups(ours, isolation.spare_cgroup, spares[1] + STOCK_BURST)
        if net is not None and info:
            try:
                pid = await network.child_pid(info[0])
                zygote.network = await net.attach(pid, policy)
            except BaseException:
                zygote.stop()
                await zygote.exited
                raise
            finally:
                os.close(info[0])
        return zygote

    @property
    def pid(self) -> int:
        return self.process.pid

    def run(self, execution_id: str, fds: list[int], joined: bool = False
            ) -> "asyncio.Future[int]":
        """Ask for a child to run the job on `fds`; the future gives its return code.

        `joined`: in a spare already in a blank group (`SpareGroups`), which
        the zygote names before the child reads its job.
        """
        ended = asyncio.get_running_loop().create_future()
        message = {"op": "run", "id": execution_id, **({"joined": True} if joined else {})}
        try:
            socket.send_fds(self.channel, [orjson.dumps(message)], fds)
        except OSError as exc:
            ended.set_exception(ChildLost(f"could not reach the zygote: {exc}"))
            return ended
        self.pending[execution_id] = ended
        return ended

    def remember(self, job: Job) -> None:
        """Have the zygote compile a deployed version once; the spares it forks next inherit it.

        Only executions of deployed versions (their deploy-time check compiled
        them in a child), and only code that fits in one message, which also
        bounds what compiling costs the zygote.
        """
        if job.mode != "run" or self.compiled.get(job.name) == job.version:
            return
        message = orjson.dumps({"op": "compile", "name": job.name, "version": job.version,
                                "code": job.code})
        if len(message) <= MESSAGE_BYTES:
            self.compiled[job.name] = job.version
            with contextlib.suppress(OSError):  # a dead zygote is noticed by _wait
                self.channel.send(message)

    def kill(self, execution_id: str) -> None:
        """Have the zygote SIGKILL the execution's process group (if still running)."""
        if execution_id in self.pending:
            self._send({"op": "kill", "id": execution_id})

    def ping(self) -> None:
        self._send({"op": "ping"})

    def retire(self) -> None:
        """Planned stop: the zygote lets its executions finish, then exits."""
        if self.groups is not None:
            self.groups.enabled = False  # no more blank groups for it
        self._send({"op": "retire"})

    def stop(self) -> None:
        """Kill the zygote; its children die with it (PR_SET_PDEATHSIG)."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    def _send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # a dead zygote is noticed by _wait
            self.channel.send(orjson.dumps(message))

    def _read(self) -> None:
        """Handle every waiting message from the zygote."""
        while True:
            try:
                data = self.channel.recv(MESSAGE_BYTES)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                asyncio.get_running_loop().remove_reader(self.channel.fileno())
                self.stop()  # a closed channel is a dead zygote: make it so
                return
            self.last_answer = time.monotonic()
            self._handle(orjson.loads(data))

    def _handle(self, message: dict[str, Any]) -> None:
        event = message.get("ev")
        if event == "ready" and not self.booted.done():
            self.booted.set_result(None)
            if self.groups is not None:  # not before: a boot failure must be read first
                self.groups.stock(self.groups.initial)
        elif event == "boot_failed" and not self.booted.done():
            self.booted.set_exception(BootFailed(message.get("error", "boot failed")))
        elif event == "exited":
            ended = self.pending.pop(message["id"], None)
            if ended is not None and not ended.done():
                ended.set_result(message["returncode"])
        elif event == "failed":
            ended = self.pending.pop(message["id"], None)
            if ended is not None and not ended.done():
                ended.set_exception(ChildLost(message["error"]))
        elif event in ("started", "unjoined", "cgroup_free") and self.groups is not None:
            self._handle_group(event, message)
        elif event == "pong":
            self.pool = {key: message[key] for key in ("spares", "joined", "target", "running")}

    def _handle_group(self, event: str, message: dict[str, Any]) -> None:
        groups = self.groups
        assert groups is not None
        if event == "started":
            execution_id = message["id"]
            groups.started(execution_id, message.get("cgroup"),
                           lambda: self.kill(execution_id))
        elif event == "unjoined":
            self.pending.pop(message["id"], None)  # never started: sent again with its group
            groups.unjoined(message["id"])
        else:
            groups.freed(message["cgroup"], bool(message.get("join_failed")))

    async def _wait(self) -> int:
        """Wait for the process to end; fail what it still held; clean up."""
        returncode = await self.process.wait()
        how = (f"killed by {signal.Signals(-returncode).name}" if returncode < 0
               else f"exit code {returncode}")
        if not self.booted.done():
            self.booted.set_exception(BootFailed(f"the zygote exited while booting ({how})"))
        for ended in self.pending.values():
            if not ended.done():
                ended.set_exception(ChildLost(f"the zygote died ({how}) during the execution"))
        self.pending.clear()
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
        if self.groups is not None:
            await self.groups.close(f"the zygote died ({how}) during the execution")
        self.channel.close()
        if self.network is not None:
            self.network.close()
        await asyncio.to_thread(shutil.rmtree, self.workdirs, True)
        return returncode


def package_dirs() -> list[str]:
    """Where installs land: a package added, upgraded or removed changes their mtime."""
    paths = sysconfig.get_paths()
    return sorted({paths["purelib"], paths["platlib"]})


def packages_stamp(dirs: Sequence[str]) -> tuple[int, ...]:
    stamps = []
    for path in dirs:
        try:
            stamps.append(os.stat(path).st_mtime_ns)
        except OSError:
            stamps.append(0)
    return tuple(stamps)


class ZygoteExecutor:
    """Runs executions in children of a supervised zygote; cold-spawns while it is down.

    States: `starting` (executions wait for the boot), `ready`, `backoff`
    (boot failed; executions cold-spawn until the next try), `stopped`.
    """

    def __init__(self, preload: Sequence[str], spares_min: int, spares_max: int,
                 isolation: Isolation, policy: network.Policy | None = None,
                 files_root: Path | None = None) -> None:
        self.preload = list(preload)
        self.spares = (spares_min, spares_max)
        self.isolation = isolation
        # The one egress policy of this zygote's network namespace.
        self.policy = policy or network.Policy()
        # Every workflow's persistent directory, mounted into the zygote's view.
        self.files_root = files_root
        self.fallback = SpawnExecutor(isolation)
        self.state = "stopped"
        self.current: ZygoteProcess | None = None
        self.restarts = 0
        self.last_error: str | None = None
        self._failures = 0  # zygotes in a row that failed to boot or died young
        self._booted_at = 0.0
        self._stamp: tuple[int, ...] = ()
        self._retired: set[ZygoteProcess] = set()
        # Set by `configure` (restart with the new preload) and by each settled state.
        self._changed = asyncio.Event()
        self._settled = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dirs = package_dirs()

    async def start(self) -> None:
        """Boot the first zygote and wait until it is ready or has failed once."""
        self._task = asyncio.create_task(self._supervise())
        await self._settled.wait()

    def configure(self, preload: Sequence[str], spares_min: int, spares_max: int) -> None:
        """New preload list or pool bounds (on SIGHUP): a changed one restarts the zygote."""
        if (list(preload), (spares_min, spares_max)) != (self.preload, self.spares):
            self.preload, self.spares = list(preload), (spares_min, spares_max)
            self._changed.set()

    async def run(self, job: Job) -> Outcome:
        zygote = await self._ready_zygote()
        if zygote is None:
            return await self.fallback.run(job)
        return await answered_early(lambda answer: self._in_cgroup(zygote, job, answer))

    async def _in_cgroup(self, zygote: ZygoteProcess, job: Job,
                         answer: Callable[[Outcome], None]) -> Outcome:
        if zygote.groups is not None and zygote.groups.can_join():
            outcome = await self._run_joined(zygote, zygote.groups, job, answer)
            if outcome is not None:
                return outcome
        async with execution_cgroup(self.isolation, job) as cgroup:
            return await self._run_in(zygote, job, cgroup, answer)

    async def _run_joined(self, zygote: ZygoteProcess, groups: SpareGroups, job: Job,
                          answer: Callable[[Outcome], None]) -> Outcome | None:
        """Run the job in a spare already in its group: the workflow's limits, then the job.

        None when the zygote had no such spare left: the caller runs it with
        a group of its own. The spare waits for its job on the pipe, so the
        limits are in place before any of the workflow's code runs.
        """
        with Pipes() as pipes:
            started = time.perf_counter()
            zygote.remember(job)
            limits = self.isolation.cgroup_limits(job.limits)
            named = groups.expect(job.execution_id, limits)
            try:
                ended = zygote.run(job.execution_id, pipes.theirs(), joined=True)
            finally:
                pipes.close_theirs()
            if ended.done() and ended.exception() is not None:
                groups.unjoined(job.execution_id)
            try:
                blank = await named
            except ChildLost as exc:
                return Outcome(Status.ERROR, (time.perf_counter() - started) * 1000,
                               error=str(exc))
            if blank is None:
                return None
            cgroup = blank.cgroup
            try:
                if blank.needs(limits):
                    try:
                        await asyncio.to_thread(cgroup.limit, *limits)
                    except OSError as exc:
                        zygote.kill(job.execution_id)
                        ended.add_done_callback(lambda done: done.cancelled() or done.exception())
                        return Outcome(Status.ERROR, (time.perf_counter() - started) * 1000,
                                       error=f"boot failed: the execution's limits could not "
                                             f"be set on its cgroup: {exc}")
                payload = self._payload(job, cgroup)
                return await supervise(job, payload, pipes, started, ended,
                                       lambda: zygote.kill(job.execution_id), cgroup=cgroup,
                                       signal_exits=self.isolation.sandboxed, answer=answer)
            finally:
                await asyncio.to_thread(cgroup.close)

    async def _run_in(self, zygote: ZygoteProcess, job: Job,
                      cgroup: ExecutionCgroup | None,
                      answer: Callable[[Outcome], None]) -> Outcome:
        """Hand the job's pipes (and its cgroup's procs files) to the zygote; supervise."""
        with Pipes() as pipes:
            joins = cgroup.open_procs() if cgroup is not None else []
            started = time.perf_counter()
            zygote.remember(job)
            try:
                ended = zygote.run(job.execution_id, [*pipes.theirs(), *joins])
            finally:
                pipes.close_theirs()
                for fd in joins:
                    os.close(fd)
            payload = self._payload(job, cgroup)
            return await supervise(job, payload, pipes, started, ended,
                                   lambda: zygote.kill(job.execution_id), cgroup=cgroup,
                                   signal_exits=self.isolation.sandboxed, answer=answer)

    def _payload(self, job: Job, cgroup: ExecutionCgroup | None) -> list[bytes]:
        """The job as the forked child reads it, whichever way it got its cgroup."""
        variables = ({"WFD_WORKFLOW_DIR": self.isolation.workflow_dir(job.files)}
                     if job.files else None)
        return job.payload(RESULT_FD, rlimit_nproc=cgroup is None,
                           sandboxed=self.isolation.sandboxed, variables=variables,
                           files_mount=self.isolation.files_mount(job.files))

    async def _ready_zygote(self) -> ZygoteProcess | None:
        """The zygote to use, waiting out a boot in progress; None means cold spawn."""
        if self.state == "starting":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), BOOT_TIMEOUT_S)
        return self.current if self.state == "ready" else None

    def status(self) -> dict[str, Any]:
        """The executor's part of `wfd ctl status`."""
        zygote = self.current
        pool = zygote.pool if zygote else {}
        status = {
            "executor": "zygote",
            "zygote_state": self.state,
            "zygote_pid": zygote.pid if zygote else None,
            "spares": pool.get("spares"),
            # Of them, those already in the cgroup of the execution they will run.
            "spares_in_cgroups": pool.get("joined"),
            "spares_target": pool.get("target"),
            "preload": ", ".join(self.preload),
            "zygote_restarts": self.restarts,
            "zygote_error": self.last_error,
        }
        if self.state != "ready":
            status["fallback"] = "cold spawn while the zygote is down"
        return status

    async def close(self) -> None:
        """Stop supervising and stop the zygote (executions are over by now)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.state = "stopped"

    # -- the supervisor --------------------------------------------------------

    async def _supervise(self) -> None:
        """Boot, watch, restart: one serving zygote at a time, until closed."""
        try:
            while True:
                zygote = await self._boot()
                if zygote is None:
                    await self._back_off()
                    continue
                self._use(zygote)
                reason = await self._watch(zygote)
                if reason != "changed" and self._lost(zygote, reason):
                    await self._back_off()
        finally:
            zygotes = [*self._retired, *([self.current] if self.current else [])]
            for zygote in zygotes:
                zygote.stop()
            await asyncio.gather(*(zygote.exited for zygote in zygotes),
                                 return_exceptions=True)

    async def _boot(self) -> ZygoteProcess | None:
        """Start a zygote and wait for its `ready`; None (and why, logged) if it failed."""
        if self.current is None:
            self._set_state("starting")
        self._changed.clear()
        self._stamp = packages_stamp(self._dirs)
        try:
            zygote = await ZygoteProcess.launch(self.isolation, self.policy, self.preload,
                                                self.spares, self.files_root)
        except (OSError, network.NetworkError) as exc:
            self._boot_failed(exc)
            return None
        try:
            await asyncio.wait_for(asyncio.shield(zygote.booted), BOOT_TIMEOUT_S)
        except (BootFailed, TimeoutError) as exc:
            zygote.stop()
            await zygote.exited
            self._boot_failed(exc)
            return None
        return zygote

    def _boot_failed(self, exc: Exception) -> None:
        """Say why a zygote did not boot; the supervisor backs off and cold-spawns."""
        self.last_error = str(exc) or type(exc).__name__
        logs.event("zygote-boot-failed", error=self.last_error, preload=self.preload)

    def _use(self, zygote: ZygoteProcess) -> None:
        """Make a freshly booted zygote current; retire the one it replaces."""
        old, self.current = self.current, zygote
        if old is not None:
            self._retire(old)
        self.last_error = None
        self._booted_at = time.monotonic()
        logs.event("zygote-ready", pid=zygote.pid, preload=self.preload)
        self._set_state("ready")

    async def _watch(self, zygote: ZygoteProcess) -> str:
        """Until the zygote dies, hangs, or should be replaced; returns which."""
        while True:
            done, _ = await asyncio.wait({zygote.exited}, timeout=WATCH_INTERVAL_S)
            if done:
                return "died"
            if time.monotonic() - self._booted_at >= STABLE_S:
                self._failures = 0
            if time.monotonic() - zygote.last_answer > PING_TIMEOUT_S:
                zygote.stop()
                await zygote.exited
                return "hung"
            if zygote.network is not None and not zygote.network.alive():
                zygote.stop()  # its executions would have no network
                await zygote.exited
                return "lost its network (pasta ended)"
            if self._changed.is_set() or packages_stamp(self._dirs) != self._stamp:
                logs.event("zygote-restart", reason="preload or installed packages changed")
                return "changed"
            zygote.ping()

    def _lost(self, zygote: ZygoteProcess, reason: str) -> bool:
        """A serving zygote is gone; True if it died young (so back off first)."""
        self.current = None
        self.restarts += 1
        returncode = zygote.exited.result()
        self.last_error = f"the zygote {reason} (return code {returncode})"
        logs.event("zygote-lost", pid=zygote.pid, reason=reason, returncode=returncode)
        self._set_state("starting")
        return time.monotonic() - self._booted_at < STABLE_S

    async def _back_off(self) -> None:
        """Wait before the next boot, longer after each failure; cold spawn meanwhile."""
        self._failures += 1
        if self.current is not None:  # its replacement failed: the old one goes anyway
            self._retire(self.current)
            self.current = None
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self._failures - 1))
        self._set_state("backoff")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), delay)

    def _set_state(self, state: str) -> None:
        self.state = state
        if state == "starting":
            self._settled.clear()
        else:
            self._settled.set()

    def _retire(self, zygote: ZygoteProcess) -> None:
        """A replaced zygote exits once its executions are done; keep it until then."""
        zygote.retire()
        self._retired.add(zygote)
        zygote.exited.add_done_callback(lambda _: self._retired.discard(zygote))
