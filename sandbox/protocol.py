"""The numbers and names the daemon (`wfd`) and the child (`sandbox`) must agree on.

PROTOCOL.md beside this file is the contract in words; this module is its
one source of constants, imported by both sides instead of copied. It
imports only the standard library and nothing else of `sandbox`, so the
daemon loads nothing of the child's by importing it.
"""

from typing import NamedTuple

# The `protocol` field of every job; bumped on a change the other side must know of.
VERSION = 1

# Exit codes of an execution that ended before its workflow could run. They
# mean "boot failed", never that the workflow failed.
EXIT_BOOT_FAILED = 70  # the job could not be read, its limits or isolation not applied
EXIT_JOIN_FAILED = 125  # the process could not join its cgroup
# A zygote whose preload (or isolation check) failed: restarting it at once
# would fail the same way.
EXIT_ZYGOTE_BOOT_FAILED = 71

# A `run` message to the zygote carries the job's pipes in this order, then
# one `cgroup.procs` descriptor per cgroup hierarchy (v1 has up to three:
# pids, memory, cpu).
PIPES = ("job", "output", "result")
MAX_CGROUP_FDS = 4
MAX_RUN_FDS = len(PIPES) + MAX_CGROUP_FDS
# A forked child holds the job on fd 0, the output on 1 and 2, the result here.
RESULT_FD = 3
# The largest message on the daemon-zygote channel (one SOCK_SEQPACKET datagram).
MESSAGE_BYTES = 65536

# The zygote's modes: under bubblewrap, each execution in namespaces of its
# own; or plain, each in a directory under the zygote's WORKDIRS.
MODE_SANDBOX = "sandbox"
MODE_PLAIN = "plain"
# What the daemon runs with `python -I -m`: a cold child, and the zygote.
CHILD_MODULE = "sandbox"
ZYGOTE_MODULE = "sandbox.zygote"


class ZygoteArgs(NamedTuple):
    """The zygote's command-line arguments, in their order on the command line."""

    mode: str
    channel_fd: int
    workdirs: str
    spares_min: int
    spares_max: int
    preload: tuple[str, ...]

    def argv(self) -> list[str]:
        """The arguments after `python -I -m sandbox.zygote`."""
        return [self.mode, str(self.channel_fd), self.workdirs, str(self.spares_min),
                str(self.spares_max), *self.preload]

    @classmethod
    def parse(cls, argv: list[str]) -> "ZygoteArgs":
        """The inverse of `argv`."""
        mode, channel_fd, workdirs, low, high, *preload = argv
        return cls(mode, int(channel_fd), workdirs, int(low), int(high), tuple(preload))
