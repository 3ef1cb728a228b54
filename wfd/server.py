"""The running daemon: wires the parts together and owns their lifecycle.

Start-up order: isolation detection (before the loop, see `serve`), the
executor (a zygote is exec'd before aiosqlite starts its thread), store
(migrations), the isolation self-test, control socket, HTTP listeners, and
only then "ready" (READY=1 to systemd). Shutdown (SIGTERM, SPEC 7) in order:
stop accepting catch requests, let running executions finish within
`grace_s`, interrupt the rest (recorded `interrupted`), close the control
socket and the listeners, close the store. SIGHUP re-reads the config file
and applies what can change without a restart.
"""

import asyncio
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

import aiosqlite
import uvloop
from aiohttp import web

from wfd import http, logs, sdnotify
from wfd.admission import Admission
from wfd.config import Config, ConfigError, split_host_port
from wfd.connections import ConnectionGuard, GuardedSite
from wfd.control.handlers import Commands
from wfd.control.server import ControlServer
from wfd.delivery import Deliveries
from wfd.dispatch import Dispatcher
from wfd.environments import Environments, prune_environments
from wfd.executor import make_executor
from wfd.executor.router import ExecutorRouter
from wfd.files import WorkflowFiles, private_mounts
from wfd.isolation import selftest
from wfd.isolation.layers import Isolation, IsolationError
from wfd.metrics import Metrics
from wfd.retention import Pruner
from wfd.scheduler import Scheduler
from wfd.store import ExecutionRecord, Store, StoreError
from wfd.storewatch import StoreWatch

# Keys a SIGHUP cannot apply: they are bound to open sockets, files,
# semaphores or the kind of executor. A changed value is logged as needing a
# restart and ignored.
RESTART_ONLY = ("listen", "admin_listen", "data_dir", "socket", "socket_group",
                "max_body_mb", "global_concurrency", "executor", "network", "require_cgroups",
                "keepalive_s")
# After the drain, how long the listeners give handlers to send their responses.
RESPONSE_FLUSH_S = 5.0
ENV_PRUNE_INTERVAL_S = 3600.0


class Daemon:
    """One wfd daemon. Constructing it touches nothing; `start` does.

    `loader` rebuilds the configuration from the same file and flags; it is
    what SIGHUP calls.
    """

    def __init__(self, config: Config, isolation: Isolation,
                 loader: Callable[[], Config] | None = None,
                 files: WorkflowFiles | None = None) -> None:
        self.config = config
        self.files = files or WorkflowFiles(config.files_root, images=False)
        self._loader = loader
        self.isolation = isolation
        self.self_test: dict[str, selftest.Check] = {}
        self.store = Store(config.db_path)
        self.environments = Environments(config.envs_root, isolation, config.envs_cache)
        self.executor = ExecutorRouter(config, isolation, self.environments, make_executor)
        self.admission = Admission(config.concurrency, config.queue_max,
                                   config.max_pending_bytes)
        self.metrics = Metrics()
        self.metrics.watch_admission(lambda: self.admission.waiting,
                                     lambda: self.admission.running)
        self.guard = ConnectionGuard(lambda: self.config, self.metrics)
        self.metrics.watch_clients(lambda: self.guard.open,
                                   lambda: self.admission.pending_bytes)
        self.dispatcher = Dispatcher(config, self.store, self.executor, self.admission,
                                     self.metrics, self.files, self.environments)
        self.scheduler = Scheduler(self.store, self.dispatcher, self.metrics)
        self.deliveries = Deliveries(self.store, self.dispatcher, self.metrics)
        self.metrics.watch_deliveries(self.deliveries.depth)
        self.pruner = Pruner(self.store, lambda: self.config.retention, metrics=self.metrics)
        self.storewatch = StoreWatch(self.store, self.metrics)
        self.commands = Commands(config, self.store, self.dispatcher, self.scheduler,
                                 self.status, self.deliveries)
        self.dispatcher.listeners += [self._count, self.pruner.note, self.commands.publish]
        self.control = ControlServer(config.socket_path, self.commands.table(),
                                     config.socket_group, self.metrics)
        self.state = "starting"
        self.started = time.monotonic()
        # Says which start of which daemon answers: `make run` compares the one
        # /healthz gives with the one its own daemon's socket gives.
        self.instance = secrets.token_hex(8)
        self._runners: list[web.AppRunner] = []
        self._background: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()

    def health(self) -> tuple[int, dict[str, Any]]:
        """/healthz: 200 while serving; 503 while starting, draining, or `degraded`.

        Degraded: serving, but the store cannot write (a full disk, a lock
        held too long), so executions would lose their records. It clears by
        itself at the first write that succeeds (wfd/storewatch.py).
        """
        layers = self.isolation.layers(self.executor.status()["executor"])
        active = [name for name, layer in layers.items() if layer["active"]]
        error = self.store.write_error
        state = "degraded" if self.state == "serving" and error else self.state
        return (200 if state == "serving" else 503), {
            "status": state,
            "instance": self.instance,
            "store": {"writable": error is None, "error": error},
            "isolation": {"mode": self.isolation.mode, "active": active,
                          "self_test": "failed" if selftest.failures(self.self_test)
                          else "passed"},
        }

    def status(self) -> dict[str, Any]:
        """The daemon's own part of `wfd ctl status`."""
        config = self.config
        executor = self.executor.status()
        return {
            "state": self.state,
            "pid": os.getpid(),
            "instance": self.instance,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "listen": config.listen,
            "admin_listen": config.admin_listen or None,
            "public_url": config.base_url,
            "team": config.team,
            "data_dir": str(config.data_dir.resolve()),
            "running": self.admission.running,
            "waiting": self.admission.waiting,
            "concurrency": self.admission.concurrency,
            "connections": self.guard.open,
            "max_connections": config.connection_limit,
            "pending_body_bytes": self.admission.pending_bytes,
            "workflow_files": self.files.describe(),
            **executor,
            "isolation": {"mode": self.isolation.mode,
                          "executor": executor["executor"],
                          "layers": self.isolation.layers(executor["executor"]),
                          "self_test": selftest.report(self.self_test)},
        }

    def _count(self, record: ExecutionRecord) -> None:
        self.metrics.execution_finished(record.workflow, record.status,
                                        record.duration_ms / 1000)

    async def start(self) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.config.data_dir, 0o700)
        # The zygote is exec'd before aiosqlite starts its thread (STYLE.md).
        await self.executor.start()
        await asyncio.to_thread(self.environments.start)
        await self.store.open()
        await self.check_isolation()
        await self.control.start()
        await self.scheduler.start()
        await self.deliveries.start()
        catch_app = http.catch_app(self.config, self.store, self.dispatcher, self.health,
                                   self.metrics, self.deliveries, self.guard)
        await self._listen(catch_app, self.config.listen, self.guard)
        if self.config.admin_listen:
            await self._listen(http.admin_app(self.health, self.metrics),
                               self.config.admin_listen)
        self.state = "serving"
        sdnotify.ready()
        sdnotify.status(f"serving on {self.config.listen}")
        logs.event("serving", listen=self.config.listen, socket=self.config.socket_path,
                   data_dir=self.config.data_dir, pid=os.getpid())

    async def check_isolation(self) -> None:
        """Prove the detected layers with a probe execution; strict refuses on a hole."""
        self.self_test = await selftest.run(self.executor, self.isolation, self.config)
        failed = selftest.failures(self.self_test)
        if not failed:
            logs.event("isolation", mode=self.isolation.mode, self_test="passed",
                       active=",".join(n for n, layer in self.isolation.layers().items()
                                       if layer["active"]))
            return
        detail = "; ".join(f"{name}: saw {self.self_test[name].seen!r}" for name in failed)
        if self.isolation.mode == "strict":
            raise IsolationError(f"isolation self-test failed, refusing to serve: {detail}")
        logs.event("isolation-self-test-failed", level=logging.ERROR, mode=self.isolation.mode,
                   serving="anyway", failed=detail)

    async def _listen(self, app: web.Application, address: str,
                      guard: ConnectionGuard | None = None) -> None:
        """Serve `app` on `address`; with `guard`, bounded connections and header deadline."""
        host, port = split_host_port(address)
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               shutdown_timeout=RESPONSE_FLUSH_S,
                               keepalive_timeout=self.config.keepalive_s)
        await runner.setup()
        self._runners.append(runner)
        site = (web.TCPSite(runner, host, port, reuse_address=True) if guard is None
                else GuardedSite(runner, host, port, guard, reuse_address=True))
        try:
            await site.start()
        except OSError as exc:  # taken, or not an address of this machine
            raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from None

    def request_stop(self, signum: int) -> None:
        """Signal handler: only records the request; the loop does the work."""
        if self._stop.is_set():
            os._exit(1)  # a second signal forces an immediate exit
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signum)
        # The handler only records the request; `_reloads` does the work.
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        interval = sdnotify.watchdog_interval()
        # Fed from the first moment: migrations and the drain can be long.
        watchdog = asyncio.create_task(sdnotify.feed_watchdog(interval)) if interval else None
        try:
            await self.start()
            self._spawn(self.pruner.run())
            self._spawn(self.storewatch.run())
            self._spawn(self._prune_environments())
            self._spawn(self._reloads())
            await self._stop.wait()
        finally:
            await self.shutdown()
            if watchdog is not None:
                watchdog.cancel()

    async def _prune_environments(self) -> None:
        """Hourly: remove environments unused for `env_keep_days` (a store error waits)."""
        while True:
            try:
                await prune_environments(self.store, self.environments,
                                         self.config.env_keep_days * 86400)
            except (OSError, StoreError, aiosqlite.Error) as exc:
                logs.event("environments-prune-failed", level=logging.WARNING, error=str(exc))
            await asyncio.sleep(ENV_PRUNE_INTERVAL_S)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        self._background.append(asyncio.create_task(work))

    async def shutdown(self) -> None:
        """Stop accepting, drain within the grace period, close the store."""
        self.state = "draining"
        sdnotify.stopping()
        logs.event("stopping", running=self.admission.running, waiting=self.admission.waiting,
                   grace_s=self.config.grace_s)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._stop_accepting()
        await self.scheduler.close()
        self.deliveries.stop_taking()
        interrupted = await self.dispatcher.drain(self.config.grace_s)
        await self.deliveries.close()
        self.commands.end_streams()
        await self.control.close()
        for runner in reversed(self._runners):
            await runner.cleanup()
        await self.executor.close()
        await self.store.close()
        await asyncio.to_thread(self.isolation.close)
        logs.event("stopped", interrupted=interrupted)

    async def _stop_accepting(self) -> None:
        """Close the catch listener; the admin one keeps answering 503 and metrics."""
        if self._runners:
            for site in list(self._runners[0].sites):
                await site.stop()

    async def _reloads(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            sdnotify.reloading()
            await self.reload()
            sdnotify.ready()

    async def reload(self) -> bool:
        """Re-read the configuration and apply it; False (old one kept) if it is broken."""
        if self._loader is None:
            return False
        try:
            new = await asyncio.to_thread(self._loader)
        except ConfigError as exc:
            logs.event("reload-failed", level=logging.ERROR, error=str(exc))
            return False
        fixed = [key for key in RESTART_ONLY if getattr(new, key) != getattr(self.config, key)]
        if fixed:
            logs.event("reload-needs-restart", level=logging.WARNING, keys=",".join(fixed))
            new = replace(new, **{key: getattr(self.config, key) for key in fixed})
        self._apply(new)
        logs.event("reloaded", log_level=new.log_level, queue_max=new.queue_max,
                   grace_s=new.grace_s)
        return True

    def _apply(self, config: Config) -> None:
        """Swap `config` into every part that reads it while running."""
        self.config = config
        self.dispatcher.config = config  # limits, and the catch routes' team
        self.commands.config = config
        self.admission.queue_max = config.queue_max
        self.admission.max_pending_bytes = config.max_pending_bytes
        self.executor.configure(config)  # idle and LRU bounds; restarts zygotes if changed
        logs.setup(config.log_format, config.log_level)
        self.pruner.wake()


def serve(config: Config, loader: Callable[[], Config] | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT; returns the exit code."""
    logs.setup(config.log_format, config.log_level)
    try:
        # Before the loop: detection may move this process between cgroups,
        # which must happen before any thread (aiosqlite) exists.
        files = WorkflowFiles(config.files_root, private_mounts(config.files_root))
        isolation = Isolation.detect(config.isolation, resolv_conf=config.network.resolv_conf,
                                     require_cgroups=config.require_cgroups)
        daemon = Daemon(config, isolation, loader, files)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(daemon.run())
    except (ConfigError, OSError, IsolationError) as exc:
        logs.event("cannot-start", level=logging.ERROR, error=str(exc))
        return 1
    return 0
