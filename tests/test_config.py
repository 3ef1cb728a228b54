"""`wfd serve` configuration: TOML plus flags, unknown keys refused, defaults that work."""

import re
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
    ("listne = '127.0.0.1:1'\n", "unknown key(s): listne"),
    ("[limits]\ntimeout = 3\n", "unknown [limits] key(s): timeout"),
    ("[limits]\nmemory_mb = -1\n", "limit memory_mb must be a positive number, got -1"),
    ("listen = 'nope'\n", "listen address must be HOST:PORT, got 'nope'"),
    ("log_format = 'xml'\n", "log_format must be 'text' or 'json'"),
    ("this is not toml\n", "cannot read config"),
    ("[isolation]\nrequire_cgroup = false\n", "unknown [isolation] key(s): require_cgroup"),
    ("[isolation]\nrequire_cgroups = 'no'\n",
     "[isolation] require_cgroups must be true or false, got 'no'"),
    ("[isolation]\nmode = 'strictest'\n", "isolation must be one of strict"),
])
def test_bad_config_is_refused_at_start_with_a_clear_message(tmp_path, text, message):
    result = serve(tmp_path, text)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "data").exists()  # refused before touching any state


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
