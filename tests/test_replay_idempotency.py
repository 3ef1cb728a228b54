"""Replay of past requests and idempotency keys (SPEC 11), from outside."""

import json
import signal
import sqlite3
import threading
import time

import requests
from conftest import wait_for
from signing import standard_headers
from test_async_delivery import FAILS, attempts

ECHO = """
    import json
    def workflow(_request, settings):
        settings["calls"] = settings.get("calls", 0) + 1
        return {"status_code": 200, "body": json.dumps(_request),
                "headers": {"Content-Type": "application/json"}}
    """


def test_replay_of_a_failed_execution_sees_the_same_request(daemon, name):
    url = daemon.deploy(name, FAILS)
    first = requests.post(url + "?source=crm", json={"profile": {"key": "k"}, "n": 2 ** 70},
                          headers={"X-Trace": "t-1"})
    assert first.status_code == 500
    original = first.headers["X-Wfd-Execution-Id"]
    daemon.deploy(name, ECHO)  # fixed: version 2 runs the replay
    replay = daemon.ctl_json("replay", original)
    seen = json.loads(replay["response"]["body"])
    assert seen["profile"] == {"key": "k"} and seen["n"] == 2 ** 70
    assert (seen["source"], seen["X-Trace"]) == ("crm", "t-1")
    assert (replay["trigger"], replay["replay_of"], replay["version"], replay["status"]) == (
        "replay", original, 2, "success")
    again = daemon.ctl_json("replay", replay["id"])  # a replay can be replayed: same request
    assert json.loads(again["response"]["body"]) == seen
    records = {r["id"]: r for r in daemon.executions(name)}
    assert records[replay["id"]]["replay_of"] == original


def test_replay_of_a_pull_run_and_of_dead_deliveries(daemon, name):
    daemon.deploy(name, """
        def workflow(settings):
            settings["runs"] = settings.get("runs", 0) + 1
        """, "--every", "1h", kind="--pull")
    ran = daemon.ctl_json("run", name)
    replay = daemon.ctl_json("replay", ran["id"])
    assert (replay["trigger"], replay["replay_of"], replay["status"]) == (
        "replay", ran["id"], "success")
    assert daemon.ctl_json("settings", name) == {"runs": 2}

    catch = f"{name}-dead"
    url = daemon.deploy(catch, FAILS, "--async", "--retries", "0")
    dead_ids = [requests.post(url, json={"i": i}).json()["execution_id"] for i in range(2)]
    for delivery_id in dead_ids:
        attempts(daemon, catch, delivery_id, 1)
    assert {d["id"] for d in daemon.ctl_json("dead", catch)} == set(dead_ids)
    daemon.deploy(catch, ECHO)
    replays = daemon.ctl_json("replay", "--dead", catch)
    assert sorted(r["replay_of"] for r in replays) == sorted(dead_ids)
    assert {r["status"] for r in replays} == {"success"}
    assert daemon.ctl_json("dead", catch) == []


def test_replay_is_refused_under_no_store_requests(daemon, name):
    url = daemon.deploy(name, FAILS, "--no-store-requests")
    original = requests.post(url, json={"secret-data": "x"}).headers["X-Wfd-Execution-Id"]
    refused = daemon.ctl("replay", original, check=False)
    assert refused.returncode == 1
    assert "--no-store-requests" in refused.stderr and original in refused.stderr
    assert daemon.ctl_json("show", name)["delivery"]["store_requests"] is False

    queued = f"{name}-async"
    url = daemon.deploy(queued, FAILS, "--async", "--retries", "0", "--no-store-requests")
    delivery_id = requests.post(url, json={"secret-data": "x"}).json()["execution_id"]
    attempts(daemon, queued, delivery_id, 1)
    refused = daemon.ctl("replay", "--dead", queued, check=False)
    assert refused.returncode == 1 and "--no-store-requests" in refused.stderr
    unknown = daemon.ctl("replay", "0" * 26, check=False)
    assert unknown.returncode == 1 and "no execution" in unknown.stderr


def test_a_repeated_idempotency_key_runs_once_and_answers_the_same_body(daemon, name):
    url = daemon.deploy(name, ECHO)
    headers = {"Idempotency-Key": "order-42"}
    first = requests.post(url, json={"a": 1}, headers=headers)
    second = requests.post(url, json={"a": 2}, headers=headers)
    assert first.status_code == second.status_code == 200
    assert second.content == first.content
    assert second.headers["X-Wfd-Execution-Id"] == first.headers["X-Wfd-Execution-Id"]
    assert second.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert daemon.ctl_json("settings", name) == {"calls": 1}
    other = requests.post(url, json={"a": 3}, headers={"Idempotency-Key": "order-43"})
    assert other.status_code == 200 and "Idempotent-Replayed" not in other.headers
    assert len(daemon.executions(name)) == 2


def test_a_duplicate_arriving_while_the_first_runs_waits_for_it(daemon, name):
    url = daemon.deploy(name, """
        import json, time
        def workflow(_request, settings):
            settings["calls"] = settings.get("calls", 0) + 1
            time.sleep(1)
            return {"status_code": 201, "body": json.dumps({"n": _request["n"]})}
        """)
    results = {}

    def send(n: int) -> None:
        results[n] = requests.post(url, json={"n": n}, headers={"Idempotency-Key": "same"})

    first = threading.Thread(target=send, args=(1,))
    first.start()
    wait_for(lambda: daemon.ctl_json("status")["running"] == 1, what="the first to run")
    send(2)
    first.join()
    assert results[1].status_code == results[2].status_code == 201
    assert results[2].content == results[1].content == b'{"n": 1}'
    assert results[2].headers["Idempotent-Replayed"] == "true"
    assert daemon.ctl_json("settings", name) == {"calls": 1}


def test_async_repeats_get_the_first_202_and_webhook_id_is_the_key_under_standard(
        daemon, name, tmp_path):
    url = daemon.deploy(name, ECHO, "--async")
    first = requests.post(url, json={}, headers={"Idempotency-Key": "k1"})
    second = requests.post(url, json={}, headers={"Idempotency-Key": "k1"})
    assert first.status_code == second.status_code == 202
    assert second.json() == first.json() and second.headers["Idempotent-Replayed"] == "true"
    attempts(daemon, name, first.json()["execution_id"], 1)

    secret = "whsec_c2VjcmV0LWtleS1vbmUtMjQtYnl0ZXMh"
    (tmp_path / "s").write_text(secret)
    daemon.ctl("verify", name, "standard", "--secret-file", str(tmp_path / "s"))
    body = b'{"event": "x"}'
    sent = [requests.post(url, data=body, headers={
        "Content-Type": "application/json",
        **standard_headers(secret, body, msg_id="msg_same", timestamp=int(time.time()))})
        for _ in range(2)]
    assert [r.status_code for r in sent] == [202, 202]
    assert sent[1].json() == sent[0].json() and sent[1].headers["Idempotent-Replayed"] == "true"
    attempts(daemon, name, sent[0].json()["execution_id"], 1)
    assert daemon.ctl_json("settings", name) == {"calls": 2}


def test_a_refused_request_does_not_use_up_its_key(daemon, name):
    url = daemon.deploy(name, ECHO)
    headers = {"Idempotency-Key": "k"}
    assert requests.post(url, data="not json", headers={
        **headers, "Content-Type": "application/json"}).status_code == 400
    assert requests.post(url, json={}, headers=headers).status_code == 200
    assert requests.post(url, json={}, headers={"Idempotency-Key": "x" * 256}).status_code == 400
    assert daemon.ctl_json("settings", name) == {"calls": 1}


def test_stored_requests_go_with_their_records(make_daemon, name):
    daemon = make_daemon(config="[retention]\nmax_per_workflow = 10\n")
    url = daemon.deploy(name, ECHO)
    sent = [requests.post(url, json={"i": i}).headers["X-Wfd-Execution-Id"] for i in range(4)]
    replay = daemon.ctl_json("replay", sent[-1])  # refers to the request of sent[-1]

    def stored() -> set[str]:
        with sqlite3.connect(daemon.data_dir / "wfd.db") as db:
            return {row[0] for row in db.execute("SELECT id FROM requests")}

    assert stored() == set(sent)
    daemon.config_file.write_text("[retention]\nmax_per_workflow = 2\n")
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: len(daemon.executions(name)) == 2, what="pruning to 2 records")
    assert {r["id"] for r in daemon.executions(name)} == {sent[-1], replay["id"]}
    wait_for(lambda: stored() == {sent[-1]}, what="the pruned records' requests to go")
