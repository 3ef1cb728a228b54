"""The control socket's server: one connection, one JSON line per request.

Handlers return plain data; formatting is the client's job. Anyone who can
connect is an administrator, so the socket is created mode 0600 (0660 with
`socket_group`) before it accepts anything.
"""

import asyncio
import contextlib
import grp
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from sandbox import protocol
from wfd import logs
from wfd.config import ConfigError
from wfd.control.protocol import MAX_REQUEST_BYTES, CommandError
from wfd.metrics import Metrics
from wfd.store import StoreError, WriteFailed


class ControlServer:
    """Serves a table of command handlers on a unix socket, one JSON line per request."""

    def __init__(self, path: Path, commands: Mapping[str, Callable[..., Awaitable[Any]]],
                 group: str = "", metrics: Metrics | None = None) -> None:
        self.path = path
        self.commands = commands
        self.group = group
        self.metrics = metrics or Metrics()
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._clear_stale()
        old_umask = os.umask(0o177)  # the socket is born 0600: no window for others
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path,
                                                           limit=MAX_REQUEST_BYTES)
        finally:
            os.umask(old_umask)
        if self.group:
            os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
            os.chmod(self.path, 0o660)

    def _clear_stale(self) -> None:
        """Remove a socket left by a dead daemon; refuse to steal a live one's."""
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            self.path.unlink(missing_ok=True)
            return
        finally:
            probe.close()
        raise ConfigError(f"another wfd daemon is serving {self.path}")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                answer = await self._answer(line)
                if isinstance(answer.get("result"), AsyncGenerator):
                    answer = await self._stream(answer["id"], answer["result"], reader, writer)
                writer.write(protocol.dumps(answer) + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass  # a client that hung up or sent a line over the limit
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _stream(self, request_id: Any, items: AsyncGenerator[dict[str, Any], None],
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> dict[str, Any]:
        """Send each item as `{"id", "ok", "item"}`; return the final reply line.

        The connection is the stream's alone: anything the client sends, or
        its hanging up, ends the stream at once (even while nothing happens).
        """
        hangup = asyncio.ensure_future(reader.read(1))
        try:
            while True:
                item = asyncio.ensure_future(anext(items))
                await asyncio.wait({item, hangup}, return_when=asyncio.FIRST_COMPLETED)
                if not item.done():
                    item.cancel()
                    await asyncio.wait({item})  # the generator must stop before aclose
                    raise ConnectionResetError("the client hung up")
                writer.write(protocol.dumps({"id": request_id, "ok": True,
                                          "item": item.result()}) + b"\n")
                await writer.drain()
        except StopAsyncIteration:
            return {"id": request_id, "ok": True, "result": None}
        except CommandError as exc:
            return {"id": request_id, "ok": False, "error": str(exc)}
        finally:
            hangup.cancel()
            # Let the cancelled read end before the connection reads its next line.
            await asyncio.wait({hangup})
            await items.aclose()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        request_id = command = None
        try:
            request = protocol.loads(line)
            request_id, command = request.get("id"), request.get("command")
            handler = self.commands.get(command)
            if handler is None:
                raise CommandError(f"unknown command {command!r}")
            args = request.get("args") or {}
            started = time.perf_counter()
            result = await handler(**args)
            logs.event("ctl", level=logging.DEBUG, command=command,
                       ms=round((time.perf_counter() - started) * 1000, 1))
            return {"id": request_id, "ok": True, "result": result}
        except (CommandError, StoreError, ConfigError) as exc:
            return {"id": request_id, "ok": False, "error": str(exc)}
        except WriteFailed as exc:
            self.metrics.store_error("ctl")
            logs.event("store-error", level=logging.ERROR, operation="ctl",
                       command=request.get("command"), error=str(exc))
            return {"id": request_id, "ok": False,
                    "error": f"the store cannot write now ({exc}); nothing was changed, "
                             "try again"}
        except (protocol.CodecError, AttributeError, TypeError) as exc:
            return {"id": request_id, "ok": False, "error": f"malformed request: {exc}"}
        except Exception as exc:
            logs.event("ctl-failed", level=logging.ERROR, exc_info=True, command=command)
            return {"id": request_id, "ok": False, "error": f"internal error: {exc}"}
