"""The running daemon: wires the parts together and owns their lifecycle.

Start-up order: store (migrations), control socket, HTTP listeners, and only
then "ready". Shutdown runs the same steps backwards: stop accepting, let
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

from wfd import http, logs
from wfd.admission import Admission
from wfd.config import Config, ConfigError, split_host_port
from wfd.control import Commands, ControlServer
from wfd.dispatch import Dispatcher
from wfd.executor import SpawnExecutor
from wfd.store import Store


class Daemon:
    """One wfd daemon. Constructing it touches nothing; `start` does."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.db_path)
        self.executor = SpawnExecutor()
        self.admission = Admission(config.concurrency, config.queue_max)
        self.dispatcher = Dispatcher(config, self.store, self.executor, self.admission)
        commands = Commands(config, self.store, self.dispatcher, self.status)
        self.control = ControlServer(config.socket_path, commands, config.socket_group)
        self.state = "starting"
        self.started = time.monotonic()
        self._runners: list[web.AppRunner] = []
        self._stop = asyncio.Event()

    def health(self) -> tuple[int, dict[str, Any]]:
        """/healthz: 200 while serving, 503 while starting or draining."""
        return (200 if self.state == "serving" else 503), {"status": self.state}

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
        }

    async def start(self) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.config.data_dir, 0o700)
        await self.store.open()
        await self.control.start()
        catch_app = http.catch_app(self.config, self.store, self.dispatcher, self.health)
        await self._listen(catch_app, self.config.listen)
        if self.config.admin_listen:
            await self._listen(http.admin_app(self.health), self.config.admin_listen)
        self.state = "serving"
        logs.event("serving", listen=self.config.listen, socket=self.config.socket_path,
                   data_dir=self.config.data_dir, pid=os.getpid())

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

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signum)
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, drain within the grace period, close the store."""
        self.state = "draining"
        logs.event("stopping", running=self.admission.running)
        await self.control.close()
        for runner in reversed(self._runners):
            await runner.cleanup()
        await self.store.close()
        logs.event("stopped")


def serve(config: Config, config_path: str | Path | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT; returns the exit code."""
    logs.setup(config.log_format, config.log_level)
    daemon = Daemon(config)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(daemon.run())
    except (ConfigError, OSError) as exc:
        logs.logger.error("cannot start: %s", exc)
        return 1
    return 0
