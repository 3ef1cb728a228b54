"""The control socket's wire protocol, shared by the daemon and `wfd ctl`.

One JSON object per line each way: `{"id", "command", "args"}` in,
`{"id", "ok", "result" | "error"}` out. A streaming command (`follow`) first
sends any number of `{"id", "ok": true, "item"}` lines, then that same final
line. Standard library only: the client imports it and must start fast.
"""

import re
from typing import Any

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


MAX_REQUEST_BYTES = 64 * 1024 * 1024


EXPORT_FORMAT = "wfd-export/1"


class CommandError(Exception):
    """A command that cannot be carried out; the message is shown to the operator."""


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise CommandError(f"invalid workflow name {name!r}: use 1 to 63 of a-z, 0-9, _ and -, "
                           "starting with a letter or digit")
    return name
