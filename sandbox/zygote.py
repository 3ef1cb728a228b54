"""The zygote: preloads modules once, then forks one child per execution.

Started by the daemon as `python -I -m sandbox.zygote MODE CHANNEL_FD WORKDIRS
SPARES_MIN SPARES_MAX [MODULE...]` (`protocol.ZygoteArgs`), MODE being
`sandbox` (under bubblewrap: each execution in namespaces of its own, see
isolate.py) or `plain`.
PROTOCOL.md ("The zygote") is the contract; in short, one select loop
does, in order: read the daemon's messages (run, kill, ping, retire), reap
exited children and report their exit, then fork spares until the pool is
back at its target.
"""

import array
import collections
import contextlib
import gc
import importlib
import json
import os
import selectors
import shutil
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

from sandbox import isolate, limits, runner, spare
from sandbox.protocol import (
    EXIT_JOIN_FAILED,
    EXIT_ZYGOTE_BOOT_FAILED,
    MAX_RUN_FDS,
    MESSAGE_BYTES,
    MODE_SANDBOX,
    ZygoteArgs,
)

# With no miss for this long, the pool target shrinks by one spare.
POOL_DECAY_S = 10.0
HAND_OVER_TRIES = 3


@dataclass
class Child:
    """A forked child that took a job: the daemon knows it by execution id."""

    execution_id: str
    workdir: str | None  # None in sandbox mode: /tmp is a tmpfs that ends with it


class NoGroup(Exception):
    """A run for a spare already in a cgroup, and neither such a spare nor a blank group."""


class Pool:
    """Warm spares, and how many to keep: grows on a miss, decays when idle."""

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self.target = low
        self.spares: dict[int, socket.socket] = {}
        # The cgroup each spare joined as it was forked, for those that did.
        self.groups: dict[int, str] = {}
        self._last_miss = time.monotonic()

    def take(self, joined: bool = False) -> tuple[int, socket.socket] | None:
        """A spare already in a cgroup (`joined`), or one that joins its job's."""
        for pid in self.spares:
            if (pid in self.groups) == joined:
                return pid, self.spares.pop(pid)
        self.target = min(self.high, self.target + 1)
        self._last_miss = time.monotonic()
        return None

    def wanted(self) -> int:
        """How many spares to fork now, after letting an idle target decay."""
        now = time.monotonic()
        if self.target > self.low and now - self._last_miss > POOL_DECAY_S:
            self.target -= 1
            self._last_miss = now
        return max(0, self.target - len(self.spares))

    def trim(self) -> None:
        """Close the sockets of spares over the target: they exit at EOF."""
        while len(self.spares) > self.target:
            self.spares.popitem()[1].close()


class Zygote:
    """The zygote's runtime state. Built after preloading, in the zygote only."""

    def __init__(self, channel: socket.socket, workdirs: str, pool: Pool,
                 sandboxed: bool) -> None:
        self.channel = channel
        self.workdirs = workdirs
        self.sandboxed = sandboxed
        self.pool = pool
        self.children: dict[int, Child] = {}
        self.pids: dict[str, int] = {}
        self.retiring = False
        self.env = {key: os.environ[key] for key in ("PATH", "LANG") if key in os.environ}
        # Who a sandboxed spare maps to itself; inside its new user namespace
        # it reads as the overflow ids until it has.
        self.ids = (os.getuid(), os.getgid())
        self._count = 0
        # Blank cgroups from the daemon (`cgroup`), each for the next spare forked;
        # once one came, spares are forked only into them (until a join fails).
        self.stock: collections.deque[tuple[str, list[int]]] = collections.deque()
        self.uses_groups = False

    def serve(self) -> None:
        """The loop: events, reap, refill; until the daemon leaves or retires us."""
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select
        selector = selectors.DefaultSelector()
        selector.register(self.channel, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        self.send({"ev": "ready", "pid": os.getpid()})
        try:
            while not (self.retiring and not self.children):
                timeout = 0 if self.pool.wanted() and not self.retiring else 1.0
                for key, _ in selector.select(timeout):
                    if key.fileobj is self.channel and not self.read_channel():
                        return
                    if key.fileobj == wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 4096)
                self.reap_children()
                if not self.retiring:
                    self.manage_spares()
        finally:
            self.shutdown()

    def read_channel(self) -> bool:
        """Handle every waiting message; False once the daemon closed the channel."""
        while True:
            try:
                data, fds = receive(self.channel)
            except BlockingIOError:
                return True
            except ConnectionError:
                return False
            if not data:
                return False
            message = json.loads(data)
            op = message.get("op")
            if op == "run":
                self.start(message["id"], fds, bool(message.get("joined")))
            elif op == "cgroup":
                self.stock_up(message["name"], fds)
            elif op == "compile":
                runner.remember(message["name"], message["version"], message["code"])
            elif op == "kill":
                self.kill(message["id"])
            elif op == "ping":
                self.send({"ev": "pong", "spares": len(self.pool.spares),
                           "joined": len(self.pool.groups), "target": self.pool.target,
                           "running": len(self.children)})
            elif op == "retire":
                self.retiring = True
                self.pool.target = 0
                self.pool.trim()

    def start(self, execution_id: str, fds: list[int], joined: bool = False) -> None:
        """Hand the job's pipes to a spare (forking one if none is warm).

        `joined`: to a spare already in a cgroup, named to the daemon in
        `started`; with none and no blank group left, `unjoined` asks the
        daemon to send the run again with its cgroup's descriptors.
        """
        self._count += 1
        workdir = None if self.sandboxed else os.path.join(self.workdirs, f"x{self._count}")
        try:
            pid = self._hand_over(workdir, fds, joined)
        except NoGroup:
            self.send({"ev": "unjoined", "id": execution_id})
            return
        except OSError as exc:
            self.send({"ev": "failed", "id": execution_id,
                       "error": f"the zygote could not start the execution: {exc}"})
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.children[pid] = Child(execution_id, workdir)
        self.pids[execution_id] = pid
        group = self.pool.groups.pop(pid, None)
        if joined:
            self.send({"ev": "started", "id": execution_id, "cgroup": group})

    def stock_up(self, name: str, fds: list[int]) -> None:
        """Keep a blank group for the next spare.

        The first one retires the spares forked before it (at boot): they
        exit at EOF, and spares in groups replace them.
        """
        self.stock.append((name, fds))
        if not self.uses_groups:
            self.uses_groups = True
            for pid in [pid for pid in self.pool.spares if pid not in self.pool.groups]:
                self.pool.spares.pop(pid).close()

    def _hand_over(self, workdir: str | None, fds: list[int], joined: bool = False) -> int:
        ticket = json.dumps({"workdir": workdir}).encode()
        for _ in range(HAND_OVER_TRIES):
            taken = self.pool.take(joined)
            if taken is None and joined and not self.stock:
                raise NoGroup
            pid, work = taken or self.fork_spare(joined)
            try:
                socket.send_fds(work, [ticket], fds)
                return pid
            except (BrokenPipeError, ConnectionError):
                continue  # that spare died waiting; its exit is reaped as usual
            finally:
                work.close()
        raise OSError(f"{HAND_OVER_TRIES} children in a row died before taking the job")

    def kill(self, execution_id: str) -> None:
        """The daemon's timeout: kill the execution's whole process group.

        In sandbox mode the execution is its PID namespace's init: its death
        empties the namespace, whatever left the group.
        """
        pid = self.pids.get(execution_id)
        if pid is not None:
            kill_group(pid)

    def reap_children(self) -> None:
        """Collect every exited child; report executions, forget dead spares."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                work = self.pool.spares.pop(pid, None)
                if work is not None:
                    work.close()
                self._spare_gone(pid, status)
                continue
            del self.pids[child.execution_id]
            kill_group(pid)  # nothing the execution started outlives it
            remove(child.workdir)
            self.send({"ev": "exited", "id": child.execution_id, "pid": pid,
                       "returncode": os.waitstatus_to_exitcode(status)})

    def _spare_gone(self, pid: int, status: int) -> None:
        """A spare died without a job: give its group back (`cgroup_free`) for removal.

        One that could not join its group says so: the zygote stops using
        blank groups, and its executions join at hand-off as before.
        """
        group = self.pool.groups.pop(pid, None)
        if group is None:
            return
        failed = os.waitstatus_to_exitcode(status) == EXIT_JOIN_FAILED
        gone = [group]
        if failed:
            self.uses_groups = False
            while self.stock:
                name, fds = self.stock.popleft()
                for fd in fds:
                    os.close(fd)
                gone.append(name)
        for name in gone:
            self.send({"ev": "cgroup_free", "cgroup": name, "join_failed": failed})

    def manage_spares(self) -> None:
        """Fork one spare if the pool is short; the loop comes back for more.

        With blank groups in use and none in stock, it waits for the daemon's
        next: a spare without one would only be retired, or serve nobody.
        """
        if self.pool.wanted() and (self.stock or not self.uses_groups):
            with contextlib.suppress(OSError):  # out of processes: retry next pass
                pid, work = self.fork_spare(bool(self.stock))
                self.pool.spares[pid] = work

    def fork_spare(self, joined: bool = False) -> tuple[int, socket.socket]:
        """Fork a child that waits on its own socket for one job.

        `joined` (with a blank group in stock): it joins that group first, so
        its job's process is in its cgroup before the job exists.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        zygote = os.getpid()
        name, join = self.stock.popleft() if joined and self.stock else (None, [])
        try:
            pid = isolate.fork_isolated() if self.sandboxed else os.fork()
        except OSError:
            ours.close()
            theirs.close()
            if name is not None:
                self.stock.appendleft((name, join))
            raise
        if pid == 0:
            spare.serve(theirs, zygote, self.env, self.sandboxed, join,
                        self.ids)  # never returns
        theirs.close()
        for fd in join:
            os.close(fd)
        if name is not None:
            self.pool.groups[pid] = name
        return pid, ours

    def send(self, message: dict[str, Any]) -> None:
        self.channel.send(json.dumps(message).encode())

    def shutdown(self) -> None:
        """Leave nothing behind: kill what still runs, release the spares."""
        self.pool.target = 0
        self.pool.trim()
        for pid, child in self.children.items():
            kill_group(pid)
            remove(child.workdir)


def remove(workdir: str | None) -> None:
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


def receive(channel: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the fds that came with it, without waiting.

    socket.recv_fds would do, but before Python 3.12 it ignores its flags.
    """
    data, ancillary, _, _ = channel.recvmsg(
        MESSAGE_BYTES, socket.CMSG_SPACE(MAX_RUN_FDS * 4),
        socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def kill_group(pid: int) -> None:
    """SIGKILL a child's process group; the child itself if it has none yet."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def preload(modules: list[str]) -> None:
    """Import the modules every execution would import, then freeze what exists.

    gc.freeze moves every object made so far out of the collector's reach, so
    a collection in a forked child does not write to (and copy) those pages.
    """
    importlib.import_module("sandbox.runner")
    for name in modules:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()


def probe_isolation() -> None:
    """Make one execution's namespaces in a throwaway child; raise if that fails.

    Checked at boot so that a host where it cannot work gets one clear
    `boot_failed` (and the daemon's cold-spawn fallback), not a zygote that
    forks spares dying one after the other.
    """
    ids = os.getuid(), os.getgid()
    pid = isolate.fork_isolated()
    if pid == 0:
        code = 1
        try:
            isolate.prepare(*ids)
            code = 0
        finally:
            os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code != 0:
        raise OSError(f"per-execution namespaces cannot be made here (exit {code}): "
                      "unprivileged user namespaces must be allowed")


def boot(modules: list[str], sandboxed: bool) -> None:
    preload(modules)
    if sandboxed:
        probe_isolation()


def main(argv: list[str]) -> int:
    """Boot (preload, or report why not), then serve until the daemon lets go."""
    daemon = os.getppid()
    args = ZygoteArgs.parse(argv)
    sandboxed = args.mode == MODE_SANDBOX
    channel = socket.socket(fileno=args.channel_fd)
    if not limits.die_with_parent(daemon):
        return 0  # the daemon died already; later, the channel's EOF tells us
    try:
        boot(list(args.preload), sandboxed)
    except BaseException as exc:
        error = "".join(traceback.format_exception_only(exc)).strip().splitlines()[-1]
        channel.send(json.dumps({"ev": "boot_failed",
                                  "error": f"boot failed: {error}"}).encode())
        return EXIT_ZYGOTE_BOOT_FAILED
    Zygote(channel, args.workdirs, Pool(args.spares_min, args.spares_max), sandboxed).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
