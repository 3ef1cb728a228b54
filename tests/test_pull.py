"""Pull workflows (SPEC 3): timers that fire on time, never overlap and survive restarts."""

import itertools
import json
import time
from datetime import datetime

import pytest
from conftest import wait_for

COUNTER = """
def workflow(settings):
    settings["n"] = settings.get("n", 0) + 1
"""

SLOW = """
import time
def workflow(settings):
    time.sleep(2.5)
"""

def when(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def pull_records(daemon, name, status="success"):
    return [r for r in daemon.executions(name, limit=100)
            if r["trigger"] == "pull" and r["status"] == status][::-1]


def test_every_1s_fires_on_time(daemon, name):
    daemon.deploy(name, COUNTER, "--every", "1s", kind="--pull")
    runs = wait_for(lambda: (r := pull_records(daemon, name)) and len(r) >= 4 and r,
                    timeout=15, what="four pull runs")
    starts = [when(r["started_at"]) for r in runs[:4]]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(0.8 < gap < 1.25 for gap in gaps), gaps
    assert daemon.ctl_json("settings", name)["n"] >= 4


def test_a_long_run_never_overlaps_itself(daemon, name):
    daemon.deploy(name, SLOW, "--every", "1s", kind="--pull")
    runs = wait_for(lambda: (r := pull_records(daemon, name)) and len(r) >= 2 and r,
                    timeout=20, what="two finished runs")
    first, second = runs[:2]
    assert when(second["started_at"]) >= when(first["started_at"]) + first["duration_ms"] / 1000
    skipped = wait_for(lambda: pull_records(daemon, name, "skipped"), what="a skipped record")
    assert len(skipped) <= len(runs)  # coalesced: at most one per run, not one per tick
    assert "tick(s) skipped" in skipped[0]["error"]
    shown = daemon.ctl_json("show", name)
    assert shown["skipped"] >= 2
    busy = daemon.ctl("run", name, check=False)
    if busy.returncode == 1:  # a run is in progress right now, as is likely
        assert "has a run in progress; pull runs never overlap" in busy.stderr


def test_manual_run_while_running_is_refused_clearly(daemon, name):
    daemon.deploy(name, SLOW, "--every", "1h", kind="--pull")
    import subprocess
    import sys

    first = subprocess.Popen([sys.executable, "-m", "wfd", "ctl", "--socket", daemon.socket,
                              "run", name], stdout=subprocess.PIPE, text=True)
    wait_for(lambda: daemon.ctl_json("status")["running"] >= 1, what="the first run")
    second = daemon.ctl("run", name, check=False)
    assert second.returncode == 1
    assert second.stderr == (f"wfd ctl: {name} has a run in progress; "
                             "pull runs never overlap\n")
    assert first.wait(30) == 0
    assert ": success (" in first.stdout.read()


def test_a_raised_exception_keeps_no_settings_change(daemon, name):
    daemon.deploy(name, """
        def workflow(settings):
            settings["LAST_UID"] = "advanced"
            raise ConnectionError("records endpoint down")
        """, "--every", "1h", kind="--pull")
    daemon.ctl("settings", name, "set", "LAST_UID=u0")
    result = daemon.ctl("run", name, check=False)
    assert result.returncode == 4
    assert "ConnectionError: records endpoint down" in result.stdout
    assert daemon.ctl_json("settings", name) == {"LAST_UID": "u0"}
    [record] = daemon.executions(name)
    assert (record["trigger"], record["status"], record["http_status"]) == (
        "manual", "error", None)


def test_restart_after_missed_ticks_runs_once_then_keeps_the_schedule(make_daemon, name):
    daemon = make_daemon()
    daemon.deploy(name, COUNTER, "--every", "1s", kind="--pull")
    wait_for(lambda: pull_records(daemon, name), what="a first run")
    assert daemon.stop() == 0
    stopped_at = time.time()
    # The daemon stays down across several due times: that passing time is the test.
    time.sleep(3.5)
    restarted = make_daemon(data_dir=daemon.data_dir)
    back_at = time.time()
    runs = wait_for(lambda: (r := [x for x in pull_records(restarted, name)
                                   if when(x["started_at"]) > stopped_at]) and len(r) >= 3 and r,
                    timeout=15, what="three runs after the restart")
    starts = [when(r["started_at"]) for r in runs]
    assert starts[0] - back_at < 0.5  # overdue: runs at once...
    assert sum(1 for s in starts if s < starts[0] + 0.8) == 1  # ...once, not per missed tick
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(0.8 < gap < 1.25 for gap in gaps), gaps


def test_the_next_due_time_survives_a_restart(make_daemon, name):
    daemon = make_daemon()
    daemon.deploy(name, COUNTER, "--cron", "0 3 * * *", "--tz", "Europe/Paris", kind="--pull")
    [listed] = daemon.ctl_json("list")
    assert listed["schedule"] == "cron 0 3 * * * Europe/Paris"
    due = listed["next_due"]
    assert datetime.fromisoformat(due.replace("Z", "+00:00")).astimezone(
        __import__("zoneinfo").ZoneInfo("Europe/Paris")).hour == 3
    assert daemon.stop() == 0
    restarted = make_daemon(data_dir=daemon.data_dir)
    assert restarted.ctl_json("list")[0]["next_due"] == due


@pytest.mark.parametrize("flags, message", [
    (("--cron", "61 * * * *"), "invalid cron expression '61 * * * *'"),
    (("--cron", "* * * *"), "invalid schedule"),
    (("--cron", "0 0 30 2 *"), "invalid schedule"),
    (("--cron", "0 3 * * *", "--tz", "Mars/Olympus"), "unknown time zone 'Mars/Olympus'"),
    (("--every", "1s", "--tz", "Europe/Paris"), "a time zone applies only to cron schedules"),
    (("--every", "0s"), "invalid schedule"),
    (("--every", "5"), "write 5s for seconds"),
    (("--every", "1s", "--cron", "* * * * *"), "give either 'every' or 'cron', not both"),
    ((), "a pull schedule needs 'every'"),
], ids=lambda v: None if isinstance(v, str) else " ".join(v))
def test_invalid_schedules_are_refused_at_deploy(daemon, name, tmp_path, flags, message):
    path = tmp_path / "pull.py"
    path.write_text(COUNTER)
    result = daemon.ctl("deploy", name, str(path), "--pull", *flags, check=False)
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
    assert name not in [w["name"] for w in daemon.ctl_json("list")]


def test_catch_workflows_take_no_schedule(daemon, name, tmp_path):
    path = tmp_path / "catch.py"
    path.write_text("def workflow(_request, settings):\n    pass\n")
    result = daemon.ctl("deploy", name, str(path), "--catch", "--every", "1s", check=False)
    assert (result.returncode, "a catch workflow takes no schedule" in result.stderr) == (1, True)


def test_disable_stops_the_timer_and_enable_restarts_it(daemon, name):
    daemon.deploy(name, COUNTER, "--every", "1s", kind="--pull")
    wait_for(lambda: pull_records(daemon, name), what="a first run")
    daemon.ctl("disable", name)
    settled = len(pull_records(daemon, name))
    assert daemon.ctl_json("list") and daemon.ctl_json("show", name)["next_due"] is None
    time.sleep(2.2)  # two due times pass while disabled: nothing may fire
    assert len(pull_records(daemon, name)) == settled
    daemon.ctl("enable", name)
    wait_for(lambda: len(pull_records(daemon, name)) > settled, timeout=5,
             what="a run after enable")


def test_a_new_schedule_takes_effect_at_once(daemon, name):
    daemon.deploy(name, COUNTER, "--every", "1h", kind="--pull")
    daemon.deploy(name, COUNTER, "--every", "1s", kind="--pull")
    assert daemon.ctl_json("show", name)["schedule"] == "every 1s"
    wait_for(lambda: pull_records(daemon, name), timeout=4, what="a run on the new schedule")


def test_deleting_a_workflow_while_it_runs(daemon, name):
    daemon.deploy(name, """
        import time
        def workflow(settings):
            settings["written"] = True
            time.sleep(1.5)
        """, "--every", "1s", kind="--pull")
    wait_for(lambda: daemon.ctl_json("show", name)["last_execution"] is None
             and daemon.ctl_json("status")["running"] >= 1, what="the run to start")
    daemon.ctl("delete", name)
    wait_for(lambda: daemon.ctl_json("status")["running"] == 0, what="the run to end")
    assert name not in [w["name"] for w in daemon.ctl_json("list")]
    daemon.deploy(name, COUNTER, "--every", "1h", kind="--pull")
    assert daemon.ctl_json("settings", name) == {}  # nothing of the deleted run was kept
    assert daemon.executions(name) == []
    assert daemon.ctl_json("status")["state"] == "serving"


def test_list_json_shape_for_pull(daemon, name):
    daemon.deploy(name, COUNTER, "--every", "5m", kind="--pull")
    [listed] = [w for w in daemon.ctl_json("list") if w["name"] == name]
    assert (listed["kind"], listed["schedule"], listed["enabled"]) == ("pull", "every 5m", True)
    assert json.dumps(listed)  # plain JSON
    assert daemon.ctl("url", name, check=False).returncode == 1
