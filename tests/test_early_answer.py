"""An execution is answered once its result is complete, and keeps its slot until cleaned up.

The daemon answers a success as soon as the result pipe is at EOF; killing
what the execution left, waiting for its pipes and removing its cgroup
happen afterwards, and its concurrency slot stays taken until they are done.
"""

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from conftest import wait_for

# The workflow leaves a process that holds its output pipe (and nothing
# else) until the test creates `release`, or 10 s at most: under isolation
# "none" nothing kills it, so cleaning up waits for the pipe as long as the
# daemon's drain allows (supervise.DRAIN_AFTER_EXIT_S).
LINGERING = """
import os, time
def workflow(_request, settings):
    print("written before the result", flush=True)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        os.closerange(3, 65536)
        with open(os.path.join(%(pids)r, str(os.getpid())), "w"):
            pass  # set up: the workflow may return now
        deadline = time.monotonic() + 10
        while not os.path.exists(%(release)r) and time.monotonic() < deadline:
            time.sleep(0.01)
        os._exit(0)
    deadline = time.monotonic() + 10
    while not os.path.exists(os.path.join(%(pids)r, str(pid))) and time.monotonic() < deadline:
        time.sleep(0.001)
    return {"status_code": 200, "body": "answered"}
"""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def received(url: str) -> tuple[requests.Response, datetime]:
    response = requests.post(url, json={}, timeout=30)
    return response, datetime.now(UTC)


def started_at(record: dict) -> datetime:
    return datetime.fromisoformat(record["started_at"].replace("Z", "+00:00"))


@pytest.mark.parametrize("executor", ["zygote", "spawn"])
def test_the_next_execution_waits_for_the_answered_ones_cleanup(make_daemon, name, tmp_path,
                                                                executor):
    daemon = make_daemon(f'executor = "{executor}"\nisolation = "none"\n'
                         "[limits]\nconcurrency = 1\n")
    release, pids = tmp_path / "release", tmp_path / "pids"
    pids.mkdir()
    url = daemon.deploy(name, LINGERING % {"release": str(release), "pids": str(pids)})
    try:
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(received, [url, url]))
        assert [response.status_code for response, _ in answers] == [200, 200]
        (first, first_answered), (second, _) = sorted(
            ((daemon.logs(response.headers["X-Wfd-Execution-Id"]), at)
             for response, at in answers), key=lambda pair: started_at(pair[0]))
        for record in (first, second):
            assert (record["status"], record["http_status"]) == ("success", 200)
            assert record["output"] == "written before the result\n"
        # The first was answered while its process still held the output
        # pipe; the second, with one slot, started only once that was over.
        assert started_at(second) > first_answered
    finally:
        release.touch()
        for pid in [int(path.name) for path in pids.iterdir()]:
            wait_for(lambda pid=pid: not alive(pid), what=f"lingering process {pid} to exit")

