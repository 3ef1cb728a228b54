"""Per-execution isolation of a child forked by the zygote (sandbox mode).

The zygote runs under bubblewrap as uid 65534 without capabilities, so it
cannot build namespaces for others; each warm spare builds its own instead,
as any unprivileged process may:

1. `unshare_namespaces` (the spare, before it forks): a new user namespace
   mapping only its own uid (65534 outside: no other identity exists in it)
   gives it capabilities inside that namespace alone, and with them new
   mount, PID and IPC namespaces. Mounts become slaves, so nothing mounted
   here reaches the zygote or other executions.
2. `mount_proc` (PID 1 of the new PID namespace): a /proc that lists only
   this execution's processes.
3. `enter` (the execution process, once its job arrived): join the
   execution's cgroup through the `cgroup.procs` descriptors the daemon
   opened, mount a fresh size-capped tmpfs on /tmp (the working directory)
   and /dev/shm, bind its workflow's persistent directory and cover the
   zygote's view of every other one, then drop every capability for good.

Everything here runs before user code; errors propagate, and the caller
turns them into a boot failure, never a silently weaker execution.
"""

import ctypes
import os

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_RDONLY, MS_REMOUNT, MS_BIND = 0x1, 0x20, 0x1000
MS_REC, MS_SLAVE = 0x4000, 0x80000
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
INIT_NAME = b"wfd-init"
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
WORKDIR = "/tmp"
SCRATCH = ("/tmp", "/dev/shm")

_libc = ctypes.CDLL(None, use_errno=True)


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


def unshare_namespaces() -> None:
    """New user, mount, PID (for the next child) and IPC namespaces for this process.

    The user namespace maps only our own uid and gid to themselves, so the
    capabilities it grants reach nothing outside it, and no uid 0 exists in it.
    Mounts become slaves: nothing mounted here reaches the zygote, while a
    workflow directory the daemon mounts later still reaches this spare.
    """
    uid, gid = os.getuid(), os.getgid()
    _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC), "unshare")
    for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"),
                       ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as mapping:
            mapping.write(text)
    _mount("none", "/", None, MS_REC | MS_SLAVE)


def mount_proc() -> None:
    """Mount the /proc of the PID namespace this process is init of; hide this process.

    Non-dumpable: the execution, same uid but without capabilities, cannot
    read or trace its init through /proc/1. Named `wfd-init` there.
    """
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "PR_SET_DUMPABLE")
    _check(_libc.prctl(PR_SET_NAME, INIT_NAME, 0, 0, 0), "PR_SET_NAME")


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
    """Fresh scratch tmpfs mounts, the working directory, then no capabilities at all.

    A runtime bound under /tmp (a checkout or venv there) would vanish under
    the new tmpfs, so those binds are carried over onto it, read-only.
    `files` (PROTOCOL.md) names the workflow's directory to bind and the
    zygote's directory of all workflows, covered by an empty read-only tmpfs.
    """
    keep = _runtime_under(WORKDIR)
    try:
        for target in SCRATCH:
            _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV,
                   f"size={tmp_bytes},mode=1777")
        for path, fd in keep.items():
            os.makedirs(path, 0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            _mount("none", path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    finally:
        for fd in keep.values():
            os.close(fd)
    if files:
        mount_files(files)
    os.chdir(WORKDIR)
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
