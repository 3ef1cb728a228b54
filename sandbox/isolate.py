"""The isolation hook of a forked execution: a no-op today, on purpose.

A child forked by the zygote calls `enter(job)` once it holds only its own
file descriptors and has read its job, and before it makes its working
directory, applies its rlimits and runs user code. This is where the
sandbox hardening goes: unshare a new mount and PID namespace, mount a
private tmpfs on /tmp, join the execution's cgroup, drop to an unprivileged
uid. Keeping the place named and fixed now lets that work slot in without
touching the fork protocol.
"""


def enter(job: dict) -> None:
    """Move this process into the execution's own isolation (nothing yet)."""
