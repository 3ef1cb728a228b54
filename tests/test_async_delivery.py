"""Async delivery (SPEC 11): 202 once committed, a durable queue, retries, dead letters.

The workflows that must fail a given number of times count their calls on a
stand-in server (a failed execution keeps no settings, so they cannot
count in them). Backoffs are small so that retries come within the test.
"""

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import requests
from conftest import wait_for
from test_metrics import scrape

COUNT = """
    def workflow(_request, settings):
        n = _request["n"]
        settings[n] = settings.get(n, 0) + 1
    """
# Fails until the stand-in has been called `_request["succeed_at"]` times.
FLAKY = """
    import requests
    def workflow(_request, settings):
        calls = requests.post(_request["counter"], timeout=5).json()["calls"]
        if calls < _request["succeed_at"]:
            raise RuntimeError(f"failing on call {calls}")
        settings["succeeded_on"] = calls
    """
FAILS = "def workflow(_request, settings):\n    raise ValueError('always')\n"


def counter(standin) -> tuple[str, tuple[str, ...]]:
    """A stand-in's counting URL, and the deploy flags that let executions reach it."""
    server = standin()
    calls = itertools.count(1)
    lock = threading.Lock()

    def count(_record):
        with lock:
            return 200, {}, {"calls": next(calls)}

    server.routes[("POST", "/count")] = count
    return f"{server.url}/count", server.allow_net


def attempts(daemon, name: str, delivery_id: str, n: int) -> list[dict]:
    """The records of `delivery_id`'s attempts, oldest first, once there are `n`."""
    def found():
        records = [e for e in daemon.executions(name, 50)
                   if e["first_attempt_id"] == delivery_id]
        return records if len(records) >= n and records[0]["delivery"] in (
            "done", "dead") else None
    return sorted(wait_for(found, timeout=30, what=f"{n} attempts"), key=lambda e: e["attempt"])


def test_async_202_then_it_runs(daemon, name):
    url = daemon.deploy(name, COUNT, "--async")
    response = requests.post(url, json={"n": "a"})
    assert response.status_code == 202
    delivery_id = response.headers["X-Wfd-Execution-Id"]
    assert response.json() == {"status": "accepted", "execution_id": delivery_id}
    assert response.headers["Preference-Applied"] == "respond-async"
    [record] = attempts(daemon, name, delivery_id, 1)
    assert (record["id"], record["status"], record["attempt"], record["delivery"],
            record["trigger"]) == (delivery_id, "success", 1, "done", "catch")
    assert daemon.ctl_json("settings", name) == {"a": 1}


def test_prefer_respond_async_on_a_sync_workflow(daemon, name):
    url = daemon.deploy(name, COUNT)
    assert requests.post(url, json={"n": "sync"}).status_code == 200
    response = requests.post(url, json={"n": "async"},
                             headers={"Prefer": "wait=5, respond-async"})
    assert response.status_code == 202
    attempts(daemon, name, response.json()["execution_id"], 1)
    assert daemon.ctl_json("settings", name) == {"sync": 1, "async": 1}
    assert daemon.ctl_json("show", name)["delivery"]["async"] is False


def test_kill_9_after_twenty_202s_each_runs_once_after_restart(make_daemon, name):
    daemon = make_daemon(config="global_concurrency = 1\n")
    url = daemon.deploy(name, """
        import time
        def workflow(_request, settings):
            n = _request["n"]
            settings[n] = settings.get(n, 0) + 1
            time.sleep(0.2)
        """, "--async")
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda i: requests.post(url, json={"n": f"n{i:02d}"}),
                                  range(20)))
    daemon.kill()
    assert [r.status_code for r in responses] == [202] * 20
    accepted = {r.json()["execution_id"] for r in responses}

    restarted = make_daemon(data_dir=daemon.data_dir)
    expected = {f"n{i:02d}": 1 for i in range(20)}
    wait_for(lambda: restarted.ctl_json("settings", name) == expected, timeout=60,
             what="every accepted delivery to run")
    records = restarted.executions(name, 100)
    succeeded = [r["first_attempt_id"] for r in records if r["status"] == "success"]
    assert sorted(succeeded) == sorted(accepted)  # each one, once
    cut_off = [r for r in records if r["status"] != "success"]
    # At most the one running at the kill: recorded interrupted, then retried.
    assert len(cut_off) <= 1
    assert all(r["status"] == "interrupted" and r["attempt"] == 1 for r in cut_off)
    assert all(r["delivery"] == "done" for r in records)


def test_a_clean_stop_keeps_queued_deliveries_for_the_restart(make_daemon, name):
    daemon = make_daemon(config="global_concurrency = 1\n")
    url = daemon.deploy(name, """
        import time
        def workflow(_request, settings):
            settings[_request["n"]] = settings.get(_request["n"], 0) + 1
            time.sleep(0.5)
        """, "--async")
    accepted = [requests.post(url, json={"n": f"n{i}"}).json()["execution_id"]
                for i in range(5)]
    wait_for(lambda: daemon.ctl_json("status")["running"] == 1, what="the first to run")
    assert daemon.stop() == 0  # the running one finishes within grace_s; the rest wait
    restarted = make_daemon(data_dir=daemon.data_dir)
    wait_for(lambda: restarted.ctl_json("settings", name) == {f"n{i}": 1 for i in range(5)},
             timeout=30, what="the queued deliveries after the restart")
    records = restarted.executions(name)
    assert sorted(r["id"] for r in records) == sorted(accepted)
    assert {(r["status"], r["attempt"]) for r in records} == {("success", 1)}


def test_fails_twice_then_succeeds_with_attempts_recorded(daemon, name, standin):
    count_url, allow_net = counter(standin)
    url = daemon.deploy(name, FLAKY, "--async", "--retry-backoff-s", "0.05", *allow_net)
    response = requests.post(url, json={"counter": count_url, "succeed_at": 3})
    delivery_id = response.json()["execution_id"]
    records = attempts(daemon, name, delivery_id, 3)
    assert [(r["attempt"], r["status"]) for r in records] == [
        (1, "error"), (2, "error"), (3, "success")]
    assert records[0]["id"] == delivery_id
    assert len({r["id"] for r in records}) == 3
    assert {r["first_attempt_id"] for r in records} == {delivery_id}
    assert daemon.ctl_json("settings", name) == {"succeeded_on": 3}
    assert "failing on call 1" in daemon.logs(records[0]["id"])["traceback"]


def test_retries_1_ends_dead_and_listed(make_daemon, name):
    daemon = make_daemon()
    url = daemon.deploy(name, FAILS, "--async", "--retries", "1", "--retry-backoff-s", "0.05")
    delivery_id = requests.post(url, json={}).json()["execution_id"]
    records = attempts(daemon, name, delivery_id, 2)
    assert [(r["attempt"], r["status"], r["delivery"]) for r in records] == [
        (1, "error", "dead"), (2, "error", "dead")]
    [dead] = daemon.ctl_json("dead", name)
    assert (dead["id"], dead["attempts"], dead["last_status"], dead["last_attempt_id"]) == (
        delivery_id, 2, "error", records[1]["id"])
    assert delivery_id in daemon.ctl("dead", name).stdout
    samples = scrape(daemon.base)
    states = {labels: value for (metric, labels), value in samples.items()
              if metric == "wfd_deliveries_total"}
    assert states == {(("state", s), ("workflow", name)): 1.0
                      for s in ("accepted", "retried", "dead")}
    assert [line for line in daemon.log().splitlines()
            if "delivery-dead" in line and delivery_id in line]


def test_queue_depth_and_oldest_age_in_metrics(make_daemon, name):
    daemon = make_daemon(config="global_concurrency = 1\n")
    url = daemon.deploy(name, """
        import time
        def workflow(_request, settings):
            time.sleep(_request["s"])
        """, "--async")
    requests.post(url, json={"s": 1.5})
    wait_for(lambda: scrape(daemon.base)[("wfd_running_children", ())] == 1, what="running")
    for _ in range(3):
        requests.post(url, json={"s": 0})
    samples = scrape(daemon.base)
    assert samples[("wfd_delivery_queue_depth", ())] == 3
    assert 0 < samples[("wfd_delivery_oldest_age_seconds", ())] < 1.5
    wait_for(lambda: scrape(daemon.base)[("wfd_delivery_queue_depth", ())] == 0,
             what="the queue to drain")
    assert scrape(daemon.base)[("wfd_delivery_oldest_age_seconds", ())] == 0


def test_a_disabled_workflow_keeps_its_queued_deliveries_until_enabled(make_daemon, name):
    daemon = make_daemon(config="global_concurrency = 1\n")
    url = daemon.deploy(name, """
        import time
        def workflow(_request, settings):
            settings[_request["n"]] = 1
            time.sleep(_request.get("s", 0))
        """, "--async")
    requests.post(url, json={"n": "first", "s": 1})
    wait_for(lambda: scrape(daemon.base)[("wfd_running_children", ())] == 1, what="running")
    queued = requests.post(url, json={"n": "second"})
    daemon.ctl("disable", name)
    wait_for(lambda: daemon.ctl_json("settings", name) == {"first": 1}, what="the first")
    wait_for(lambda: scrape(daemon.base)[("wfd_delivery_queue_depth", ())] == 0,
             what="the worker to set the second aside")
    assert daemon.ctl_json("settings", name) == {"first": 1}
    assert queued.json()["execution_id"] not in {e["id"] for e in daemon.executions(name)}
    daemon.ctl("enable", name)
    wait_for(lambda: daemon.ctl_json("settings", name) == {"first": 1, "second": 1},
             what="the second after enable")


def test_deploy_refuses_bad_delivery_flags(daemon, name):
    path = daemon.data_dir.parent / f"{name}.py"
    path.write_text(FAILS)
    for flags, message in ((["--retries", "-1"], "--retries"),
                           (["--retry-backoff-s", "0"], "--retry-backoff-s")):
        refused = daemon.ctl("deploy", name, str(path), "--catch", *flags, check=False)
        assert refused.returncode == 1 and message in refused.stderr
    pull = daemon.ctl("deploy", name, str(path), "--pull", "--every", "1h", "--async",
                      check=False)
    assert pull.returncode == 1 and "catch workflows" in pull.stderr
