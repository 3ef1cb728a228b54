"""The catch path reads workflows and policies from memory: every change is seen at once.

The store keeps what each request looks up (wfd/store.py); these tests
change a workflow every way `wfd ctl` can and send the next request
straight after the command returns, with no wait: a change the cache
missed would be answered with the old code, key, settings or policy.
"""

import requests

CODE = """
VERSION = {version}

import os

def workflow(_request, settings):
    if os.environ.get("GREETING"):
        return {{"status_code": 200, "body": os.environ["GREETING"]}}
    if "put" in _request:
        settings["count"] = _request["put"]
    return {{"status_code": 200, "body": f"v{{VERSION}} {{sorted(settings.items())}}"}}
"""


def test_each_change_reaches_the_very_next_request(daemon, name, tmp_path):
    url = daemon.deploy(name, CODE.format(version=1))
    assert requests.post(url, json={}, timeout=30).text == "v1 []"
    daemon.deploy(name, CODE.format(version=2))
    assert requests.post(url, json={}, timeout=30).text == "v2 []"

    daemon.ctl("settings", name, "set", "mode=live")
    assert requests.post(url, json={}, timeout=30).text == "v2 [('mode', 'live')]"
    # A change made by an execution is what the next one is given.
    assert requests.post(url, json={"put": 7}, timeout=30).status_code == 200
    assert requests.post(url, json={}, timeout=30).text == (
        "v2 [('count', 7), ('mode', 'live')]")
    daemon.ctl("settings", name, "unset", "count")
    assert requests.post(url, json={}, timeout=30).text == "v2 [('mode', 'live')]"

    daemon.ctl("env", name, "set", "GREETING=hello")
    assert requests.post(url, json={}, timeout=30).text == "hello"
    daemon.ctl("env", name, "unset", "GREETING")
    assert requests.post(url, json={}, timeout=30).text == "v2 [('mode', 'live')]"

    daemon.ctl("rollback", name, "1")
    assert requests.post(url, json={}, timeout=30).text == "v1 [('mode', 'live')]"

    daemon.ctl("disable", name)
    assert requests.post(url, json={}, timeout=30).status_code == 404
    daemon.ctl("enable", name)
    assert requests.post(url, json={}, timeout=30).status_code == 200

    daemon.ctl("rotate-key", name)
    assert requests.post(url, json={}, timeout=30).status_code == 404
    rotated = daemon.ctl("url", name).stdout.strip()
    assert requests.post(rotated, json={}, timeout=30).status_code == 200

    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    daemon.ctl("verify", name, "github", "--secret-file", str(secret))
    assert requests.post(rotated, json={}, timeout=30).status_code == 401
    daemon.ctl("verify", name, "off")
    assert requests.post(rotated, json={}, timeout=30).status_code == 200

    daemon.ctl("delete", name)
    assert requests.post(rotated, json={}, timeout=30).status_code == 404
    # A new workflow of the same name is a new workflow, with a key of its own.
    fresh = daemon.deploy(name, CODE.format(version=3))
    assert fresh != rotated
    assert requests.post(rotated, json={}, timeout=30).status_code == 404
    assert requests.post(fresh, json={}, timeout=30).text == "v3 []"


def test_a_refused_request_does_not_make_an_unknown_name_known(daemon, name):
    """Unknown names are looked up each time, not remembered: deploying one then works."""
    url = daemon.deploy(name, CODE.format(version=1))
    missing = url.replace(name, f"{name}-later")
    assert requests.post(missing, json={}, timeout=30).status_code == 404
    later = daemon.deploy(f"{name}-later", CODE.format(version=1))
    assert requests.post(later, json={}, timeout=30).text == "v1 []"


def test_show_has_the_pull_state_the_timers_wrote(daemon, name):
    """The next due time and the skipped count are written by the timers, not by ctl."""
    daemon.deploy(name, "def workflow(settings):\n    pass\n", "--cron", "0 3 * * *",
                  kind="--pull")
    [listed] = [w for w in daemon.ctl_json("list") if w["name"] == name]
    assert listed["next_due"] is not None
    assert daemon.ctl_json("show", name)["next_due"] == listed["next_due"]
