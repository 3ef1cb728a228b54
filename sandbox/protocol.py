"""What the daemon (`wfd`) and the child (`sandbox`) must agree on: numbers, names, JSON.

PROTOCOL.md beside this file is the contract in words; this module is its
one source, imported by both sides instead of copied: the constants, and
the JSON codec every document between them is written in. It imports the
standard library (and orjson where it is installed) and nothing else of
`sandbox`, so the daemon loads nothing of the child's by importing it.
"""

import json
import re
from collections.abc import Iterable
from typing import Any, NamedTuple

try:
    import orjson
except ImportError:  # a workflow environment without it: the standard library does it all
    orjson = None  # type: ignore[assignment]

# The `protocol` field of every job; bumped on a change the other side must know of.
VERSION = 1

# Exit codes of an execution that ended before its workflow could run. They
# mean "boot failed", never that the workflow failed.
EXIT_BOOT_FAILED = 70  # the job could not be read, its limits or isolation not applied
EXIT_JOIN_FAILED = 125  # the process could not join its cgroup
# A zygote whose preload (or isolation check) failed: restarting it at once
# would fail the same way.
EXIT_ZYGOTE_BOOT_FAILED = 71
# In sandbox mode an exit 128 + N means a death by signal N: bwrap reports a
# cold child's so, and a forked execution (its namespace's PID 1) ends so on
# SIGXCPU (sandbox/limits.py).
SIGNAL_EXIT_BASE = 128

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


# -- The JSON codec --------------------------------------------------------
# Settings and requests cross three boundaries (HTTP or ctl, the store, the
# child) and must arrive as they left: integers of any size exact, valid
# UTF-8 only, nesting bounded. orjson is fast but reads an integer beyond 64
# bits as a float, silently, and refuses to write one; the standard library
# keeps them exact but is several times slower. So orjson does the work and
# the standard library takes over only where orjson would be wrong: when the
# text holds a run of 19 or more digits (the only place a number out of
# 64-bit range can hide; digits inside a string only cost the slower path),
# or when orjson refuses a value. The daemon uses the codec for everything
# it stores and sends, so that what the child reads is what was stored.

# orjson reads at most 1024 levels and writes at most this many; the
# daemon's own limit (`max_json_depth`) is far below both.
ORJSON_WRITE_DEPTH = 254
_LONG_NUMBER = re.compile(rb"\d{19}")


class CodecError(ValueError):
    """A document that cannot be read, or a value that cannot be written; the message says why."""


def loads(data: bytes | bytearray | str, max_depth: int | None = None) -> Any:
    """Parse JSON (valid UTF-8, no NaN) with integers of any size kept exact.

    With `max_depth`, a document nested deeper is refused. orjson refuses
    anything deeper than 1024 levels while parsing, so the check never
    walks more than orjson was willing to build.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    value: Any = None
    if orjson is not None:
        try:
            value = orjson.loads(data)  # validates: UTF-8, surrogates, NaN, its own depth limit
        except orjson.JSONDecodeError as exc:
            raise CodecError(str(exc)) from None
    if orjson is None or _LONG_NUMBER.search(data):
        value = _stdlib_loads(data)
    if max_depth is not None:
        check_depth(value, max_depth)
    return value


def _stdlib_loads(data: bytes | bytearray) -> Any:
    try:
        return json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise CodecError("nested too deeply to read") from None
    except ValueError as exc:  # not JSON, or not UTF-8
        raise CodecError(str(exc)) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def dumps(value: Any) -> bytes:
    """Encode `value` as compact UTF-8 JSON, integers of any size exact.

    Raises CodecError for what no reader could take back: strings that are
    not valid UTF-8 (lone surrogates), NaN, nesting beyond what orjson reads.
    """
    if orjson is not None:
        try:
            return orjson.dumps(value)
        except TypeError:
            pass  # an integer beyond 64 bits, or a value nobody can encode: find out which
    check_depth(value, ORJSON_WRITE_DEPTH)
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise CodecError("a string is not valid UTF-8") from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise CodecError(str(exc)) from None


def depth(value: Any, limit: int) -> int:
    """How deeply `value` nests lists and dicts (a scalar is 0), up to `limit` + 1 at most."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        stack.extend((child, level + 1) for child in children
                     if isinstance(child, dict | list | tuple))
    return deepest


def check_depth(value: Any, limit: int) -> None:
    if depth(value, limit) > limit:
        raise CodecError(f"nested deeper than {limit} levels")
