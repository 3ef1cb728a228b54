"""The HTTP side: catch routes, /healthz for load balancers, /metrics for Prometheus."""

import hmac
from collections.abc import Callable
from typing import Any

from aiohttp import web

from wfd import catch, ids, logs
from wfd import metrics as metrics_module
from wfd.admission import Overloaded
from wfd.config import Config
from wfd.dispatch import FAILURE_HTTP_STATUS, Dispatcher
from wfd.metrics import Metrics
from wfd.store import Store

CATCH_ROUTE = r"/teams/{team}/{name}/{runtime:python3\.\d+}/{key}"
# Compared against when a workflow is unknown, so both paths do the same work.
_NO_KEY = ids.catch_key()


class CatchHandler:
    """Answers `POST /teams/{team}/{name}/python3.{minor}/{key}`."""

    def __init__(self, store: Store, dispatcher: Dispatcher) -> None:
        self.store = store
        self.dispatcher = dispatcher

    @property
    def config(self) -> Config:
        """The dispatcher's, so that a SIGHUP reload reaches the catch routes too."""
        return self.dispatcher.config

    async def __call__(self, request: web.Request) -> web.Response:
        execution_id = ids.execution_id()
        if request.method != "POST":
            return catch.json_reply(405, "method_not_allowed", execution_id, {"Allow": "POST"})
        info = request.match_info
        workflow = await self.store.workflow(info["name"])
        key_ok = hmac.compare_digest(info["key"].encode(),
                                     (workflow.catch_key if workflow else _NO_KEY).encode())
        if not (key_ok and workflow and workflow.enabled and workflow.kind == "catch"
                and info["team"] == self.config.team):
            return catch.json_reply(404, "not_found", execution_id)
        content_type = self._content_type(request)
        if content_type not in catch.ACCEPTED_TYPES:
            return catch.json_reply(415, "unsupported_media_type", execution_id)
        if (request.content_length or 0) > self.config.max_body_bytes:
            return catch.json_reply(413, "payload_too_large", execution_id)
        try:
            reservation = self.dispatcher.reserve(workflow)
        except Overloaded:
            logs.event("overloaded", workflow=workflow.name, id=execution_id)
            return catch.json_reply(503, "overloaded", execution_id, {"Retry-After": "1"})
        try:
            fields = catch.header_fields(request.raw_headers)
            fields.update(self._query(request))
            fields.update(await catch.body_fields(request, content_type))
        except web.HTTPRequestEntityTooLarge:
            reservation.cancel()
            return catch.json_reply(413, "payload_too_large", execution_id)
        except catch.BadRequest:
            reservation.cancel()
            return catch.json_reply(400, "bad_request", execution_id)
        except BaseException:
            reservation.cancel()
            raise
        executed = await self.dispatcher.execute(workflow, "catch", fields, reservation,
                                                 execution_id)
        return reply(executed.record.status, executed.record.http_status, executed.response,
                     execution_id)

    @staticmethod
    def _content_type(request: web.Request) -> str:
        declared = request.headers.get("Content-Type", "")
        return declared.split(";", 1)[0].strip().lower()

    @staticmethod
    def _query(request: web.Request) -> dict[str, Any]:
        query = request.query
        return {name: values[0] if len(values) == 1 else values
                for name in query for values in [query.getall(name)]}


def reply(status: str, http_status: int | None, response: dict[str, Any] | None,
          execution_id: str) -> web.Response:
    """The caller's response for a finished catch execution."""
    if response is not None:
        return catch.workflow_reply(response, execution_id)
    code = http_status or FAILURE_HTTP_STATUS.get(status, 500)
    return catch.json_reply(code, status, execution_id)


async def healthz(request: web.Request) -> web.Response:
    health: Callable[[], tuple[int, dict]] = request.app["health"]
    code, body = health()
    return web.json_response(body, status=code)


async def metrics_page(request: web.Request) -> web.Response:
    metrics: Metrics = request.app["metrics"]
    return web.Response(body=metrics.exposition(),
                        headers={"Content-Type": metrics_module.CONTENT_TYPE})


def counted(metrics: Metrics) -> Callable:
    """Middleware: count every response by route name and status code."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
        route = request.match_info.route.name or "other"
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            metrics.http_response(route, exc.status)
            raise
        except Exception:
            metrics.http_response(route, 500)
            raise
        metrics.http_response(route, response.status)
        return response

    return middleware


def catch_app(config: Config, store: Store, dispatcher: Dispatcher,
              health: Callable[[], tuple[int, dict]], metrics: Metrics) -> web.Application:
    """The public listener: catch routes, plus /healthz and /metrics unless on admin_listen."""
    app = web.Application(client_max_size=config.max_body_bytes,
                          middlewares=[counted(metrics)])
    app.router.add_route("*", CATCH_ROUTE, CatchHandler(store, dispatcher), name="catch")
    if not config.admin_listen:
        add_admin_routes(app, health, metrics)
    return app


def add_admin_routes(app: web.Application, health: Callable[[], tuple[int, dict]],
                     metrics: Metrics) -> None:
    app["health"] = health
    app["metrics"] = metrics
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/metrics", metrics_page, name="metrics")


def admin_app(health: Callable[[], tuple[int, dict]], metrics: Metrics) -> web.Application:
    """The operator's listener, when `admin_listen` moves /healthz and /metrics there."""
    app = web.Application(middlewares=[counted(metrics)])
    add_admin_routes(app, health, metrics)
    return app
