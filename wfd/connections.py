"""The catch listener's connections: how many, and how long headers may take (SPEC 8).

aiohttp closes idle keep-alive connections (`keepalive_timeout`, our
`keepalive_s`) and the catch handler bounds the body (`body_timeout_s`).
What aiohttp lacks is a bound on connections and a deadline for a request's
headers, the two things a slowloris client exploits. `GuardedSite` puts a
thin protocol in front of aiohttp's on each connection:
- past `max_connections` a new connection is answered 503 and closed before
  aiohttp sees it, so the daemon never runs out of descriptors (the
  descriptor is held for the microseconds it takes to write 19 bytes);
- a connection has `header_timeout_s` to complete a request's headers,
  counted from when it opens, or from the first byte of the next request on
  a kept-alive one; otherwise it is answered 408 and closed.
"""

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_protocol import RequestHandler

from wfd.config import Config
from wfd.metrics import Metrics

REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
           b"Content-Length: 0\r\n\r\n")
HEADERS_TOO_SLOW = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                    b"Content-Length: 0\r\n\r\n")


class ConnectionGuard:
    """Counts the catch listener's connections and times their headers.

    `config` is a callable so that a SIGHUP reload reaches a running listener.
    """

    def __init__(self, config: Callable[[], Config], metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self.open = 0
        self._by_handler: dict[RequestHandler, _Guarded] = {}

    def protocol(self, make_handler: Callable[[], RequestHandler]) -> "_Guarded":
        return _Guarded(self, make_handler)

    @property
    def middleware(self) -> Middleware:
        """Marks a connection busy while its request is handled: its headers are in."""

        @web.middleware
        async def headers_complete(request: web.Request, handler: Handler
                                   ) -> web.StreamResponse:
            connection = self._by_handler.get(request.protocol)
            if connection is None:
                return await handler(request)
            connection.busy = True
            connection.disarm()
            try:
                return await handler(request)
            finally:
                connection.busy = False

        return headers_complete


class _Guarded(asyncio.Protocol):
    """One connection: refused, or aiohttp's protocol with a header deadline."""

    def __init__(self, guard: ConnectionGuard, make_handler: Callable[[], RequestHandler]
                 ) -> None:
        self._guard = guard
        self._make_handler = make_handler
        self._inner: RequestHandler | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        self._transport = transport  # type: ignore[assignment]
        if guard.open >= guard._config().connection_limit:
            guard._metrics.connection_refused()
            transport.write(REFUSED)  # type: ignore[attr-defined]
            transport.close()
            return
        guard.open += 1
        self._inner = self._make_handler()
        guard._by_handler[self._inner] = self
        self._inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if not self.busy and self._timer is None:
            self._arm()  # the first bytes of a next request
        self._inner.data_received(data)

    def eof_received(self) -> None:
        if self._inner is not None:
            self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        self.disarm()
        self._guard.open -= 1
        self._guard._by_handler.pop(self._inner, None)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def _arm(self) -> None:
        timeout = self._guard._config().header_timeout_s
        self._timer = asyncio.get_running_loop().call_later(timeout, self._headers_too_slow)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_too_slow(self) -> None:
        self._timer = None
        transport = self._transport
        if self.busy or transport is None or transport.is_closing():
            return
        self._guard._metrics.client_timeout("header")
        transport.write(HEADERS_TOO_SLOW)
        transport.close()


class GuardedSite(web.TCPSite):
    """aiohttp's TCP site, with each connection's protocol wrapped by a ConnectionGuard.

    `start` is TCPSite's with the protocol factory wrapped; aiohttp offers
    no public hook for it (tests/test_hostile_clients.py guards the result).
    """

    def __init__(self, runner: web.BaseRunner, host: str, port: int,
                 guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: self._guard.protocol(server), self._host, self._port,
            backlog=self._backlog, reuse_address=self._reuse_address)
