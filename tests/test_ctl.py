"""`wfd ctl` as operators and scripts use it: text, --json shapes, exit codes."""

import json
import re
import subprocess
import sys

import requests

HELLO = 'def workflow(_request, settings):\n    return {"status_code": 201, "body": "hi " + ' \
        '_request.get("who", "?")}\n'


def ctl(socket_path, *args):
    return subprocess.run([sys.executable, "-m", "wfd", "ctl", "--socket", socket_path, *args],
                          capture_output=True, text=True, timeout=60)


def test_daemon_not_running_has_its_own_exit_code(tmp_path):
    result = ctl(str(tmp_path / "none.sock"), "list")
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr.startswith("wfd ctl: wfd is not running (no daemon at ")
    assert result.stderr.count("\n") == 1


def test_usage_errors_exit_2(daemon):
    assert ctl(daemon.socket, "no-such-command").returncode == 2
    assert ctl(daemon.socket, "deploy", "x").returncode == 2
    bad_data = daemon.ctl("run", "x", "--data", "{oops", check=False)
    assert bad_data.returncode == 2 and "--data is not valid JSON" in bad_data.stderr


def test_refused_commands_exit_1_with_one_line(daemon):
    result = daemon.ctl("show", "missing-workflow", check=False)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "wfd ctl: no workflow named missing-workflow\n"


def test_list_and_show_in_text_and_json(daemon, name):
    daemon.deploy(name, HELLO, "--timeout", "7", "--memory", "300", "--concurrency", "3")
    listed = {w["name"]: w for w in daemon.ctl_json("list")}
    assert listed[name]["kind"] == "catch"
    assert listed[name]["enabled"] is True
    assert listed[name]["version"] == 1
    assert listed[name]["schedule"] is None
    text = daemon.ctl("list").stdout.splitlines()
    assert re.match(r"NAME\s+KIND\s+ENABLED\s+VERSION\s+SCHEDULE\s+NEXT_DUE$", text[0])
    assert any(re.match(rf"{re.escape(name)}\s+catch\s+True\s+1\s+-\s+-$", line)
               for line in text)
    shown = daemon.ctl_json("show", name)
    limits = shown["effective_limits"]
    assert (limits["timeout_s"], limits["memory_mb"], limits["concurrency"]) == (7, 300, 3)
    assert "catch_key" not in json.dumps(shown) and "code" not in shown


def test_a_redeploy_keeps_the_limits_it_does_not_name(daemon, name):
    daemon.deploy(name, HELLO, "--timeout", "7", "--memory", "300")
    daemon.deploy(name, HELLO, "--memory", "400")
    shown = daemon.ctl_json("show", name)
    assert shown["version"] == 2
    assert shown["limits"] == {"timeout_s": 7, "memory_mb": 400}
    limits = shown["effective_limits"]
    assert (limits["timeout_s"], limits["memory_mb"], limits["cpu_s"]) == (7, 400, 30)


def test_run_a_catch_workflow_by_hand(daemon, name):
    daemon.deploy(name, HELLO)
    result = daemon.ctl("run", name, "--data", '{"who": "ops"}')
    lines = result.stdout.splitlines()
    assert re.match(r"execution [0-9a-z]{26}: success \(\d+ ms\)$", lines[0])
    assert lines[1:] == ["response: 201", "hi ops"]
    [record] = daemon.executions(name)
    assert (record["trigger"], record["status"], record["http_status"]) == ("manual", "success",
                                                                          201)


def test_run_reports_a_failed_execution_with_exit_4(daemon, name):
    daemon.deploy(name, "def workflow(_request, settings):\n    raise KeyError('x')\n")
    result = daemon.ctl("run", name, check=False)
    assert result.returncode == 4
    assert ": error (" in result.stdout
    assert "error: KeyError: 'x'" in result.stdout
    assert "response: 500" in result.stdout


def test_executions_and_logs_shapes(daemon, name):
    url = daemon.deploy(name, "def workflow(_request, settings):\n    print('hello log')\n")
    ids = [requests.post(url, json={}).headers["X-Wfd-Execution-Id"] for _ in range(3)]
    records = daemon.executions(name)
    assert [r["id"] for r in records] == ids[::-1]  # newest first
    first = records[0]
    assert set(first) >= {"id", "workflow", "version", "trigger", "status", "started_at",
                          "duration_ms", "http_status"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["started_at"])
    assert (first["workflow"], first["trigger"], first["http_status"]) == (name, "catch", 200)
    assert isinstance(first["duration_ms"], float)
    assert len(daemon.executions(name, limit=2)) == 2
    log = daemon.ctl("logs", ids[0]).stdout
    assert "status: success" in log and "--- output ---\nhello log" in log
    table = daemon.ctl("executions", name).stdout.splitlines()
    assert table[0].split() == ["ID", "STARTED_AT", "TRIGGER", "ATTEMPT", "STATUS", "DELIVERY",
                                "HTTP_STATUS", "DURATION_MS", "VERSION"]
    assert len(table) == 4


def test_status(daemon):
    status = daemon.ctl_json("status")
    assert status["state"] == "serving"
    assert status["listen"] == f"127.0.0.1:{daemon.port}"
    assert status["workflows"] >= 0 and status["concurrency"] >= 1
    assert "state: serving" in daemon.ctl("status").stdout


def test_a_malformed_request_on_the_socket_does_not_hurt_the_daemon(daemon):
    import socket

    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(daemon.socket)
        raw.sendall(b"{this is not json\n")
        answer = json.loads(raw.makefile().readline())
        assert answer["ok"] is False and "malformed request" in answer["error"]
        raw.sendall(b'{"id": 5, "command": "list", "args": {"bogus": 1}}\n')
        answer = json.loads(raw.makefile().readline())
        assert (answer["id"], answer["ok"]) == (5, False)
    assert daemon.ctl_json("status")["state"] == "serving"


def test_unreadable_files_are_one_line_errors(daemon, tmp_path):
    missing = daemon.ctl("deploy", "x", str(tmp_path / "missing.py"), "--catch", check=False)
    assert missing.returncode == 1
    assert missing.stderr == (f"wfd ctl: cannot read {tmp_path / 'missing.py'}: "
                              "No such file or directory\n")
    not_json = tmp_path / "backup.json"
    not_json.write_text("{oops")
    refused = daemon.ctl("import", str(not_json), check=False)
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"wfd ctl: {not_json} is not JSON: ")
