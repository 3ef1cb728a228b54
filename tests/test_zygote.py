"""The zygote executor: supervision, fallback, and executions that share nothing."""

import json
import os
import signal
import threading
from pathlib import Path

import requests
from conftest import wait_for

SLEEPER = """
import time
def workflow(_request, settings):
    print("started", flush=True)
    time.sleep(60)
"""

OK = 'def workflow(_request, settings):\n    return {"status_code": 200, "body": "ok"}\n'

# Tests that look at host paths and host pids of executions run without
# isolation, where those are what a forked child sees; the rest run strict.
UNISOLATED = 'isolation = "none"\n'


def status(daemon) -> dict:
    return daemon.ctl_json("status")


def ready_zygote(daemon, not_pid: int | None = None) -> dict:
    """Wait until a zygote (other than `not_pid`) is ready; its status."""
    def ready():
        now = status(daemon)
        return now if now["zygote_state"] == "ready" and now["zygote_pid"] != not_pid else None
    return wait_for(ready, timeout=20, what="a ready zygote")


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def sleeping(argument: str) -> list[int]:
    """Host pids of live `sleep ARGUMENT` processes (zombies are dead already)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if ((entry / "cmdline").read_bytes() == f"sleep\0{argument}\0".encode()
                    and state_of(int(entry.name)) != "Z"):
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


def state_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_zygote_killed_mid_execution(make_daemon, name):
    daemon = make_daemon()
    first = ready_zygote(daemon)["zygote_pid"]
    url = daemon.deploy(name, SLEEPER)
    answers = []
    caller = threading.Thread(target=lambda: answers.append(requests.post(url, json={})))
    caller.start()
    wait_for(lambda: status(daemon)["running"] == 1, what="the execution to start")
    os.kill(first, signal.SIGKILL)
    caller.join(20)
    assert answers and answers[0].status_code == 500
    record = daemon.logs(answers[0].headers["X-Wfd-Execution-Id"])
    assert record["status"] == "error"
    assert "the zygote died (killed by SIGKILL) during the execution" in record["error"]
    second = ready_zygote(daemon, not_pid=first)
    assert second["zygote_restarts"] == 1
    ok_url = daemon.deploy(f"{name}-ok", OK)
    assert requests.post(ok_url, json={}).text == "ok"


def test_zygote_that_cannot_boot_falls_back_to_cold_spawn(make_daemon, name):
    daemon = make_daemon('preload = ["json", "no_such_module_for_wfd"]\n')
    now = wait_for(lambda: (s := status(daemon))["zygote_state"] == "backoff" and s,
                   what="the zygote to back off")
    assert "no_such_module_for_wfd" in now["zygote_error"]
    assert now["fallback"] == "cold spawn while the zygote is down"
    assert now["zygote_pid"] is None
    url = daemon.deploy(name, OK)
    response = requests.post(url, json={})
    assert (response.status_code, response.text) == (200, "ok")


def test_executions_share_nothing(daemon, name):
    url = daemon.deploy(name, """
        import json, os, random, tempfile
        counter = 0
        def workflow(_request, settings):
            global counter
            counter += 1
            marker = os.path.join(tempfile.gettempdir(), "left-behind")
            seen = {"counter": counter, "file": os.path.exists(marker),
                    "preloaded_global": getattr(json, "wfd_left_behind", None),
                    "random": random.random(), "cwd": os.getcwd(),
                    # pid and start time: one process per execution
                    "process": (os.getpid(),
                                open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]),
                    "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd"))}
            open(marker, "w").close()
            json.wfd_left_behind = "from an earlier execution"
            return {"status_code": 200, "body": json.dumps(seen)}
    """)
    runs = [json.loads(requests.post(url, json={}).text) for _ in range(5)]
    assert [run["counter"] for run in runs] == [1] * 5
    assert not any(run["file"] or run["preloaded_global"] for run in runs)
    assert len({run["random"] for run in runs}) == 5
    if status(daemon)["isolation"]["mode"] == "strict":
        # Each has a PID namespace of its own, so pids repeat (PID 1 when
        # forked, 2 below bwrap when cold); warm spares may even share a start tick.
        first = 1 if status(daemon)["executor"] == "zygote" else 2
        assert {run["process"][0] for run in runs} == {first}
    else:
        assert len({tuple(run["process"]) for run in runs}) == 5
    if status(daemon)["isolation"]["mode"] == "none":
        # In the sandbox every execution's cwd is /tmp, on a tmpfs of its own
        # that ends with it; here each has its own host directory, removed
        # once the child is reaped (just after the response).
        assert len({run["cwd"] for run in runs}) == 5
        wait_for(lambda: not any(Path(run["cwd"]).exists() for run in runs),
                 what="the working directories to be removed")
    if status(daemon)["executor"] == "zygote":
        # stdin, stdout, stderr, the result pipe and the one listdir opens: nothing
        # else (no other execution's pipes, no channel, no spare's socket).
        assert all(run["fds"] == [0, 1, 2, 3, 4] for run in runs), [r["fds"] for r in runs]


def test_children_are_reaped(make_daemon, name):
    daemon = make_daemon(UNISOLATED + 'spares_min = 1\nspares_max = 3\n')
    zygote = ready_zygote(daemon)["zygote_pid"]
    url = daemon.deploy(name, OK)
    for _ in range(50):
        assert requests.post(url, json={}).text == "ok"

    def settled():
        kids = children(zygote)
        return 1 <= len(kids) <= 3 and all(state_of(kid) == "S" for kid in kids)
    wait_for(settled, what="only sleeping spares left under the zygote")
    assert ready_zygote(daemon)["zygote_pid"] == zygote


def test_timed_out_execution_is_killed_and_cleaned(make_daemon, name):
    daemon = make_daemon(UNISOLATED)
    zygote = ready_zygote(daemon)["zygote_pid"]
    url = daemon.deploy(name, """
        import os, subprocess, time
        def workflow(_request, settings):
            helper = subprocess.Popen(["sleep", "60"])
            print(os.getcwd(), helper.pid, flush=True)
            time.sleep(60)
    """, "--timeout", "1")
    response = requests.post(url, json={})
    assert response.status_code == 504
    record = daemon.logs(response.headers["X-Wfd-Execution-Id"])
    assert record["status"] == "timeout"
    workdir, helper = record["output"].split()
    wait_for(lambda: not Path(workdir).exists(), what="the workdir to be removed")
    wait_for(lambda: state_of(int(helper)) == "gone", what="the helper to be killed")
    assert ready_zygote(daemon)["zygote_pid"] == zygote


def test_preload_change_restarts_the_zygote(make_daemon, name):
    daemon = make_daemon('preload = ["json"]\n')
    first = ready_zygote(daemon)
    assert first["preload"] == "json"
    url = daemon.deploy(name, OK)
    daemon.config_file.write_text('preload = ["json", "csv"]\n')
    daemon.process.send_signal(signal.SIGHUP)
    second = ready_zygote(daemon, not_pid=first["zygote_pid"])
    assert second["preload"] == "json, csv"
    assert second["zygote_restarts"] == 0  # a planned restart is not a failure
    wait_for(lambda: state_of(first["zygote_pid"]) == "gone", what="the old zygote to exit")
    assert requests.post(url, json={}).text == "ok"


def test_spawn_executor_says_so(make_daemon):
    daemon = make_daemon('executor = "spawn"\n')
    assert status(daemon)["executor"] == "spawn"


def test_what_a_finished_execution_started_is_killed(daemon, name):
    url = daemon.deploy(name, """
        import subprocess
        def workflow(_request, settings):
            subprocess.Popen(["sleep", "60.4242"])  # found on the host by its argument
            return {"status_code": 200, "body": "started"}
    """)
    assert requests.post(url, json={}).text == "started"
    wait_for(lambda: not sleeping("60.4242"), what="the helper to be killed")


# The version the zygote compiled for this workflow before forking the
# execution's process, if it did: the code the execution then ran.
COMPILED_VERSION = """
import sys
def workflow(_request, settings):
    compiled = sys.modules["sandbox.runner"].COMPILED.get(%r)
    return {"status_code": 200, "body": "%s:" + str(compiled and compiled[0])}
"""


def test_a_deployed_version_is_compiled_once_in_the_zygote(daemon, name):
    url = daemon.deploy(name, COMPILED_VERSION % (name, "v1"))
    if daemon.ctl_json("status")["executor"] == "spawn":
        # A fresh interpreter per execution: nothing is shared, each compiles.
        assert requests.post(url, json={}).text == "v1:None"
        return
    # The spares forked once the first execution asked for it inherit it.
    wait_for(lambda: requests.post(url, json={}).text == "v1:1",
             what="an execution forked after the zygote compiled version 1")
    daemon.deploy(name, COMPILED_VERSION % (name, "v2"))
    # Version 2's own code runs from the first request, compiled by its
    # execution until the zygote has compiled it too.
    assert requests.post(url, json={}).text in ("v2:1", "v2:2")
    wait_for(lambda: requests.post(url, json={}).text == "v2:2",
             what="an execution forked after the zygote compiled version 2")
