"""Settings persistence (SPEC 4): key-level merges, nothing kept on failure."""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import Daemon, wait_for

SET_FROM_BODY = """
import time
def workflow(_request, settings):
    time.sleep(_request.get("sleep", 0))
    for key, value in _request.get("set", {}).items():
        settings[key] = value
    for key in _request.get("unset", []):
        del settings[key]
    if _request.get("fail"):
        raise RuntimeError("failing after changing settings")
"""


def test_changes_persist_between_executions(daemon, name):
    url = daemon.deploy(name, """
        def workflow(_request, settings):
            settings["count"] = settings.get("count", 0) + 1
            return {"status_code": 200, "body": str(settings["count"])}
        """)
    assert [requests.post(url, json={}).text for _ in range(3)] == ["1", "2", "3"]
    assert daemon.ctl_json("settings", name) == {"count": 3}


def test_concurrent_executions_changing_different_keys_both_keep_them(daemon, name):
    url = daemon.deploy(name, SET_FROM_BODY)
    daemon.ctl("settings", name, "set", "shared:=0", "gone:=1")
    bodies = [{"sleep": 0.5, "set": {"a": 1}}, {"sleep": 0.5, "set": {"b": 2}, "unset": ["gone"]}]
    with ThreadPoolExecutor(2) as pool:
        statuses = list(pool.map(lambda b: requests.post(url, json=b).status_code, bodies))
    assert statuses == [200, 200]
    assert daemon.ctl_json("settings", name) == {"shared": 0, "a": 1, "b": 2}


def test_on_the_same_key_the_last_to_finish_wins(daemon, name):
    url = daemon.deploy(name, SET_FROM_BODY)
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(requests.post, url, json={"sleep": 1.0, "set": {"k": "slow"}})
        fast = pool.submit(requests.post, url, json={"sleep": 0.0, "set": {"k": "fast"}})
        assert (slow.result().status_code, fast.result().status_code) == (200, 200)
    assert daemon.ctl_json("settings", name) == {"k": "slow"}


def test_a_failed_execution_keeps_nothing(daemon, name):
    url = daemon.deploy(name, SET_FROM_BODY)
    daemon.ctl("settings", name, "set", "keep:=1")
    response = requests.post(url, json={"set": {"new": 1, "keep": 2}, "unset": ["keep"],
                                        "fail": True})
    assert response.status_code == 500
    assert daemon.ctl_json("settings", name) == {"keep": 1}


def test_a_timed_out_execution_keeps_nothing(daemon, name):
    url = daemon.deploy(name, """
        import time
        def workflow(_request, settings):
            settings["touched"] = True
            time.sleep(30)
        """, "--timeout", "1")
    assert requests.post(url, json={}).status_code == 504
    assert daemon.ctl_json("settings", name) == {}


@pytest.mark.parametrize("code, message", [
    ("import datetime\n    settings['when'] = datetime.datetime(2026, 1, 1)",
     "settings['when'] is not JSON-serializable: Object of type datetime"),
    ("settings['tags'] = {'a', 'b'}",
     "settings['tags'] is not JSON-serializable: Object of type set"),
    ("settings['ratio'] = float('nan')",
     "settings['ratio'] is not JSON-serializable: Out of range float values"),
    ("settings[3] = 'x'", "settings key 3 is not a string"),
    ("settings['big'] = 'x' * (2 * 1024 * 1024)", "over the limit of 1048576"),
])
def test_unstorable_settings_fail_the_execution_and_keep_nothing(daemon, name, code, message):
    url = daemon.deploy(name, f"""
def workflow(_request, settings):
    settings['fine'] = 1
    {code}
""")
    daemon.ctl("settings", name, "set", "before:=true")
    response = requests.post(url, json={})
    assert response.status_code == 500
    record = daemon.logs(response.headers["X-Wfd-Execution-Id"])
    assert record["status"] == "error"
    assert message in record["error"]
    assert daemon.ctl_json("settings", name) == {"before": True}


def test_operators_set_and_unset_settings_with_ctl(daemon, name):
    daemon.deploy(name, SET_FROM_BODY)
    daemon.ctl("settings", name, "set", "API_KEY=sk_123", "LIMIT:=10", "FLAGS:=[1, 2]",
               "NAME=not json", 'OBJ:={"a": null}', "SOURCE_ID=12345", "EMPTY=", "EQ=a=b",
               "FLAG=true")
    assert daemon.ctl_json("settings", name) == {
        "API_KEY": "sk_123", "LIMIT": 10, "FLAGS": [1, 2], "NAME": "not json",
        "OBJ": {"a": None}, "SOURCE_ID": "12345", "EMPTY": "", "EQ": "a=b", "FLAG": "true"}
    daemon.ctl("settings", name, "unset", "LIMIT", "FLAGS", "SOURCE_ID", "EMPTY", "EQ", "FLAG")
    assert sorted(daemon.ctl_json("settings", name)) == ["API_KEY", "NAME", "OBJ"]
    refused = daemon.ctl("settings", name, "set", "novalue", check=False)
    assert refused.returncode == 2
    assert "expected KEY=VALUE" in refused.stderr
    bad_json = daemon.ctl("settings", name, "set", "N:=not json", check=False)
    assert bad_json.returncode == 2 and "N:= needs a JSON value" in bad_json.stderr
    assert sorted(daemon.ctl_json("settings", name)) == ["API_KEY", "NAME", "OBJ"]


# A child that does not play by the protocol's rules: after the workflow
# returns, its settings change claims every key it holds, changed or not.
RESENDS_EVERY_KEY = """
import time
import sandbox.rules

def workflow(_request, settings):
    time.sleep(_request.get("sleep", 0))
    settings.update(_request.get("set", {}))
    if _request.get("resend"):
        sandbox.rules.settings_change = lambda given, now, max_depth: {
            "set": dict(now), "unset": _request.get("unset", [])}
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon of its own, with a 1 KiB settings limit, running nothing but these tests."""
    daemon = Daemon(tmp_path_factory.mktemp("small-settings") / "data",
                    "[limits]\nsettings_kb = 1\n").start()
    yield daemon
    daemon.kill()


def test_keys_sent_back_unchanged_do_not_undo_a_concurrent_change(small, name):
    url = small.deploy(name, RESENDS_EVERY_KEY)
    small.ctl("settings", name, "set", "k=old")
    with ThreadPoolExecutor(1) as pool:
        # Given {"k": "old"}; finishes last, sending k back unchanged and
        # removing "b", a key it was never given.
        slow = pool.submit(requests.post, url, timeout=30, json={
            "sleep": 1.5, "set": {"a": 1}, "resend": True, "unset": ["b"]})
        wait_for(lambda: small.ctl_json("status")["running"] == 1, what="the slow execution")
        fast = requests.post(url, json={"set": {"k": "new", "b": 2}}, timeout=30)
        assert fast.status_code == 200
        assert small.ctl_json("settings", name) == {"k": "new", "b": 2}
        assert slow.result().status_code == 200
    assert small.ctl_json("settings", name) == {"k": "new", "b": 2, "a": 1}


def test_a_merge_over_the_limit_is_refused_and_writes_nothing(small, name):
    # Each change fits alone; both together are over 1 KiB. The child does no
    # size check: the one at the merge is what counts.
    url = small.deploy(name, SET_FROM_BODY)
    small.ctl("settings", name, "set", "kept=1")
    bodies = [{"sleep": 0.5, "set": {"first": "x" * 600}},
              {"sleep": 0.5, "set": {"second": "y" * 600}}]
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda b: requests.post(url, json=b, timeout=30), bodies))
    assert sorted(r.status_code for r in responses) == [200, 500]
    refused = next(r for r in responses if r.status_code == 500)
    record = small.logs(refused.headers["X-Wfd-Execution-Id"])
    assert record["status"] == "error"
    assert "over the limit of 1024 bytes (settings_kb = 1); nothing was kept" in record["error"]
    stored = small.ctl_json("settings", name)
    assert sorted(stored) in (["first", "kept"], ["kept", "second"])


def test_a_change_over_the_limit_is_refused_whatever_code_the_child_ran(small, name):
    url = small.deploy(name, RESENDS_EVERY_KEY)
    response = requests.post(url, json={"set": {"big": "z" * 2000}, "resend": True}, timeout=30)
    assert response.status_code == 500
    record = small.logs(response.headers["X-Wfd-Execution-Id"])
    assert (record["status"], record["http_status"]) == ("error", 500)
    assert "over the limit of 1024 bytes" in record["error"]
    assert small.ctl_json("settings", name) == {}


def test_ctl_settings_set_over_the_limit_is_refused(small, name):
    small.deploy(name, SET_FROM_BODY)
    small.ctl("settings", name, "set", "small:=1")
    refused = small.ctl("settings", name, "set", "big=" + "x" * 1100, check=False)
    assert refused.returncode == 1
    assert "over the limit of 1024 bytes (settings_kb = 1)" in refused.stderr
    assert refused.stderr.count("\n") == 1  # one line
    assert small.ctl_json("settings", name) == {"small": 1}
    small.ctl("settings", name, "set", "fits=" + "x" * 900)
    assert sorted(small.ctl_json("settings", name)) == ["fits", "small"]
