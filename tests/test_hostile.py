"""Hostile and broken workflows are contained; the daemon keeps serving."""

import os
import time

import pytest
import requests
from tests.conftest import wait_for

CANARY = 'def workflow(_request, settings):\n    return {"status_code": 200, "body": "alive"}\n'


@pytest.fixture
def canary(daemon, name):
    return daemon.deploy(f"{name}-canary", CANARY)


def assert_alive(canary_url):
    response = requests.post(canary_url, json={})
    assert (response.status_code, response.text) == (200, "alive")


@pytest.mark.parametrize("body, status, http_status, error", [
    ("x = bytearray(4 * 1024 ** 3)", "memory", 500, "MemoryError"),
    ("chunks = []\n    while True:\n        chunks.append(bytearray(10 * 1024 ** 2))",
     "memory", 500, "MemoryError"),
    ("while True:\n        pass", "timeout", 504, "timed out after 2 s"),
    ("import os\n    os._exit(0)", "error", 500,
     "the process exited with code 0 without reporting a result"),
    ("import os, signal\n    os.kill(os.getpid(), signal.SIGSEGV)", "error", 500,
     "the process was killed by SIGSEGV"),
    ("import os\n    os.closerange(0, 1024)\n    return None", "error", 500,
     "without reporting a result"),
])
def test_broken_workflows_are_contained(daemon, name, canary, body, status, http_status, error):
    url = daemon.deploy(name, f"def workflow(_request, settings):\n    {body}\n",
                        "--timeout", "2", "--memory", "256")
    response = requests.post(url, json={})
    assert response.status_code == http_status
    assert response.json()["status"] == status
    record = daemon.logs(response.headers["X-Wfd-Execution-Id"])
    assert record["status"] == status
    assert error in record["error"]
    assert_alive(canary)


def test_cpu_limit_is_recorded_as_cpu(daemon, name, canary):
    url = daemon.deploy(name, "def workflow(_request, settings):\n    while True:\n        pass\n",
                        "--timeout", "10", "--cpu", "1")
    response = requests.post(url, json={})
    assert response.status_code == 500
    record = daemon.logs(response.headers["X-Wfd-Execution-Id"])
    assert record["status"] == "cpu"
    assert record["duration_ms"] < 5000
    assert_alive(canary)


def test_sigxcpu_ignored_still_ends_as_cpu(daemon, name, canary):
    url = daemon.deploy(name, """
        import signal
        def workflow(_request, settings):
            signal.signal(signal.SIGXCPU, signal.SIG_IGN)
            while True:
                pass
        """, "--timeout", "10", "--cpu", "1")
    response = requests.post(url, json={})
    record = daemon.logs(response.headers["X-Wfd-Execution-Id"])
    assert (response.status_code, record["status"]) == (500, "cpu")
    assert_alive(canary)


def test_background_processes_do_not_outlive_the_execution(daemon, name, tmp_path):
    marker = tmp_path / "pid"
    url = daemon.deploy(name, f"""
        import subprocess
        def workflow(_request, settings):
            child = subprocess.Popen(["sleep", "300"])
            open({str(marker)!r}, "w").write(str(child.pid))
            return {{"status_code": 200, "body": str(child.pid)}}
        """)
    response = requests.post(url, json={})
    assert response.status_code == 200
    pid = int(response.text)

    def gone():
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().split(")")[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    assert wait_for(gone, timeout=5, what=f"pid {pid} to be gone")


def test_nothing_stays_in_memory_or_in_the_working_directory(daemon, name):
    url = daemon.deploy(name, """
        import os, tempfile
        STATE = []
        def workflow(_request, settings):
            STATE.append(1)
            found = sorted(os.listdir("."))
            open("left-behind.txt", "w").write("x")
            return {"status_code": 200,
                    "body": f"{len(STATE)} {found} {os.getcwd() == tempfile.gettempdir()}"}
        """)
    first = requests.post(url, json={}).text
    second = requests.post(url, json={}).text
    assert first == second == "1 [] True"


def test_the_environment_is_scrubbed(daemon, name):
    os.environ["WFD_TEST_SECRET"] = "should-not-leak"  # not in the daemon's env anyway
    url = daemon.deploy(name, """
        import json, os
        def workflow(_request, settings):
            return {"status_code": 200, "body": json.dumps(sorted(os.environ))}
        """)
    assert requests.post(url, json={}).json() == ["HOME", "LANG", "PATH", "TMPDIR"]


def test_a_flood_beyond_the_queue_gets_503_with_retry_after(make_daemon, name):
    daemon = make_daemon("global_concurrency = 1\nqueue_max = 2\n")
    url = daemon.deploy(name, """
        import time
        def workflow(_request, settings):
            time.sleep(1.5)
        """)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(requests.post, url, json={}) for _ in range(6)]
        started = time.monotonic()
        responses = [f.result() for f in futures]
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 3 and codes.count(503) >= 1, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["status"] == "overloaded"
    assert time.monotonic() - started < 30
    assert requests.post(url, json={}).status_code == 200
