"""Hostile clients (SPEC 8): slow senders, floods, big bodies, pipelining, bad responses.

Each test attacks a real daemon over loopback the way a careless or hostile
holder of a catch URL would, with small timeouts so that it ends fast, and
checks what the attacker and an innocent caller of another workflow see.
"""

import contextlib
import http.client
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests
from conftest import Daemon, wait_for

FAST = 'def workflow(_request, settings):\n    return {"status_code": 200, "body": "fast"}\n'
SLEEPY = """
import time
def workflow(_request, settings):
    time.sleep(1)
    return {"status_code": 200, "body": "slept"}
"""
MIB = 1024 * 1024


def raw_post(url: str, body: bytes = b"{}", declared: int | None = None,
             content_type: str = "application/json") -> bytes:
    """The bytes of a POST to `url` (path only), declaring `declared` bytes of body."""
    path = urlsplit(url).path
    length = len(body) if declared is None else declared
    return (f"POST {path} HTTP/1.1\r\nHost: wfd\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode() + body


def connect(daemon: Daemon) -> socket.socket:
    return socket.create_connection(("127.0.0.1", daemon.port), timeout=30)


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the daemon sends until it closes, and how long that took."""
    started, data = time.monotonic(), b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data, time.monotonic() - started


def metric(daemon: Daemon, name: str) -> float:
    """One sample of /metrics (0 when absent)."""
    text = requests.get(f"{daemon.admin_base}/metrics", timeout=5).text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def open_fds(daemon: Daemon) -> int:
    return len(os.listdir(f"/proc/{daemon.process.pid}/fd"))


@contextlib.contextmanager
def sockets(count: int, daemon: Daemon) -> Iterator[list[socket.socket]]:
    opened = [connect(daemon) for _ in range(count)]
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


def test_stalled_bodies_hold_no_slot_and_get_408(make_daemon) -> None:
    """100 bodies that stop after 10 bytes: B answers meanwhile; they get 408 and are closed."""
    daemon = make_daemon('body_timeout_s = 3\nglobal_concurrency = 2\nqueue_max = 50\n',
                         admin=True)
    slow, fast = daemon.deploy("stalled", FAST), daemon.deploy("innocent", FAST)
    with sockets(100, daemon) as stalled:
        started = time.monotonic()
        for sock in stalled:
            sock.sendall(raw_post(slow, b'{"a": "123', declared=1000))
        wait_for(lambda: metric(daemon, "wfd_pending_body_bytes") == 100 * 1000,
                 what="every stalled body being read")
        before = time.monotonic()
        answer = requests.post(fast, json={}, timeout=10)
        assert answer.status_code == 200 and answer.text == "fast"
        assert time.monotonic() - before < 2
        for sock in stalled:
            data, _ = read_until_closed(sock)
            assert data.startswith(b"HTTP/1.1 408 "), data[:100]
            assert b'"status":"request_timeout"' in data
        # Each stalled caller was answered at body_timeout_s after its headers.
        assert 3 <= time.monotonic() - started < 3 + 2
    assert metric(daemon, 'wfd_client_timeouts_total{phase="body"}') == 100
    assert metric(daemon, "wfd_pending_body_bytes") == 0
    assert daemon.executions("stalled") == []


def test_unfinished_headers_are_answered_408_and_closed(make_daemon) -> None:
    daemon = make_daemon("header_timeout_s = 1\nkeepalive_s = 30\n", admin=True)
    with connect(daemon) as sock:
        sock.sendall(b"POST /teams/default/x/python3.11/k HTTP/1.1\r\nHost: wfd\r\nX-A: ")
        data, took = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert 0.9 <= took < 2
    with connect(daemon) as silent:  # a connection that never sends a byte
        data, took = read_until_closed(silent)
    assert data.startswith(b"HTTP/1.1 408 ") and 0.9 <= took < 2
    assert metric(daemon, 'wfd_client_timeouts_total{phase="header"}') == 2


def test_header_deadline_restarts_for_the_next_request_on_a_connection(make_daemon) -> None:
    """A kept-alive connection may idle, then has header_timeout_s for its next headers."""
    daemon = make_daemon("header_timeout_s = 1\nkeepalive_s = 30\n")
    url = daemon.deploy("kept", FAST)
    with connect(daemon) as sock:
        sock.sendall(raw_post(url))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        time.sleep(1.5)  # idle past header_timeout_s: allowed, keepalive_s rules here
        sock.sendall(raw_post(url)[:20])
        data, took = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408 ") and 0.9 <= took < 2


def test_idle_keepalive_connections_close_at_keepalive_s(make_daemon) -> None:
    daemon = make_daemon("keepalive_s = 1\nheader_timeout_s = 10\n")
    url = daemon.deploy("idle", FAST)
    with connect(daemon) as sock:
        sock.sendall(raw_post(url))
        data, took = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"fast")
    assert 0.9 <= took < 2


def test_connections_past_max_are_refused_early(make_daemon) -> None:
    daemon = make_daemon("max_connections = 20\nheader_timeout_s = 60\n", admin=True)
    url = daemon.deploy("crowded", FAST)
    session = requests.Session()
    assert session.post(url, json={}, timeout=5).status_code == 200  # one kept-alive
    fds_before = open_fds(daemon)
    with sockets(19, daemon):
        wait_for(lambda: metric(daemon, "wfd_open_connections") == 20, what="20 connections")
        with sockets(30, daemon) as refused:
            for sock in refused:
                data, took = read_until_closed(sock)
                assert data.startswith(b"HTTP/1.1 503 ") and took < 1
        # The caller already connected is still served, and nothing leaked.
        assert session.post(url, json={}, timeout=5).text == "fast"
        assert open_fds(daemon) <= fds_before + 19 + 2
    assert metric(daemon, "wfd_connections_refused_total") == 30
    wait_for(lambda: metric(daemon, "wfd_open_connections") == 1, what="idle ones closed")
    assert requests.post(url, json={}, timeout=5).text == "fast"  # a new connection again
    session.close()


def test_default_max_connections_follows_the_descriptor_limit(make_daemon) -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    daemon = make_daemon("global_concurrency = 4\n")
    assert daemon.ctl_json("status")["max_connections"] == soft - 128 - 8 * 4


def test_pending_body_bytes_are_bounded(make_daemon) -> None:
    """Past max_pending_mb a request answers 503 before its body is read; small ones fit."""
    daemon = make_daemon("max_body_mb = 0.5\nmax_pending_mb = 1\nbody_timeout_s = 30\n",
                         admin=True)
    url = daemon.deploy("budget", FAST)
    with sockets(2, daemon) as stalled:
        for sock in stalled:
            sock.sendall(raw_post(url, b"{", declared=400 * 1024))
        wait_for(lambda: metric(daemon, "wfd_pending_body_bytes") == 800 * 1024,
                 what="two bodies being read")
        with connect(daemon) as third:
            third.sendall(raw_post(url, b"", declared=400 * 1024))  # headers only
            answer = http.client.HTTPResponse(third)
            answer.begin()
            assert (answer.status, answer.getheader("Retry-After")) == (503, "1")
            assert b'"status":"overloaded"' in answer.read()
            third.settimeout(2)
            assert third.recv(1) == b""  # closed: the refused body is not read
        assert requests.post(url, json={"small": 1}, timeout=5).text == "fast"
    wait_for(lambda: metric(daemon, "wfd_pending_body_bytes") == 0, what="budget released")


def test_big_bodies_parse_off_the_event_loop(make_daemon) -> None:
    """Six 10 MiB urlencoded bodies parsing: a trivial request still answers fast.

    Parsed on the event loop, each would stop every other request for ~2 s.
    """
    # Slots enough for all: what is measured is parsing, not waiting for a slot.
    daemon = make_daemon("global_concurrency = 8\n[limits]\nmemory_mb = 1024\ntimeout_s = 60\n")
    big, trivial = daemon.deploy("big", FAST), daemon.deploy("trivial", FAST)
    form = b"&".join(b"f%07d=v" % i for i in range(10 * MIB // 11))
    assert 9.5 * MIB < len(form) <= 10 * MIB
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    done: list[float] = []

    def send_big() -> int:
        status = requests.post(big, data=form, headers=headers, timeout=120).status_code
        done.append(time.monotonic())
        return status

    with ThreadPoolExecutor(6) as pool:
        started = time.monotonic()
        results = [pool.submit(send_big) for _ in range(6)]
        latencies = []
        while not done and time.monotonic() - started < 60:
            before = time.monotonic()
            assert requests.get(daemon.base + "/healthz", timeout=30).ok
            mid = time.monotonic()
            assert requests.post(trivial, json={}, timeout=30).text == "fast"
            latencies.append((mid - before, time.monotonic() - mid))
        assert [r.result() for r in results] == [200] * 6
    assert len(latencies) >= 3, "the big bodies parsed before the trivial requests ran"
    # The event loop answers at once; the trivial workflow's own child then
    # competes for two cores with six children decoding 10 MiB each (about
    # 2 s here), where parsing on the loop delayed it by 11 s. One body
    # parsed on the loop stops it for about 2 s; with six busy children on
    # two cores, scheduling alone delays an answer by up to about 0.5 s.
    assert max(loop for loop, _ in latencies) < 1.0, latencies
    assert max(execution for _, execution in latencies) < 5.0, latencies


def test_a_flood_on_one_workflow_delays_another_by_about_one_execution(make_daemon) -> None:
    """global_concurrency = 2, 20 requests to A waiting: B waits for one slot, not 10 s."""
    daemon = make_daemon("global_concurrency = 2\n")
    flooded, other = daemon.deploy("flooded", SLEEPY), daemon.deploy("other", SLEEPY)
    with ThreadPoolExecutor(20) as pool:
        flood = [pool.submit(requests.post, flooded, json={}, timeout=60) for _ in range(20)]
        wait_for(lambda: daemon.ctl_json("status")["waiting"] >= 17, what="A's queue")
        before = time.monotonic()
        assert requests.post(other, json={}, timeout=60).text == "slept"
        took = time.monotonic() - before
        assert all(f.result().status_code == 200 for f in flood)
    # One execution of B (1 s), after at most one of A's per slot (1 s).
    assert 1 <= took < 2.8, took


def test_a_flood_that_fills_the_queue_does_not_shut_out_another_workflow(make_daemon) -> None:
    daemon = make_daemon("global_concurrency = 1\nqueue_max = 4\n")
    flooded, other = daemon.deploy("flooded", SLEEPY), daemon.deploy("other", FAST)
    with ThreadPoolExecutor(8) as pool:
        flood = [pool.submit(requests.post, flooded, json={}, timeout=60) for _ in range(8)]
        wait_for(lambda: daemon.ctl_json("status")["waiting"] == 4, what="a full queue")
        assert requests.post(other, json={}, timeout=30).text == "fast"
        codes = sorted(f.result().status_code for f in flood)
    assert codes == [200] * 5 + [503] * 3  # one running, four queued, the rest refused


def test_timer_runs_take_their_turn_during_a_flood(make_daemon) -> None:
    daemon = make_daemon("global_concurrency = 1\n")
    flooded = daemon.deploy("flooded", SLEEPY)
    with ThreadPoolExecutor(10) as pool:
        flood = [pool.submit(requests.post, flooded, json={}, timeout=60) for _ in range(10)]
        wait_for(lambda: daemon.ctl_json("status")["waiting"] >= 8, what="A's queue")
        daemon.deploy("ticker", "def workflow(settings):\n    pass\n", "--every", "1s",
                      kind="--pull")
        wait_for(lambda: [r for r in daemon.executions("ticker") if r["status"] == "success"],
                 timeout=5, what="a pull run")
        assert sum(not f.done() for f in flood) >= 4, "the tick waited for the whole flood"
        for f in flood:
            f.result()


def test_pipelined_requests_are_answered_in_order(daemon: Daemon, name: str) -> None:
    url = daemon.deploy(name, """
        def workflow(_request, settings):
            return {"status_code": 200, "body": "n=" + str(_request["n"])}
    """)
    wrong_key = url[:-4] + "abcd"
    batch = (raw_post(url, b'{"n": 1}') + raw_post(wrong_key, b'{"n": 2}')
             + raw_post(url, b'{"n": 3}'))
    with connect(daemon) as sock:
        sock.sendall(batch)
        data = b""
        while b"n=3" not in data and (chunk := sock.recv(65536)):
            data += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", data)
    assert statuses == [b"200", b"404", b"200"]
    assert data.index(b"n=1") < data.index(b"not_found") < data.index(b"n=3")


BAD_RESPONSES = [
    ('{"status_code": 100, "body": ""}', "status_code must be between 200 and 599, got 100"),
    ('{"status_code": 101, "body": ""}', "status_code must be between 200 and 599, got 101"),
    ('{"status_code": 200, "body": "", "headers": {"X Bad": "1"}}',
     "header name 'X Bad' is not an RFC 9110 token"),
    ('{"status_code": 200, "body": "", "headers": {"X-Split:": "1"}}',
     "header name 'X-Split:' is not an RFC 9110 token"),
    ('{"status_code": 200, "body": "", "headers": {"X-V": "a\\x0bb"}}',
     "header 'X-V' has a control character in its value (only HTAB is allowed)"),
    ('{"status_code": 200, "body": "", "headers": {"X-V": "a\\x1b[31m"}}',
     "header 'X-V' has a control character in its value (only HTAB is allowed)"),
]


@pytest.mark.parametrize(("returned", "rule"), BAD_RESPONSES)
def test_unsendable_responses_fail_the_execution(daemon: Daemon, name: str, returned: str,
                                                 rule: str) -> None:
    url = daemon.deploy(name, f"def workflow(_request, settings):\n    return {returned}\n")
    answer = requests.post(url, json={}, timeout=10)
    assert answer.status_code == 500
    execution_id = answer.headers["X-Wfd-Execution-Id"]
    assert answer.json() == {"status": "error", "execution_id": execution_id}
    record = daemon.logs(execution_id)
    assert (record["status"], record["http_status"]) == ("error", 500)
    assert record["error"] == f"invalid response: {rule}"


def test_a_forged_response_splitting_header_is_refused(daemon: Daemon, name: str) -> None:
    """The child refuses CR/LF itself; a forged result bypassing it meets the daemon's rule."""
    url = daemon.deploy(name, FORGE + """
def workflow(_request, settings):
    forge({"status_code": 200, "body": "", "headers": {"X-V": "a\\r\\nSet-Cookie: x=1"}})
""")
    answer = requests.post(url, json={}, timeout=10)
    assert answer.status_code == 500 and "Set-Cookie" not in answer.headers
    record = daemon.logs(answer.headers["X-Wfd-Execution-Id"])
    assert record["error"] == ("invalid response: header 'X-V' has a control character in "
                               "its value (only HTAB is allowed)")


# Writes a result of the workflow's own making on the result pipe (the one
# writable pipe past stdout and stderr), bypassing the child's checks.
FORGE = """
import json, os, stat
def forge(response):
    forged = {"outcome": "success", "settings": {"set": {}, "unset": []}, "response": response}
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if fd > 2 and stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.write(fd, json.dumps(forged).encode())
        except OSError:
            pass
    os._exit(0)
"""


def test_a_forged_result_is_checked_by_the_daemon(daemon: Daemon, name: str) -> None:
    """A workflow writing its own result past the child's checks still gets 500."""
    url = daemon.deploy(name, FORGE + """
def workflow(_request, settings):
    forge({"status_code": 200, "body": "", "headers": {"A B": "x"}})
""")
    answer = requests.post(url, json={}, timeout=10)
    assert answer.status_code == 500
    record = daemon.logs(answer.headers["X-Wfd-Execution-Id"])
    assert record["error"] == "invalid response: header name 'A B' is not an RFC 9110 token"


def test_a_tab_in_a_header_value_is_sent(daemon: Daemon, name: str) -> None:
    url = daemon.deploy(name, 'def workflow(_request, settings):\n'
                              '    return {"status_code": 201, "body": "", '
                              '"headers": {"X-Tabbed": "a\\tb"}}\n')
    answer = requests.post(url, json={}, timeout=10)
    assert answer.status_code == 201 and answer.headers["X-Tabbed"] == "a\tb"


TERMINAL_ATTACK = "\x1b]52;c;ZXZpbA==\x07\rstatus: success\x1b[2K\x9b"


def run_on_terminal(daemon: Daemon, *args: str, until: str | None = None) -> str:
    """`wfd ctl ARGS` with its stdout on a pseudo-terminal; what the terminal received.

    With `until`, the command is interrupted (Ctrl-C) once that text arrived.
    """
    import pty
    import signal
    import subprocess
    import sys

    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "wfd", "ctl", "--socket", daemon.socket,
                                *args], stdout=follower, stderr=subprocess.DEVNULL)
    os.close(follower)
    received = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal's other end closed: the command ended
                break
            received += chunk
            if until is not None and until.encode() in received:
                process.send_signal(signal.SIGINT)
                until = None
    finally:
        os.close(leader)
        process.wait(10)
    return received.decode("utf-8", "replace")


def test_logs_escape_control_characters_on_a_terminal(daemon: Daemon, name: str) -> None:
    url = daemon.deploy(name, f"""
        def workflow(_request, settings):
            print({TERMINAL_ATTACK!r})
            raise RuntimeError({TERMINAL_ATTACK!r})
    """)
    execution_id = requests.post(url, json={}, timeout=10).headers["X-Wfd-Execution-Id"]
    shown = run_on_terminal(daemon, "logs", execution_id)
    assert "\\x1b]52;c;ZXZpbA==\\x07\\x0dstatus: success\\x1b[2K\\x9b" in shown
    assert "\x1b" not in shown and "\x07" not in shown and "\x9b" not in shown
    assert "RuntimeError: \\x1b]52;c;ZXZpbA==" in shown  # the error and traceback too
    raw = run_on_terminal(daemon, "logs", execution_id, "--raw")
    assert TERMINAL_ATTACK in raw.replace("\r\n", "\n")
    piped = daemon.ctl("logs", execution_id).stdout  # not a terminal: as stored
    assert TERMINAL_ATTACK.replace("\r", "\n") in piped  # (text mode turns \r into \n)


def test_logs_follow_escapes_control_characters_on_a_terminal(daemon: Daemon,
                                                              name: str) -> None:
    url = daemon.deploy(name, f"""
        def workflow(_request, settings):
            print({TERMINAL_ATTACK!r})
    """)
    result: list[str] = []
    follower = threading.Thread(target=lambda: result.append(
        run_on_terminal(daemon, "logs", name, "--follow", until="status: success")))
    follower.start()
    deadline = time.monotonic() + 20
    while follower.is_alive() and time.monotonic() < deadline:
        requests.post(url, json={}, timeout=10)
        follower.join(0.5)
    follower.join(10)
    assert "\\x1b]52;c;ZXZpbA==" in result[0] and "\x1b" not in result[0]


def test_hostile_client_keys_are_checked(make_daemon) -> None:
    daemon = make_daemon("max_body_mb = 10\nmax_pending_mb = 5\n", start=False)
    process = daemon.spawn()
    assert process.wait(30) == 2
    assert "max_pending_mb (5) must be at least max_body_mb (10)" in daemon.log()
    daemon = make_daemon("header_timeout_s = 0\n", start=False)
    assert daemon.spawn().wait(30) == 2
    assert "header_timeout_s must be greater than 0, got 0" in daemon.log()
