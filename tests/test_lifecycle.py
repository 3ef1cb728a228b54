"""A real `wfd serve` under signals: systemd notifications, SIGTERM drain, SIGHUP reload.

These drive the daemon as systemd would: a datagram socket named by
NOTIFY_SOCKET stands in for systemd, and signals are real signals.
"""

import itertools
import json
import os
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import wait_for

_unique = itertools.count()

# Sleeps, then records that it finished in its settings. While it sleeps, a
# `sleep` process whose command line carries a unique marker shows that the
# execution is running, and that nothing it started outlives it.
SLOW = """
import subprocess
def workflow(_request, settings):
    subprocess.run(["sleep", _request["seconds"]])
    settings["finished"] = settings.get("finished", 0) + 1
"""


def marked_processes(marker: str) -> list[int]:
    """Pids whose command line contains `marker` (a unique `sleep` duration)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry.name))
    return found


def unique_seconds(whole: int) -> str:
    """A `sleep` argument of about `whole` s, unique to this test, for marked_processes."""
    return f"{whole}.{os.getpid() % 1000:03d}{next(_unique):03d}1"


def post_in_background(url: str, body: dict) -> dict:
    """POST from a thread; the dict gets the response (or the exception) when it ends."""
    outcome: dict = {}

    def send() -> None:
        try:
            outcome["response"] = requests.post(url, json=body, timeout=60)
        except requests.RequestException as exc:
            outcome["error"] = exc

    outcome["thread"] = threading.Thread(target=send, daemon=True)
    outcome["thread"].start()
    return outcome


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    path = f"{tempfile.gettempdir()}/wfd-notify-{os.getpid()}-{threading.get_ident()}.sock"
    Path(path).unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield path, sock
    sock.close()
    Path(path).unlink(missing_ok=True)


def receive_until(sock: socket.socket, wanted: str, within_s: float = 30) -> list[str]:
    """Datagrams received up to and including the first equal to `wanted`.

    Bounded: the watchdog's datagrams keep coming, so without a deadline a
    lost `wanted` would wait for ever instead of failing.
    """
    messages: list[str] = []
    deadline = time.monotonic() + within_s
    while not messages or messages[-1] != wanted:
        assert time.monotonic() < deadline, f"no {wanted} within {within_s} s: {messages[-10:]}"
        messages.append(sock.recv(4096).decode())
    return messages


def test_ready_watchdog_reload_and_stopping_reach_systemd(make_daemon, notify_socket, name):
    path, systemd = notify_socket
    daemon = make_daemon(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    before_ready = receive_until(systemd, "READY=1")
    assert set(before_ready) <= {"WATCHDOG=1", "READY=1"}
    # 0.2 s watchdog: fed every 0.1 s from the event loop, after READY too.
    fed = [systemd.recv(4096) for _ in range(3)]
    assert set(fed) <= {b"WATCHDOG=1", b"STATUS=serving on " + f"127.0.0.1:{daemon.port}".encode()}
    assert fed.count(b"WATCHDOG=1") >= 2

    daemon.process.send_signal(signal.SIGHUP)
    reload = [m for m in receive_until(systemd, "READY=1") if m != "WATCHDOG=1"]
    assert len(reload) == 2 and re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", reload[0])

    # The children get none of it: they cannot speak for the daemon.
    url = daemon.deploy(name, """
        import os
        def workflow(_request, settings):
            return {"status_code": 200, "body": repr(os.environ.get("NOTIFY_SOCKET"))}
        """)
    assert requests.post(url, json={}).text == "None"

    daemon.process.send_signal(signal.SIGTERM)
    stopping = receive_until(systemd, "STOPPING=1")
    assert set(stopping) <= {"WATCHDOG=1", "STOPPING=1"}
    assert daemon.process.wait(15) == 0


def test_sigterm_lets_a_running_execution_finish_within_the_grace_period(make_daemon, name):
    daemon = make_daemon(config="grace_s = 20\n")
    url = daemon.deploy(name, SLOW)
    seconds = unique_seconds(2)
    call = post_in_background(url, {"seconds": seconds})
    wait_for(lambda: marked_processes(seconds), what="the execution to start")

    daemon.process.send_signal(signal.SIGTERM)
    wait_for(lambda: _refused(url), what="the catch listener to close")
    assert call["thread"].is_alive()  # closed at once, not after the drain
    call["thread"].join(30)
    response = call["response"]
    assert response.status_code == 200
    assert response.json()["status"] == "success"
    assert daemon.process.wait(15) == 0
    assert "stopped interrupted=0" in daemon.log()

    restarted = make_daemon(data_dir=daemon.data_dir)
    assert restarted.ctl_json("settings", name) == {"finished": 1}
    [record] = restarted.executions(name)
    assert (record["id"], record["status"]) == (response.headers["X-Wfd-Execution-Id"],
                                               "success")


def test_an_execution_past_the_grace_period_is_killed_and_recorded_interrupted(
        make_daemon, name):
    daemon = make_daemon(config="grace_s = 1\n[limits]\ntimeout_s = 120\n", admin=True)
    url = daemon.deploy(name, SLOW)
    seconds = unique_seconds(90)
    call = post_in_background(url, {"seconds": seconds})
    wait_for(lambda: marked_processes(seconds), what="the execution to start")

    daemon.process.send_signal(signal.SIGTERM)
    health = wait_for(lambda: _status(f"{daemon.admin_base}/healthz") == 503,
                      what="/healthz to report draining")
    assert health
    call["thread"].join(30)
    response = call["response"]
    execution_id = response.headers["X-Wfd-Execution-Id"]
    assert response.status_code == 503
    assert response.json() == {"status": "interrupted", "execution_id": execution_id}
    assert daemon.process.wait(15) == 0
    assert marked_processes(seconds) == []  # its whole process group was killed

    restarted = make_daemon(data_dir=daemon.data_dir)
    assert restarted.ctl_json("settings", name) == {}
    record = restarted.logs(execution_id)
    assert (record["status"], record["http_status"]) == ("interrupted", 503)
    assert "grace period" in record["error"]


def test_sighup_changes_a_limit_live(make_daemon, name):
    daemon = make_daemon(config="[limits]\ntimeout_s = 1\n")
    daemon.deploy(name, SLOW)
    run = daemon.ctl("run", name, "--data", '{"seconds": "1.5"}', check=False)
    assert (run.returncode, ": timeout (" in run.stdout) == (4, True)

    assert "DEBUG" not in daemon.log()
    daemon.config_file.write_text('log_level = "debug"\n[limits]\ntimeout_s = 5\n')
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.ctl_json("show", name)["effective_limits"]["timeout_s"] == 5,
             what="the reloaded timeout")
    run = daemon.ctl("run", name, "--data", '{"seconds": "1.5"}')
    assert ": success (" in run.stdout
    assert daemon.ctl_json("settings", name) == {"finished": 1}
    assert "DEBUG ctl command=run" in daemon.log()  # the log level changed too


def test_sighup_keeps_the_old_config_when_the_new_one_is_broken(make_daemon, name):
    daemon = make_daemon(config="queue_max = 7\n[limits]\ntimeout_s = 3\n")
    daemon.deploy(name, SLOW)
    daemon.config_file.write_text("[limits]\ntimeout_s = 9\ntypo_key = 1\n")
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload-failed" in daemon.log(), what="the reload to fail")
    assert "typo_key" in daemon.log()
    assert daemon.ctl_json("show", name)["effective_limits"]["timeout_s"] == 3

    # The body limit is the listener's: it changes only with a restart.
    daemon.config_file.write_text("max_body_mb = 0.001\n[limits]\ntimeout_s = 4\n")
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.ctl_json("show", name)["effective_limits"]["timeout_s"] == 4,
             what="the reloaded timeout")
    assert re.search(r"WARNING reload-needs-restart keys=max_body_mb\b", daemon.log())
    url = daemon.ctl("url", name).stdout.strip()
    response = requests.post(url, json={"seconds": "0", "pad": "x" * 4096})
    assert response.status_code == 200


def test_json_log_has_one_object_per_event_and_no_secrets(make_daemon, name):
    daemon = make_daemon(extra_args=("--log-format", "json"))
    url = daemon.deploy(name, """
        def workflow(_request, settings):
            settings["token"] = "hunter2-settings-" + _request["password"]
            print("hunter2-printed")
        """)
    daemon.ctl("settings", name, "set", "API_KEY=hunter2-stored")
    assert requests.post(url, json={"password": "hunter2-body"}).status_code == 200
    key = url.rsplit("/", 1)[1]
    assert daemon.stop() == 0
    lines = [json.loads(line) for line in daemon.log().splitlines()]
    events = [line["event"] for line in lines]
    assert "serving" in events and events[-2:] == ["stopping", "stopped"]
    [execution] = [line for line in lines if line["event"] == "execution"]
    assert execution["workflow"] == name
    assert (execution["status"], execution["http"], execution["trigger"]) == (
        "success", 200, "catch")
    text = daemon.log()
    for secret in ("hunter2", key):
        assert secret not in text


def _refused(url: str) -> bool:
    """True once nothing listens at `url` (GET: a probe that starts no execution)."""
    try:
        requests.get(url, timeout=2)
    except requests.ConnectionError:
        return True
    return False


def _status(url: str) -> int | None:
    try:
        return requests.get(url, timeout=2).status_code
    except requests.ConnectionError:
        return None
