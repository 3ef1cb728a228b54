"""Integers of any size and nesting up to `max_json_depth` arrive and persist exactly (SPEC 8)."""

import json

import requests

BIG = 2**64 + 1
HUGE = -(2**200) - 7
ECHO = """
def workflow(_request, settings):
    seen = {"n": _request["n"], "type": type(_request["n"]).__name__,
            "stored": settings.get("n"), "set_by_ctl": settings.get("ctl")}
    settings["n"] = _request["n"]
    return {"status_code": 200, "body": repr(seen)}
"""


def post(url: str, body: str) -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": "application/json"},
                         timeout=30)


def test_big_integers_round_trip_through_request_settings_child_and_store(daemon, name):
    url = daemon.deploy(name, ECHO)
    first = post(url, json.dumps({"n": BIG}))
    assert first.status_code == 200, first.text
    assert first.text == repr({"n": BIG, "type": "int", "stored": None, "set_by_ctl": None})
    daemon.ctl("settings", name, "set", f"ctl:={HUGE}")  # KEY:=JSON stores a JSON value
    second = post(url, json.dumps({"n": HUGE}))
    assert second.text == repr({"n": HUGE, "type": "int", "stored": BIG, "set_by_ctl": HUGE})
    assert daemon.ctl_json("settings", name) == {"n": HUGE, "ctl": HUGE}
    exported = json.loads(daemon.ctl("export").stdout)
    [mine] = [w for w in exported["workflows"] if w["name"] == name]
    assert mine["settings"] == {"n": HUGE, "ctl": HUGE}


def nested(depth: int) -> str:
    return '{"n": 1, "deep": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


def test_json_nested_to_max_json_depth_is_accepted_one_more_is_refused(daemon, name):
    url = daemon.deploy(name, "def workflow(_request, settings):\n    return None\n")
    assert post(url, nested(64)).status_code == 200
    refused = post(url, nested(65))
    assert refused.status_code == 400
    assert refused.json() == {"status": "bad_request",
                              "execution_id": refused.headers["X-Wfd-Execution-Id"]}
    assert len(daemon.executions(name)) == 1  # the refused one started nothing
