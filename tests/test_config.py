"""`wfd serve` configuration: TOML plus flags, unknown keys refused, defaults that work."""

import os
import re
import socket
import subprocess
import sys

import pytest
import requests


def serve(tmp_path, config_text, *flags):
    config = tmp_path / "wfd.toml"
    config.write_text(config_text)
    return subprocess.run([sys.executable, "-m", "wfd", "serve", "--config", str(config),
                           "--data-dir", str(tmp_path / "data"), *flags],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("text, message", [
    ("listne = '127.0.0.1:1'\n", "unknown key listne"),
    ("[limits]\ntimeout = 3\n", "unknown key [limits] timeout"),
    ("[limits]\nmemory_mb = -1\n", "[limits] memory_mb must be greater than 0, got -1"),
    ("[limits]\ntimeout_s = '30'\n", "[limits] timeout_s must be a valid number, got '30'"),
    ("[limits]\nconcurrency = true\n", "[limits] concurrency must be a valid integer, got True"),
    ("listen = 'nope'\n", "listen must be HOST:PORT with a port from 1 to 65535, got 'nope'"),
    ("listen = '127.0.0.1:99999'\n",
     "listen must be HOST:PORT with a port from 1 to 65535, got '127.0.0.1:99999'"),
    ("admin_listen = '127.0.0.1'\n", "admin_listen must be HOST:PORT"),
    ("queue_max = 'ten'\n", "queue_max must be a valid integer, got 'ten'"),
    ("queue_max = -1\n", "queue_max must be greater than or equal to 0, got -1"),
    ("grace_s = '30'\n", "grace_s must be a valid number, got '30'"),
    ("team = ''\n", "team must be 1 to 63 letters, digits, '_', '.' or '-'"),
    ("team = 'a/b'\n", "team must be 1 to 63 letters"),
    ("public_url = 'hooks.example.com'\n", "public_url must be empty or start with http://"),
    ("max_body_mb = 0\n", "max_body_mb must be greater than 0, got 0"),
    ("max_json_depth = 1000\n", "max_json_depth must be less than or equal to 254, got 1000"),
    ("max_code_kb = 0\n", "max_code_kb must be greater than 0, got 0"),
    ("spares_min = 9\nspares_max = 2\n", "spares_min must be at most spares_max (2), got 9"),
    ("preload = ['json', 'no such']\n", "preload must be a list of module names, got 'no such'"),
    ("executor = 'fork'\n", "executor must be 'spawn' or 'zygote', got 'fork'"),
    ("isolation = 'maybe'\n", "isolation must be 'strict', 'best-effort' or 'none'"),
    ("log_format = 'xml'\n", "log_format must be 'text' or 'json'"),
    ("[retention]\nversions_per_workflow = 0\n",
     "[retention] versions_per_workflow must be greater than 0, got 0"),
    ("max_zygotes = 0\n", "max_zygotes must be greater than 0, got 0"),
    ("env_idle_s = -1\n", "env_idle_s must be greater than or equal to 0, got -1"),
    ("env_keep_days = '7'\n", "env_keep_days must be a valid number, got '7'"),
    ("[limits]\nfiles_mb = 0\n", "[limits] files_mb must be greater than 0, got 0"),
    ("this is not toml\n", "cannot read config"),
    ("[isolation]\nrequire_cgroup = false\n", "unknown key [isolation] require_cgroup"),
    ("[isolation]\nrequire_cgroups = 'no'\n",
     "[isolation] require_cgroups must be true or false, got 'no'"),
    ("[isolation]\nmode = 'strictest'\n",
     "[isolation] mode must be 'strict', 'best-effort' or 'none', got 'strictest'"),
])
def test_bad_config_is_refused_at_start_with_one_line_naming_the_key(tmp_path, text, message):
    result = serve(tmp_path, text)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr  # never a traceback
    assert not (tmp_path / "data").exists()  # refused before touching any state


def test_a_listen_address_that_is_taken_is_a_start_up_error_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = serve(tmp_path, "", "--listen", address, "--socket",
                       f"/tmp/wfd-taken-{os.getpid()}.sock")
    assert result.returncode == 1
    assert "cannot-start" in result.stderr
    assert f"cannot listen on {address}: " in result.stderr
    assert "Traceback" not in result.stderr


def test_config_file_limits_apply_and_flags_override(make_daemon, name):
    daemon = make_daemon("[limits]\ntimeout_s = 1\nmemory_mb = 200\n", extra_args=(
        "--team", "acme"))
    url = daemon.deploy(name, """
        import time
        def workflow(_request, settings):
            time.sleep(5)
        """)
    assert "/teams/acme/" in url
    response = requests.post(url, json={})
    assert response.status_code == 504
    limits = daemon.ctl_json("show", name)["effective_limits"]
    assert (limits["timeout_s"], limits["memory_mb"]) == (1, 200)


def test_one_log_line_per_execution(make_daemon, name):
    daemon = make_daemon()
    url = daemon.deploy(name, "def workflow(_request, settings):\n    pass\n")
    execution_id = requests.post(url, json={"secret": "do-not-log"}).headers["X-Wfd-Execution-Id"]
    lines = [line for line in daemon.log().splitlines() if execution_id in line]
    assert len(lines) == 1
    assert re.search(rf"execution id={execution_id} workflow={name} version=1 trigger=catch "
                     r"status=success duration_ms=[\d.]+ http=200$", lines[0])
    assert "do-not-log" not in daemon.log()


def test_json_log_format(make_daemon, name):
    import json

    daemon = make_daemon('log_format = "json"\n')
    url = daemon.deploy(name, "def workflow(_request, settings):\n    pass\n")
    execution_id = requests.post(url, json={}).headers["X-Wfd-Execution-Id"]
    [line] = [line for line in daemon.log().splitlines() if execution_id in line]
    event = json.loads(line)
    assert (event["event"], event["id"], event["workflow"], event["status"]) == (
        "execution", execution_id, name, "success")


def test_wfd_ctl_imports_nothing_heavy():
    probe = ("import sys, wfd.cli, wfd.control.cli; "
             "print(sorted(m for m in ('aiohttp', 'hrflow', 'requests', 'aiosqlite', 'uvloop',"
             " 'orjson', 'asyncio') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.strip() == "[]"


def test_sighup_with_a_value_of_the_wrong_type_keeps_the_old_config(make_daemon, name):
    import signal

    from conftest import wait_for

    daemon = make_daemon("[limits]\ntimeout_s = 3\n")
    url = daemon.deploy(name, "def workflow(_request, settings):\n    return None\n")
    daemon.config_file.write_text('queue_max = "ten"\n[limits]\ntimeout_s = 9\n')
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload-failed" in daemon.log(), what="the reload to fail")
    assert "queue_max must be a valid integer, got 'ten'" in daemon.log()
    assert daemon.ctl_json("show", name)["effective_limits"]["timeout_s"] == 3
    assert requests.post(url, json={}, timeout=30).status_code == 200
