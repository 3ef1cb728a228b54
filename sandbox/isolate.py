"""Per-execution isolation of a child forked by the zygote (sandbox mode).

The zygote runs under bubblewrap as uid 65534 without capabilities, so it
cannot build namespaces for others; each warm spare is made in namespaces
of its own instead, as any unprivileged process may, and is the one process
of its execution:

1. `fork_isolated` (the zygote): fork the spare straight into a new user
   namespace mapping only its own uid (65534 outside: no other identity
   exists in it), which gives it capabilities inside that namespace alone,
   and with it new mount, PID and IPC namespaces. The spare is PID 1 of its
   PID namespace: when it ends, the kernel kills everything left in it.
2. `prepare` (the spare, before any job exists): its uid map, mounts made
   slaves so nothing mounted here reaches the zygote or other executions,
   a /proc that lists only this execution's processes, a fresh tmpfs on
   /tmp (the working directory) and /dev/shm, with any runtime bound under
   /tmp carried over.
3. `enter` (once its job arrived): the job's size for those tmpfs, its
   workflow's persistent directory bound and the zygote's view of every
   other one covered, then every capability dropped for good.

Everything here runs before user code; errors propagate, and the caller
turns them into a boot failure, never a silently weaker execution.
"""

import ctypes
import os
import platform
import signal

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
NAMESPACES = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC
# clone(2) by number: the C library's wrapper wants a stack and a function.
SYS_CLONE = {"x86_64": 56, "aarch64": 220}
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_RDONLY, MS_REMOUNT, MS_BIND = 0x1, 0x20, 0x1000
MS_REC, MS_SLAVE = 0x4000, 0x80000
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
WORKDIR = "/tmp"
SCRATCH = ("/tmp", "/dev/shm")
# The scratch mounts' size until the job says its own (`enter`).
SPARE_TMP = "size=1m,mode=1777"

_libc = ctypes.CDLL(None, use_errno=True)
# Python's own fork hooks must be called with the interpreter lock held, and
# nothing else may run between them and the clone: calls through the
# interpreter's library (a PyDLL) keep the lock, unlike _libc's.
_python = ctypes.PyDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None
           ) -> None:
    _check(_libc.mount(source.encode(), target.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), data and data.encode()), f"mount {target}")


def fork_isolated() -> int:
    """os.fork, with the child in new user, mount, PID and IPC namespaces.

    The same as os.fork (Python's before- and after-fork hooks around the
    system call) but through clone(2), which can make the namespaces on the
    way: the child is PID 1 of its PID namespace and nothing runs above it,
    where unshare(2) would have needed one more process to be that PID 1.
    The zygote is single-threaded, so no lock is held across it.
    """
    number = SYS_CLONE.get(platform.machine())
    if number is None:
        raise OSError(f"clone(2) is not known on {platform.machine()}")
    _python.PyOS_BeforeFork()
    pid = _python.syscall(ctypes.c_long(number), ctypes.c_ulong(NAMESPACES | signal.SIGCHLD),
                          None, None, None, None)
    if pid == 0:
        _python.PyOS_AfterFork_Child()
        return 0
    errno = ctypes.get_errno()
    _python.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(errno, f"clone: {os.strerror(errno)}")
    return int(pid)


def prepare(uid: int, gid: int) -> None:
    """What a spare does before its job: identity, mounts slaved, /proc, scratch tmpfs.

    `uid` and `gid` are the zygote's (here they read as the overflow ids
    until mapped). The user namespace maps only those to themselves, so the
    capabilities it grants reach nothing outside it and no uid 0 exists in
    it. Mounts become slaves: nothing mounted here reaches the zygote, while
    a workflow directory the daemon mounts later still reaches this spare.
    A runtime bound under /tmp (a checkout or venv there) would vanish under
    the new tmpfs, so those binds are carried over onto it, read-only.
    """
    own_namespaces(uid, gid)
    keep = _runtime_under(WORKDIR)
    try:
        for target in SCRATCH:
            _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, SPARE_TMP)
        for path, fd in keep.items():
            os.makedirs(path, 0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            _mount("none", path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    finally:
        for fd in keep.values():
            os.close(fd)
    os.chdir(WORKDIR)


def own_namespaces(uid: int, gid: int) -> None:
    """The new namespaces made usable: `uid`, `gid` mapped; mounts slaved; the PID one's /proc."""
    for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"),
                       ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as mapping:
            mapping.write(text)
    _mount("none", "/", None, MS_REC | MS_SLAVE)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def join_cgroup(procs_fds: list[int]) -> None:
    """Write "0" (this process) into each `cgroup.procs` the daemon opened, then close them.

    The kernel checks the credentials the file was opened with, so the
    daemon's descriptor works from inside our user namespace.
    """
    for fd in procs_fds:
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


def enter(tmp_bytes: int, files: dict[str, str | None] | None = None) -> None:
    """What depends on the job: the scratch size, the workflow's directory; then no capabilities.

    `files` (PROTOCOL.md) names the workflow's directory to bind and the
    zygote's directory of all workflows, covered by an empty read-only tmpfs.
    """
    for target in SCRATCH:
        _mount("tmpfs", target, "tmpfs", MS_REMOUNT | MS_NOSUID | MS_NODEV,
               f"size={tmp_bytes},mode=1777")
    if files:
        mount_files(files)
    drop_capabilities()


def mount_files(files: dict[str, str | None]) -> None:
    """The workflow's own directory at its fixed path; nobody else's anywhere."""
    source, target, hide = files.get("source"), files["target"], files["hide"]
    assert target is not None and hide is not None, "the daemon names both"
    if source:
        _mount(source, target, None, MS_BIND | MS_REC)
    _mount("tmpfs", hide, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY,
           "size=4k,mode=0")


def _runtime_under(directory: str) -> dict[str, int]:
    """The mounts below `directory` (outermost first), each held by an O_PATH descriptor."""
    with open("/proc/self/mountinfo") as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    below = sorted({p for p in points if p.startswith(directory + "/")}, key=len)
    outermost = [p for p in below if not any(p.startswith(q + "/") for q in below)]
    return {path: os.open(path, os.O_PATH | os.O_CLOEXEC) for path in outermost}


def drop_capabilities() -> None:
    """Empty the bounding, ambient, effective, permitted and inheritable sets."""
    cap = 0
    while _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    if cap == 0:
        _check(-1, "PR_CAPBSET_DROP")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "ambient caps")
    empty = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(_CapHeader(LINUX_CAPABILITY_VERSION_3, 0)), empty),
           "capset")
