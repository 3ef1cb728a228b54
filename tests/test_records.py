"""Every execution ends in a record and nothing leaks (SPEC 8), on both executors.

Each hostile kind (tests/leaks.py) is sent in a batch to a strict daemon;
the daemon's descriptors, the processes below it and its execution cgroups
must come back to what they were before the batch, every caller must get
its answer with `X-Wfd-Execution-Id`, and every execution that started must
have a record naming what was wrong.
"""

import time
from collections.abc import Iterator

import pytest
import requests
from conftest import Daemon, wait_for
from leaks import KINDS, descriptors, resources

EXECUTORS = ["spawn", "zygote"]
BATCH = 8
# A fixed pool, so that the processes below the daemon come back to one number.
CONFIG = """
spares_min = 2
spares_max = 2
[limits]
timeout_s = 5
"""


@pytest.fixture(scope="module", params=EXECUTORS)
def strict(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path_factory.mktemp(f"records-{request.param}") / "data",
                    f'executor = "{request.param}"\n{CONFIG}').start()
    status = daemon.ctl_json("status")
    assert status.get("zygote_state", "ready") == "ready", status
    yield daemon
    daemon.kill()


def quiet(daemon: Daemon) -> tuple[dict[str, int], dict[int, str]]:
    """What the daemon holds once nothing is in flight: the same twice, 0.3 s apart.

    A connection just answered and a spare being forked are transient.
    """
    pid = daemon.process.pid
    samples = [resources(pid)]

    def steady() -> bool:
        time.sleep(0.3)
        samples.append(resources(pid))
        return samples[-1] == samples[-2]

    wait_for(steady, timeout=15, what="the daemon to be quiet")
    return samples[-1], descriptors(pid)


def settled(daemon: Daemon, before: dict[str, int], fds: dict[int, str]) -> None:
    """Wait until the daemon holds what it held before; fail naming what it kept."""
    now: dict[str, int] = {}

    def same() -> bool:
        now.update(resources(daemon.process.pid))
        return now == before

    try:
        wait_for(same, timeout=15, interval=0.1, what="resources to come back")
    except AssertionError:
        kept = set(descriptors(daemon.process.pid).items()) - set(fds.items())
        raise AssertionError(f"leaked: before {before}, after {now}; new fds {kept}") from None


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_requests_are_answered_recorded_and_leak_nothing(strict, name, kind):
    spec = KINDS[kind]
    url = strict.deploy(name, spec.code)
    spec.send(url)  # the first one may warm something up (a spare, a connection)
    before, fds = quiet(strict)
    ids = []
    for _ in range(BATCH):
        response = spec.send(url)
        execution_id = response.headers["X-Wfd-Execution-Id"]
        assert response.status_code == spec.http, response.text
        assert response.json() == {"status": spec.status or "bad_request",
                                   "execution_id": execution_id}
        ids.append(execution_id)
    settled(strict, before, fds)
    records = {r["id"]: r for r in strict.executions(name, limit=50)}
    if spec.status is None:  # refused before anything started: nothing to record
        assert records == {}
        return
    assert set(ids) <= set(records)
    record = strict.logs(ids[-1])
    assert (record["status"], record["http_status"]) == (spec.status, spec.http)
    assert spec.error in record["error"], record["error"][-300:]
    assert len(record["error"]) <= 1024 * 1024 + 100
    canary = strict.deploy(f"{name}-canary", "def workflow(_r, s):\n    pass\n")
    with requests.post(canary, json={}, headers={"Connection": "close"}, timeout=30) as alive:
        assert alive.status_code == 200


PULL_KINDS = ["result-not-json", "result-unset-not-str", "result-settings-300-deep",
              "settings-100-deep", "error-5mb"]


@pytest.mark.parametrize("kind", PULL_KINDS)
def test_hostile_pull_runs_are_recorded_and_the_timer_keeps_going(strict, name, kind):
    spec = KINDS[kind]
    code = spec.code.replace("def workflow(_request, settings):", "def workflow(settings):")
    strict.deploy(name, code, "--every", "1s", kind="--pull")
    def runs() -> list[dict]:  # ticks skipped while a slow run went on are not runs
        found = [r for r in strict.executions(name) if r["status"] != "skipped"]
        return found if len(found) >= 2 else []

    records = wait_for(runs, timeout=30, what="two pull runs")
    for record in records:
        assert record["status"] == spec.status, record
        assert spec.error in strict.logs(record["id"])["error"]
    assert "exception was never retrieved" not in strict.log()
    strict.ctl("disable", name)
