"""Resource limits, applied to the execution process before user code runs."""

import contextlib
import ctypes
import functools
import os
import resource
import signal
from typing import Any

from sandbox import protocol

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
INIT_PID = 1


def apply(limits: dict[str, Any]) -> None:
    """Set the rlimits a job asks for, and tie the process to its parent.

    RLIMIT_DATA rather than RLIMIT_AS bounds memory: threaded libraries reserve
    large virtual areas they never touch, which RLIMIT_AS would refuse. The CPU
    hard limit sits one second above the soft one so the kernel first sends
    SIGXCPU (recorded as `cpu`) and only kills outright a workflow that
    ignores it.
    """
    memory = limits["memory_bytes"]
    cpu = limits["cpu_s"]
    resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    if limits["processes"] is not None:  # None: a pids cgroup bounds the execution
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Over-sized writes then fail with EFBIG (an OSError the workflow sees)
    # instead of killing the process with no explanation.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if os.getpid() == INIT_PID:
        # A forked sandboxed execution is its PID namespace's init, which the
        # kernel spares the default of SIGXCPU: end as that default would,
        # reported as bwrap reports a death by signal.
        signal.signal(signal.SIGXCPU, _out_of_cpu)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    forbid_new_privileges()


def forbid_new_privileges() -> None:
    """no_new_privs: no exec gains privileges again (setuid, file capabilities)."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def _out_of_cpu(signum: int, _frame: object) -> None:
    os._exit(protocol.SIGNAL_EXIT_BASE + signum)


def die_with_parent(parent: int) -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies.

    Returns False when the parent is already gone (the process was
    re-parented before the request took effect): the caller should exit.
    """
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    return os.getppid() == parent


def _prctl(option: int, value: int) -> None:
    """Best effort: only Linux has prctl, and a failure weakens nothing else."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().prctl(option, value, 0, 0, 0)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
