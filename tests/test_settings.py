"""Settings persistence (SPEC 4): key-level merges, nothing kept on failure."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

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
