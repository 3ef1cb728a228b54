"""The running daemon: wires the parts together and owns their lifecycle.

Start-up order: isolation detection (before the loop, see `serve`), the
executor (a zygote is exec'd before aiosqlite starts its thread), store
(migrations), the isolation self-test, control socket, HTTP listeners, and
only then "ready". Shutdown runs the same steps backwards: stop accepting, let
running executions finish within the grace period, close the store.
"""

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from wfd import config as config_module
from wfd import http, logs, selftest
from wfd.admission import Admission
from wfd.config import Config, ConfigError, split_host_port
from wfd.control import Commands, ControlServer
from wfd.dispatch import Dispatcher
from wfd.executor import Executor, SpawnExecutor
from wfd.isolation import Isolation, IsolationError
from wfd.scheduler import Scheduler
from wfd.store import Store
from wfd.zygote import ZygoteExecutor


def make_executor(config: Config, isolation: Isolation) -> Executor:
    """The executor the config names; constructing it starts nothing.

    The zygote's children do not have the sandbox's layers (bwrap, a cgroup)
    yet, so where any is on, executions cold-spawn inside them rather than
    run with less isolation than the operator asked for.
    """
    if config.executor == "spawn" or isolation.sandboxed or isolation.backend is not None:
        if config.executor == "zygote":
            logs.event("zygote-not-isolated", level=30, isolation=isolation.mode,
                       executor="spawn")
        return SpawnExecutor(isolation)
    return ZygoteExecutor(config.preload, config.spares_min, config.spares_max,
                          isolation=isolation)


class Daemon:
    """One wfd daemon. Constructing it touches nothing; `start` does."""

    def __init__(self, config: Config, isolation: Isolation,
                 config_path: str | Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.isolation = isolation
        self.self_test: dict[str, selftest.Check] = {}
        self.store = Store(config.db_path)
        self.executor = make_executor(config, isolation)
        self.admission = Admission(config.concurrency, config.queue_max)
        self.dispatcher = Dispatcher(config, self.store, self.executor, self.admission)
        self.scheduler = Scheduler(self.store, self.dispatcher)
        commands = Commands(config, self.store, self.dispatcher, self.scheduler, self.status)
        self.control = ControlServer(config.socket_path, commands, config.socket_group)
        self.state = "starting"
        self.started = time.monotonic()
        self._runners: list[web.AppRunner] = []
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()

    def health(self) -> tuple[int, dict[str, Any]]:
        """/healthz: 200 while serving, 503 while starting or draining; active layers."""
        active = [name for name, layer in self.isolation.layers().items() if layer["active"]]
        return (200 if self.state == "serving" else 503), {
            "status": self.state,
            "isolation": {"mode": self.isolation.mode, "active": active,
                          "self_test": "failed" if selftest.failures(self.self_test)
                          else "passed"},
        }

    def status(self) -> dict[str, Any]:
        """The daemon's own part of `wfd ctl status`."""
        config = self.config
        return {
            "state": self.state,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "listen": config.listen,
            "admin_listen": config.admin_listen or None,
            "public_url": config.base_url,
            "team": config.team,
            "data_dir": str(config.data_dir.resolve()),
            "running": self.admission.running,
            "waiting": self.admission.waiting,
            "concurrency": self.admission.concurrency,
            **self.executor.status(),
            "isolation": {"mode": self.isolation.mode,
                          "executor": self.executor.status()["executor"],
                          "layers": self.isolation.layers(),
                          "self_test": selftest.report(self.self_test)},
        }

    async def start(self) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.config.data_dir, 0o700)
        # The zygote is exec'd before aiosqlite starts its thread (STYLE.md).
        await self.executor.start()
        await self.store.open()
        await self.check_isolation()
        await self.control.start()
        await self.scheduler.start()
        catch_app = http.catch_app(self.config, self.store, self.dispatcher, self.health)
        await self._listen(catch_app, self.config.listen)
        if self.config.admin_listen:
            await self._listen(http.admin_app(self.health), self.config.admin_listen)
        self.state = "serving"
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
        logs.logger.error("ISOLATION SELF-TEST FAILED (isolation = %r, serving anyway): %s",
                          self.isolation.mode, detail)

    async def _listen(self, app: web.Application, address: str) -> None:
        host, port = split_host_port(address)
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               shutdown_timeout=self.config.grace_s)
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, host, port, reuse_address=True).start()

    def request_stop(self, signum: int) -> None:
        """Signal handler: only records the request; the loop does the work."""
        if self._stop.is_set():
            os._exit(1)  # a second signal forces an immediate exit
        self._stop.set()

    def request_reload(self) -> None:
        """SIGHUP handler: only records the request; `_reloader` does the work."""
        self._reload.set()

    async def _reloader(self) -> None:
        """On SIGHUP, re-read the config file's zygote keys (the others need a restart)."""
        while True:
            await self._reload.wait()
            self._reload.clear()
            if self.config_path is None:
                logs.event("reload-skipped", reason="no config file")
                continue
            try:
                fresh = await asyncio.to_thread(config_module.load, Path(self.config_path))
            except ConfigError as exc:
                logs.event("reload-failed", error=str(exc))
                continue
            if isinstance(self.executor, ZygoteExecutor):
                self.executor.configure(fresh.preload, fresh.spares_min, fresh.spares_max)
            logs.event("reloaded", preload=",".join(fresh.preload))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        reloader = asyncio.create_task(self._reloader())
        try:
            await self.start()
            await self._stop.wait()
        finally:
            reloader.cancel()
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, drain within the grace period, close the store."""
        self.state = "draining"
        logs.event("stopping", running=self.admission.running)
        await self.control.close()
        await self.scheduler.close()
        for runner in reversed(self._runners):
            await runner.cleanup()
        await self.executor.close()
        await self.store.close()
        await asyncio.to_thread(self.isolation.close)
        logs.event("stopped")


def serve(config: Config, config_path: str | Path | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT; returns the exit code."""
    logs.setup(config.log_format, config.log_level)
    try:
        # Before the loop: detection may move this process between cgroups,
        # which must happen before any thread (aiosqlite) exists.
        daemon = Daemon(config, Isolation.detect(config.isolation), config_path)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(daemon.run())
    except (ConfigError, OSError, IsolationError) as exc:
        logs.logger.error("cannot start: %s", exc)
        return 1
    return 0
