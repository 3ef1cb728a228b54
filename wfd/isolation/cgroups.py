"""Per-execution resource control with cgroups (v2 delegated subtree, or v1 pids+memory).

Why cgroups and not only rlimits: RLIMIT_NPROC counts per real uid and is
ignored for root, so it cannot contain a fork bomb; RLIMIT_AS counts address
space, not memory actually used; and nothing in rlimits can kill a double-forked
`setsid` grandchild.  A cgroup caps the *group*, and lets us kill the group.

Both backends hide behind the same two calls: `CgroupBackend.create()` per
execution and the `ExecutionCgroup` it returns.  `detect()` picks one, or
returns None (the caller then falls back to rlimits and says so).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sandbox.protocol import EXIT_JOIN_FAILED
from wfd import logs

PARENT_NAME = "wfd"
DAEMON_LEAF = "daemon"
EXEC_PREFIX = "exec-"
# A v1 daemon's own group under each `wfd` parent: `<pid>-<random>`. The pid is
# only a hint for people: pids repeat across PID namespaces (a container's
# daemon may be pid 40 too), so ownership is the flock on the directory.
_INSTANCE = re.compile(r"^[0-9]+-[0-9a-f]{8}$")
CPU_PERIOD_US = 100_000
# The child joins its cgroup itself, before exec, so nothing it forks can start
# outside the group (moving it from the parent after spawn races with its first fork).
# Arguments: procs files, then "--", then the command.  `echo $$` is one write().
# A failed join exits EXIT_JOIN_FAILED, reported as "boot failed", never as
# a workflow error.
_JOIN_SH = (
    'p=$$; while [ "$1" != -- ]; do echo "$p" > "$1" || exit '
    f'{EXIT_JOIN_FAILED}; shift; done; shift; exec "$@"'
)
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# Polls start fast and back off: a process that just wrote its result is
# usually gone within a fraction of a millisecond, and a fixed 5 ms sleep
# was most of a forked execution's latency.
_POLL_FIRST_S = 0.0001
_POLL_S = 0.005


class CgroupError(Exception):
    """A cgroup operation failed in a way the caller must report."""


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _write_optional(path: Path, value: str) -> bool:
    """Write a control file the kernel may not offer (no swap accounting, old kernel)."""
    try:
        _write(path, value)
    except FileNotFoundError:
        return False
    return True


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(line) for line in path.read_text().split()]
    except FileNotFoundError:
        return []


def _read_counter(path: Path, key: str) -> int | None:
    """Value of `key N` in a flat-keyed file (memory.events, memory.oom_control)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except FileNotFoundError:
        return None


def _deadline_loop(timeout_s: float) -> Iterator[None]:
    """Yield until the deadline; the caller breaks out when its condition holds."""
    deadline = time.monotonic() + timeout_s
    pause = _POLL_FIRST_S
    while time.monotonic() < deadline:
        yield
        time.sleep(pause)
        pause = min(_POLL_S, pause * 2)


class ExecutionCgroup(ABC):
    """One execution's cgroup: join it, kill everything in it, read its OOM verdict."""

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs

    def join_argv(self, argv: list[str]) -> list[str]:
        """Prefix argv so the process enters this cgroup before it execs (and forks)."""
        procs = [str(d / "cgroup.procs") for d in self.dirs]
        return ["/bin/sh", "-c", _JOIN_SH, "wfd-cgroup-join", *procs, "--", *argv]

    def open_procs(self) -> list[int]:
        """One `cgroup.procs` descriptor per hierarchy, for a process to join by itself.

        A zygote's child writes "0" into each (sandbox/isolate.py). The kernel
        checks the opener's credentials (ours), not those of the writer, which
        runs in a user namespace of its own.
        """
        fds: list[int] = []
        try:
            for d in self.dirs:
                fds.append(os.open(d / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def pids(self) -> list[int]:
        """Processes currently in the group (in any of its hierarchies)."""
        return sorted({pid for d in self.dirs for pid in _read_pids(d / "cgroup.procs")})

    @abstractmethod
    def kill(self, timeout_s: float = 5.0) -> None:
        """SIGKILL every process in the group and wait until it is empty."""

    @abstractmethod
    def memory_oom(self) -> bool:
        """True when the kernel OOM-killed something in this group."""

    def close(self, timeout_s: float = 5.0) -> None:
        """Kill what is left and remove the group; rmdir is EBUSY until the last exit."""
        self.kill(timeout_s)
        for d in self.dirs:
            self._rmdir(d, timeout_s)

    @staticmethod
    def _rmdir(path: Path, timeout_s: float) -> None:
        for _ in _deadline_loop(timeout_s):
            try:
                if _removed(path):
                    return
            except OSError as e:
                raise CgroupError(f"cannot remove {path}: {e}") from e
        raise CgroupError(f"{path} still busy after {timeout_s}s")

    def _kill_loop(self, timeout_s: float) -> None:
        """SIGKILL every listed pid until none is left; new forks show up on the next read."""
        for _ in _deadline_loop(timeout_s):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        raise CgroupError(f"{self.dirs[0]} not empty after {timeout_s}s: {self.pids()}")


class V2Cgroup(ExecutionCgroup):
    """A leaf in a delegated cgroup v2 subtree."""

    def kill(self, timeout_s: float = 5.0) -> None:
        """cgroup.kill (5.14+) kills atomically, even processes forking right now."""
        if not _write_optional(self.dirs[0] / "cgroup.kill", "1"):
            self._kill_loop(timeout_s)
            return
        for _ in _deadline_loop(timeout_s):
            if not self.pids():
                return
        raise CgroupError(f"{self.dirs[0]} not empty after cgroup.kill")

    def memory_oom(self) -> bool:
        """memory.events counts OOM kills in this leaf only: no guessing from exit codes."""
        return (_read_counter(self.dirs[0] / "memory.events", "oom_kill") or 0) > 0


class V1Cgroup(ExecutionCgroup):
    """The same execution's directory in each v1 hierarchy (pids, memory, maybe cpu)."""

    def __init__(self, dirs: list[Path], memory_dir: Path) -> None:
        super().__init__(dirs)
        self.memory_dir = memory_dir

    def kill(self, timeout_s: float = 5.0) -> None:
        """v1 has no cgroup.kill; pids.max bounds how many forks the loop must catch."""
        self._kill_loop(timeout_s)

    def memory_oom(self) -> bool:
        """oom_control's oom_kill counter (4.13+); failcnt only says the limit was hit."""
        oom_control = self.memory_dir / "memory.oom_control"
        kills = _read_counter(oom_control, "oom_kill")
        if kills is not None:
            return kills > 0
        return (_read_int(self.memory_dir / "memory.failcnt") or 0) > 0


@dataclass(frozen=True)
class Limits:
    """What one execution may use; cpu_quota is in CPUs (0.5 = half of one CPU)."""

    memory_bytes: int
    pids_max: int
    cpu_quota: float | None = None


class CgroupBackend(ABC):
    """Creates one cgroup per execution under a parent the daemon owns."""

    name: str

    def create(
        self, exec_id: str, memory_bytes: int, pids_max: int, cpu_quota: float | None = None
    ) -> ExecutionCgroup:
        """Make the execution's group and set its limits before anything joins it."""
        if not _SAFE_ID.match(exec_id):
            raise ValueError(f"unsafe execution id for a cgroup name: {exec_id!r}")
        return self._create(EXEC_PREFIX + exec_id, Limits(memory_bytes, pids_max, cpu_quota))

    @abstractmethod
    def _create(self, name: str, limits: Limits) -> ExecutionCgroup: ...

    @abstractmethod
    def describe(self) -> dict[str, object]:
        """Plain data for `wfd ctl status` and /healthz."""

    @abstractmethod
    def close(self) -> None:
        """Remove what detection created for this daemon (at shutdown)."""


class V2Backend(CgroupBackend):
    """Delegated v2 subtree: the daemon sits in `<own>/daemon`, executions in siblings."""

    name = "v2"

    def __init__(self, own: Path, controllers: set[str], lock: int) -> None:
        self.own = own
        self.controllers = controllers
        self.lock = lock

    def _create(self, name: str, limits: Limits) -> ExecutionCgroup:
        path = self.own / name
        path.mkdir()
        _write(path / "memory.max", str(limits.memory_bytes))
        _write_optional(path / "memory.swap.max", "0")
        # Kill the whole execution on OOM, not one random process inside it.
        _write_optional(path / "memory.oom.group", "1")
        _write(path / "pids.max", str(limits.pids_max))
        if limits.cpu_quota is not None and "cpu" in self.controllers:
            quota = max(1000, int(limits.cpu_quota * CPU_PERIOD_US))
            _write(path / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        return V2Cgroup([path])

    def describe(self) -> dict[str, object]:
        return {"cgroup": "v2", "path": str(self.own), "controllers": sorted(self.controllers)}

    def close(self) -> None:
        """Release the subtree; it is systemd's, and the daemon's leaf holds the daemon."""
        os.close(self.lock)


class V1Backend(CgroupBackend):
    """Legacy/hybrid hosts: one `wfd` parent per hierarchy, under our own cgroup there."""

    name = "v1"

    def __init__(self, parents: dict[str, Path], locks: list[int]) -> None:
        self.parents = parents
        self.locks = locks

    def _create(self, name: str, limits: Limits) -> ExecutionCgroup:
        dirs = {ctrl: parent / name for ctrl, parent in self.parents.items()}
        for d in dirs.values():
            d.mkdir()
        mem = dirs["memory"]
        _write(mem / "memory.limit_in_bytes", str(limits.memory_bytes))
        # memsw (memory+swap) must be >= limit_in_bytes; equal means no swap at all.
        _write_optional(mem / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        _write(dirs["pids"] / "pids.max", str(limits.pids_max))
        if limits.cpu_quota is not None and "cpu" in dirs:
            _write(dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            quota = max(1000, int(limits.cpu_quota * CPU_PERIOD_US))
            _write(dirs["cpu"] / "cpu.cfs_quota_us", str(quota))
        return V1Cgroup(list(dirs.values()), mem)

    def describe(self) -> dict[str, object]:
        return {"cgroup": "v1", "paths": {k: str(v) for k, v in self.parents.items()}}

    def close(self) -> None:
        """Remove this daemon's instance groups; a leftover is cleaned by the next start."""
        for parent in self.parents.values():
            _stale_cleanup(parent)
            with contextlib.suppress(OSError):
                parent.rmdir()
        for fd in self.locks:
            os.close(fd)
        self.locks.clear()


def _parse_self_cgroup(text: str) -> dict[str, str]:
    """Map each controller ("" for the v2 hierarchy) to our path in it."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for ctrl in controllers.split(","):
            paths[ctrl] = path
    return paths


def _v2_mount(root: Path) -> Path | None:
    """Pure v2 mounts cgroup2 at root; hybrid hosts at root/unified."""
    for candidate in (root, root / "unified"):
        if (candidate / "cgroup.controllers").exists():
            return candidate
    return None


def _lock(path: Path, wait: bool = False) -> int | None:
    """An exclusive flock on a cgroup directory: its descriptor, or None if held elsewhere.

    The lock is how a daemon says "this group is mine and I am alive": the
    kernel drops it when the daemon dies, however it dies, and it means the
    same in every PID namespace and container that sees the directory.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd


def _remove_group(group: Path) -> None:
    """Kill what is left in a group nobody owns any more, then remove it."""
    for _ in _deadline_loop(2.0):
        listed = _read_pids(group / "cgroup.procs")
        # A process outside our PID namespace is listed as 0: we cannot kill it.
        if listed and 0 in listed:
            logs.event("stale-cgroup-kept", level=logging.WARNING, path=group,
                       reason="holds processes of another PID namespace")
            return
        for pid in listed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            if _removed(group):
                return
        except OSError as e:
            logs.event("stale-cgroup-kept", level=logging.WARNING, path=group, error=str(e))
            return
    logs.event("stale-cgroup-kept", level=logging.WARNING, path=group, reason="still busy")


def _removed(group: Path) -> bool:
    """Try once to remove a cgroup: True once it is gone, False while it is busy.

    A group is EBUSY until its last process has exited; any other error is raised.
    """
    try:
        group.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        return False
    return True


def _stale_cleanup(parent: Path) -> None:
    """Remove execution groups left in a parent whose owner is gone (or is us, closing)."""
    for child in parent.glob(EXEC_PREFIX + "*"):
        _remove_group(child)


def _stale_instances(shared: Path) -> None:
    """Remove the v1 groups of daemons that are gone: those whose lock nobody holds."""
    for instance in shared.iterdir():
        if not (_INSTANCE.match(instance.name) and instance.is_dir()):
            continue
        lock = _lock(instance)
        if lock is None:
            continue  # a live daemon, here or in another PID namespace or container
        try:
            _stale_cleanup(instance)
            with contextlib.suppress(OSError):
                instance.rmdir()
        finally:
            os.close(lock)


def _detect_v2(root: Path, paths: dict[str, str], pid: int, why: list[str]) -> V2Backend | None:
    mount = _v2_mount(root)
    if mount is None or "" not in paths:
        why.append("no cgroup v2 mount")
        return None
    own = mount / paths[""].lstrip("/")
    available = set((own / "cgroup.controllers").read_text().split())
    if not {"memory", "pids"} <= available:
        why.append(f"cgroup v2 {own} has no memory and pids controllers "
                   f"(has: {' '.join(sorted(available)) or 'none'})")
        return None
    wanted = sorted({"memory", "pids", "cpu"} & available)
    try:
        lock = _lock(own)
    except OSError as e:
        why.append(f"cgroup v2 {own} not readable: {e}")
        return None
    if lock is None:
        why.append(f"cgroup v2 {own} is already used by another wfd daemon")
        return None
    try:
        # v2 forbids processes in a node that hands controllers to children.
        leaf = own / DAEMON_LEAF
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", str(pid))
        _write(own / "cgroup.subtree_control", " ".join("+" + c for c in wanted))
    except OSError as e:
        os.close(lock)
        why.append(f"cgroup v2 subtree {own} not delegated to us: {e}")
        return None
    _stale_cleanup(own)
    return V2Backend(own, set(wanted), lock)


def _own_instance(shared: Path, name: str) -> int:
    """Clean up after gone daemons and make our group, under the parent's lock.

    Holding the parent's lock while doing both means no other daemon can take
    our group for a dead one's in the instant between its mkdir and its lock.
    """
    shared.mkdir(exist_ok=True)
    guard = _lock(shared, wait=True)
    assert guard is not None
    try:
        _stale_instances(shared)
        (shared / name).mkdir()
        lock = _lock(shared / name)
        assert lock is not None  # nobody else knows the name yet
        return lock
    finally:
        os.close(guard)


def _detect_v1(root: Path, paths: dict[str, str], pid: int, why: list[str]) -> V1Backend | None:
    """One `wfd/<pid>-<random>` group per daemon and hierarchy, flock-ed while it lives.

    Per daemon, because several daemons may share the host (tests do, and a
    container's daemon sees the host's groups): cleaning up after a dead one
    must never remove a live one's fresh, still empty group.
    """
    name = f"{pid}-{secrets.token_hex(4)}"
    parents: dict[str, Path] = {}
    locks: list[int] = []
    for ctrl in ("pids", "memory", "cpu"):
        if ctrl not in paths or not (root / ctrl).is_dir():
            why.append(f"no cgroup v1 {ctrl} hierarchy")
            continue
        shared = root / ctrl / paths[ctrl].lstrip("/") / PARENT_NAME
        try:
            locks.append(_own_instance(shared, name))
        except OSError as e:
            why.append(f"cgroup v1 {ctrl} not writable: {e}")
            continue
        parents[ctrl] = shared / name
    if not {"pids", "memory"} <= parents.keys():
        V1Backend(parents, locks).close()
        return None
    return V1Backend(parents, locks)


def detect(
    root: Path = Path("/sys/fs/cgroup"),
    self_cgroup: Path = Path("/proc/self/cgroup"),
    pid: int | None = None,
    why: list[str] | None = None,
) -> CgroupBackend | None:
    """Find a cgroup tree we may write, preferring a delegated v2 subtree.

    Call once at start-up: on v2 it moves the daemon (`pid`, default ours) into
    a leaf and enables controllers; on v1 it creates a `wfd/<pid>-<random>`
    group under our own group in each hierarchy, so the host's limits on us
    still cover children. Either way the daemon holds a flock on what it owns
    until it exits, and removes only groups whose lock is free.
    Returns None when neither is usable; `why` then lists each reason.
    """
    why = [] if why is None else why
    paths = _parse_self_cgroup(self_cgroup.read_text())
    pid = os.getpid() if pid is None else pid
    return _detect_v2(root, paths, pid, why) or _detect_v1(root, paths, pid, why)
