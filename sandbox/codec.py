"""JSON that keeps integers exact, read and written the same way on both sides.

Settings and requests cross three boundaries (HTTP or ctl, the store, the
child) and must arrive as they left. orjson is fast but reads an integer
beyond 64 bits as a float, silently, and refuses to write one; the standard
library keeps them exact but is several times slower. So orjson does the
work and the standard library takes over only where orjson would be wrong:
when the text holds a run of 19 or more digits (the only place a number out
of 64-bit range can hide; digits inside a string only cost the slower path),
or when orjson refuses a value it cannot encode.

The daemon imports this module as well as the child (PROTOCOL.md): the two
must agree on the format, so it is written once.
"""

import json
import re
from collections.abc import Iterable
from typing import Any

import orjson

# orjson reads at most this many levels and writes at most ORJSON_WRITE_DEPTH;
# the daemon's own limit (`max_json_depth`) is far below both.
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
    try:
        value = orjson.loads(data)  # validates: UTF-8, surrogates, NaN, its own depth limit
    except orjson.JSONDecodeError as exc:
        raise CodecError(str(exc)) from None
    if _LONG_NUMBER.search(data):
        try:
            value = json.loads(data)
        except RecursionError:
            raise CodecError("nested too deeply to read") from None
    if max_depth is not None:
        check_depth(value, max_depth)
    return value


def dumps(value: Any) -> bytes:
    """Encode `value` as compact UTF-8 JSON, integers of any size exact.

    Raises CodecError for what no reader could take back: strings that are
    not valid UTF-8 (lone surrogates), NaN, nesting beyond what orjson reads.
    """
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
