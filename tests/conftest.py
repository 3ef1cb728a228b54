"""Fixtures that run the real thing: `wfd serve` as a subprocess, real HTTP, real socket.

Most tests share one daemon per session (`daemon`) and give each workflow a
unique name; tests that restart, kill or reconfigure a daemon make their own
with `make_daemon`. Stand-ins for the outside world (HrFlow's API, a file
server) are real HTTP servers on loopback (`standin`).
"""

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

_counter = itertools.count()


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> Any:
    """Poll until `predicate()` is truthy and return its value; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Daemon:
    """A `wfd serve` process with helpers to drive it as a user would."""

    def __init__(self, data_dir: Path, config: str = "", extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, admin: bool = False,
                 prefix: tuple[str, ...] = ()):
        self.data_dir = data_dir
        self.port = free_port()
        # With `admin`, /healthz and /metrics move to their own port (admin_listen).
        self.admin_port = free_port() if admin else None
        self.env = {**os.environ, **(env or {})}
        # Unix socket paths must stay short: keep them out of pytest's tmp tree.
        self.socket = f"{tempfile.gettempdir()}/wfd-{os.getpid()}-{next(_counter)}.sock"
        self.config_file = data_dir.parent / f"{data_dir.name}.toml"
        self.config_file.write_text(config)
        self.log_file = data_dir.parent / f"{data_dir.name}.log"
        self.extra_args = extra_args
        # A command the daemon runs under, e.g. `unshare --pid --fork`.
        self.prefix = prefix
        self.process: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_base(self) -> str:
        """Where /healthz and /metrics are served."""
        return f"http://127.0.0.1:{self.admin_port}" if self.admin_port else self.base

    def spawn(self) -> subprocess.Popen:
        """Start `wfd serve` without waiting for it to be healthy."""
        log = self.log_file.open("ab")
        admin = ("--admin-listen", f"127.0.0.1:{self.admin_port}") if self.admin_port else ()
        self.process = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "wfd", "serve", "--config", str(self.config_file),
             "--data-dir", str(self.data_dir), "--listen", f"127.0.0.1:{self.port}",
             "--socket", self.socket, *admin, *self.extra_args],
            stdout=log, stderr=log, start_new_session=True, env=self.env)
        log.close()
        return self.process

    def start(self) -> "Daemon":
        self.spawn()
        wait_for(self._healthy, timeout=15, what=f"daemon on port {self.port}")
        return self

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
        try:
            return requests.get(f"{self.admin_base}/healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the daemon and wait for it; returns its exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        code = self.process.wait(timeout)
        return code

    def kill(self) -> None:
        """SIGKILL the daemon (its whole session, as a crash or OOM kill would)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    # -- wfd ctl --------------------------------------------------------------

    def ctl(self, *args: str, check: bool = True, stdin: str | None = None
            ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "wfd", "ctl", "--socket", self.socket, *args],
            capture_output=True, text=True, timeout=120, input=stdin)
        if check and result.returncode != 0:
            raise AssertionError(f"wfd ctl {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def ctl_json(self, *args: str) -> Any:
        return json.loads(self.ctl(*args, "--json").stdout)

    def deploy(self, name: str, code: str, *flags: str, kind: str = "--catch") -> str | None:
        """Deploy `code` (dedented) and return the catch URL (None for pull)."""
        path = self.data_dir.parent / f"{name}-{next(_counter)}.py"
        path.write_text(textwrap.dedent(code))
        self.ctl("deploy", name, str(path), kind, *flags)
        return self.ctl("url", name).stdout.strip() if kind == "--catch" else None

    def executions(self, name: str, limit: int = 20) -> list[dict]:
        return self.ctl_json("executions", name, "--limit", str(limit))

    def logs(self, execution_id: str) -> dict:
        return self.ctl_json("logs", execution_id)


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory: `make_daemon(config="...")` starts a daemon with its own data dir."""
    started: list[Daemon] = []

    def make(config: str = "", data_dir: Path | None = None, start: bool = True,
             extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
             admin: bool = False, prefix: tuple[str, ...] = ()) -> Daemon:
        daemon = Daemon(data_dir or tmp_path / f"data{len(started)}", config, extra_args,
                        env, admin, prefix)
        started.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in started:
        daemon.kill()


@pytest.fixture(scope="session", params=["zygote", "spawn"])
def daemon(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon per executor, shared by the tests that only deploy and call workflows.

    Each such test runs against both ways an execution starts (forked from
    the zygote, or a fresh interpreter): they must behave exactly alike.
    """
    shared = Daemon(tmp_path_factory.mktemp(f"shared-{request.param}") / "data",
                    f'executor = "{request.param}"\n[limits]\ntimeout_s = 5\n').start()
    yield shared
    shared.kill()


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A workflow name unique to this test."""
    base = request.node.name.lower().replace("[", "-").replace("]", "")
    cleaned = "".join(c if c.isalnum() or c in "-_" else "-" for c in base)
    return f"{cleaned[:50]}-{next(_counter)}"


class StandIn:
    """A local HTTP server standing in for a customer system or HrFlow's API.

    `routes[(method, path)]` gives `(status, headers, body)`, or a callable
    taking the recorded request and returning that; every request is recorded.
    """

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Any] = {}
        self.requests: list[dict[str, Any]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                path, _, query = self.path.partition("?")
                record = {"method": self.command, "path": path, "query": query,
                          "headers": dict(self.headers), "body": self.rfile.read(length)}
                stand_in.requests.append(record)
                route = stand_in.routes.get((self.command, path))
                if route is None:
                    status, headers, body = 404, {}, b"not found"
                else:
                    status, headers, body = route(record) if callable(route) else route
                if isinstance(body, str):
                    body = body.encode()
                elif not isinstance(body, bytes):
                    body = json.dumps(body).encode()
                    headers = {"Content-Type": "application/json", **headers}
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # What a workflow calling it must be deployed with (executions do not
        # reach the host's loopback otherwise): `deploy(..., *server.allow_net)`.
        self.allow_net = ("--allow-net", f"127.0.0.1/32:{self.server.server_address[1]}")
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def standin() -> Iterator[Callable[[], StandIn]]:
    """Factory of stand-in servers, shut down after the test."""
    servers: list[StandIn] = []

    def make() -> StandIn:
        servers.append(StandIn())
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.fixture(scope="session")
def uv_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uv package cache for every daemon that builds environments (`env_cache_dir`)."""
    return tmp_path_factory.mktemp("uv-cache")
