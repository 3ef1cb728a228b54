"""The `wfd ctl` side of the control socket: send a request, read its replies.

Standard library only, like everything `wfd ctl` imports.
"""

import json
import socket
from collections.abc import Iterator
from typing import Any

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_EXECUTION_FAILED = 0, 1, 2, 3, 4
DEFAULT_SOCKET = "wfd-data/wfd.sock"


class CtlError(Exception):
    """A command that failed; `exit_code` says how, the message says why."""

    exit_code = EXIT_REFUSED


class NotRunning(CtlError):
    """Nothing answers on the control socket."""

    exit_code = EXIT_NOT_RUNNING


class Refused(CtlError):
    """The daemon answered with an error."""


def replies(socket_path: str, command: str, **args: Any) -> Iterator[dict[str, Any]]:
    """Send one command; yield each reply line: stream items, then the final reply."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(socket_path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        client.close()
        raise NotRunning(f"wfd is not running (no daemon at {socket_path}: "
                         f"{exc.strerror})") from None
    with client, client.makefile("rb") as lines:
        client.sendall(json.dumps({"id": 1, "command": command, "args": args}).encode() + b"\n")
        for line in lines:
            reply = json.loads(line)
            yield reply
            if "item" not in reply:
                return
    raise Refused("the daemon closed the connection without answering")


def final(reply: dict[str, Any]) -> Any:
    """The result of a final reply line; raises Refused for an error."""
    if not reply.get("ok"):
        raise Refused(reply.get("error", "unknown error"))
    return reply.get("result")


def call(socket_path: str, command: str, **args: Any) -> Any:
    """Send one command and return its result; raises NotRunning or Refused."""
    *_, last = replies(socket_path, command, **args)
    return final(last)


