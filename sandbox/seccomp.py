"""A seccomp filter that forbids an execution to make namespaces of its own.

Without it an unprivileged process may create a user namespace, gain every
capability inside it and, with them, mount a tmpfs of any size (past the
`/tmp` cap), make a network namespace, and so on. The filter is installed by
the execution itself, after the sandbox is built and before user code runs;
seccomp filters are inherited by every child and can never be removed.

It answers, for the native architecture only:
- `unshare` and `clone` with any CLONE_NEW* flag: EPERM;
- `clone3`: ENOSYS, since its flags sit in memory a filter cannot read;
  glibc then falls back to `clone` (threads and `fork` keep working);
- `setns`: EPERM;
- any system call of another ABI (x32 on x86_64, i386 via `int 0x80`): EPERM,
  so the numbers above cannot be dodged.
Everything else is allowed.
"""

import ctypes
import errno
import platform
import struct

# Per architecture: AUDIT_ARCH_*, and the numbers of unshare, clone, clone3, setns.
ARCHES = {
    "x86_64": (0xC000003E, {"unshare": 272, "clone": 56, "clone3": 435, "setns": 308}),
    "aarch64": (0xC00000B7, {"unshare": 97, "clone": 220, "clone3": 435, "setns": 268}),
}
X32_SYSCALL_BIT = 0x40000000
CLONE_NEWTIME = 0x00000080  # unshare only: in clone's flags these bits are the exit signal
CLONE_NEW = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000  # NS, CGROUP, UTS, IPC
             | 0x10000000 | 0x20000000 | 0x40000000)  # USER, PID, NET

# Classic BPF.
LD_W_ABS = 0x20
JEQ_K, JGE_K, JSET_K = 0x15, 0x35, 0x45
RET_K = 0x06
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
# struct seccomp_data: nr (u32), arch (u32), instruction_pointer (u64), args[6] (u64).
NR, ARCH, ARG0_LOW = 0, 4, 16
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


def program(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions, for `machine` (default: this one)."""
    machine = machine or platform.machine()
    if machine not in ARCHES:
        raise OSError(errno.ENOSYS, f"no namespace filter for architecture {machine}")
    audit_arch, nr = ARCHES[machine]
    eperm, enosys, allow = RET_ERRNO | errno.EPERM, RET_ERRNO | errno.ENOSYS, RET_ALLOW
    # A jump skips jt (true) or jf (false) instructions; comments name the targets.
    return [
        (LD_W_ABS, 0, 0, ARCH),
        (JEQ_K, 1, 0, audit_arch),          # native: go on
        (RET_K, 0, 0, eperm),                # another ABI
        (LD_W_ABS, 0, 0, NR),
        (JGE_K, 0, 1, X32_SYSCALL_BIT),
        (RET_K, 0, 0, eperm),                # x32
        (JEQ_K, 4, 0, nr["unshare"]),        # -> 11
        (JEQ_K, 5, 0, nr["clone"]),          # -> 13
        (JEQ_K, 8, 0, nr["clone3"]),         # -> 17: ENOSYS
        (JEQ_K, 6, 0, nr["setns"]),          # -> 16: EPERM
        (RET_K, 0, 0, allow),
        (LD_W_ABS, 0, 0, ARG0_LOW),          # unshare(flags)
        (JSET_K, 3, 2, CLONE_NEW | CLONE_NEWTIME),  # -> 16 / 15
        (LD_W_ABS, 0, 0, ARG0_LOW),          # clone(flags, ...)
        (JSET_K, 1, 0, CLONE_NEW),           # -> 16 / 15
        (RET_K, 0, 0, allow),
        (RET_K, 0, 0, eperm),
        (RET_K, 0, 0, enosys),
    ]  # fmt: skip


_installed = False


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def forbid_namespaces() -> None:
    """Install the filter on this process (and so on all it will start). Needs no_new_privs.

    Once per process: a sandboxed spare installs it while it waits for its
    job (sandbox/spare.py), and the job's own request is then already met.
    """
    global _installed
    if _installed:
        return
    instructions = program()
    code = b"".join(struct.pack("=HBBI", *op) for op in instructions)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = _Fprog(len(instructions), ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"installing the namespace filter: {errno.errorcode.get(error)}")
    _installed = True
