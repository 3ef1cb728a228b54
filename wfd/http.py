"""The listeners: the catch app, /healthz for load balancers, /metrics for Prometheus."""

from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from wfd import metrics as metrics_module
from wfd.catch import CATCH_ROUTE, CatchHandler
from wfd.config import Config
from wfd.connections import ConnectionGuard
from wfd.delivery import Deliveries
from wfd.dispatch import Dispatcher
from wfd.metrics import Metrics
from wfd.store import Store

# /healthz's answer: the HTTP status and the JSON body.
Health = Callable[[], tuple[int, dict[str, Any]]]


async def healthz(request: web.Request) -> web.Response:
    health: Health = request.app["health"]
    code, body = health()
    return web.json_response(body, status=code)


async def metrics_page(request: web.Request) -> web.Response:
    metrics: Metrics = request.app["metrics"]
    return web.Response(body=metrics.exposition(),
                        headers={"Content-Type": metrics_module.CONTENT_TYPE})


def counted(metrics: Metrics) -> Middleware:
    """Middleware: count every response by route name and status code."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
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
              health: Health, metrics: Metrics, deliveries: Deliveries,
              guard: ConnectionGuard) -> web.Application:
    """The public listener: catch routes, plus /healthz and /metrics unless on admin_listen.

    Serve it on a `GuardedSite` with the same `guard`: its middleware tells
    the guard when a request's headers are complete.
    """
    app = web.Application(client_max_size=config.max_body_bytes,
                          middlewares=[guard.middleware, counted(metrics)])
    catch = CatchHandler(store, dispatcher, metrics, deliveries)
    app.router.add_route("*", CATCH_ROUTE, catch, name="catch")
    app.on_cleanup.append(lambda _: _closed(catch))
    if not config.admin_listen:
        add_admin_routes(app, health, metrics)
    return app


async def _closed(catch: CatchHandler) -> None:
    catch.close()


def add_admin_routes(app: web.Application, health: Health,
                     metrics: Metrics) -> None:
    app["health"] = health
    app["metrics"] = metrics
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/metrics", metrics_page, name="metrics")


def admin_app(health: Health, metrics: Metrics) -> web.Application:
    """The operator's listener, when `admin_listen` moves /healthz and /metrics there."""
    app = web.Application(middlewares=[counted(metrics)])
    add_admin_routes(app, health, metrics)
    return app
