"""Per-workflow environment variables (SPEC 10): seen by the code, never shown."""

import json

import pytest
import requests

SECRET = "s3cr3t-value-4f1c"
PRINT_ENV = """
import json, os
def workflow(_request, settings):
    names = ("API_TOKEN", "STORE", "PATH", "WFD_WORKFLOW_DIR")
    return {"status_code": 200, "body": json.dumps({k: os.environ.get(k) for k in names})}
"""


def seen(url: str) -> dict:
    response = requests.post(url, json={}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_code_sees_its_variables_and_nothing_shows_their_values(daemon, name, tmp_path):
    url = daemon.deploy(name, PRINT_ENV)
    daemon.ctl("env", name, "set", f"API_TOKEN={SECRET}", "STORE=localjson")
    env = seen(url)
    assert (env["API_TOKEN"], env["STORE"]) == (SECRET, "localjson")
    assert env["PATH"] and env["PATH"] != SECRET

    listed = daemon.ctl("env", name).stdout
    assert "API_TOKEN" in listed and "STORE" in listed and SECRET not in listed
    assert daemon.ctl_json("env", name) == ["API_TOKEN", "STORE"]
    assert SECRET not in daemon.ctl("show", name, "--json").stdout
    assert SECRET not in daemon.ctl("export").stdout
    assert SECRET not in daemon.log()

    daemon.ctl("env", name, "unset", "API_TOKEN")
    assert seen(url)["API_TOKEN"] is None
    assert daemon.ctl_json("env", name) == ["STORE"]


def test_variables_outlive_redeploys_and_restarts_and_move_only_with_secrets(
        make_daemon, name, tmp_path):
    source = make_daemon()
    source.deploy(name, PRINT_ENV)
    source.ctl("env", name, "set", f"API_TOKEN={SECRET}")
    url = source.deploy(name, PRINT_ENV)  # version 2
    source.stop()
    source.start()
    assert seen(url)["API_TOKEN"] == SECRET

    plain = json.loads(source.ctl("export").stdout)
    assert SECRET not in json.dumps(plain)
    assert plain["workflows"][0]["env_names"] == ["API_TOKEN"]
    backup = tmp_path / "with-secrets.json"
    source.ctl("export", str(backup), "--with-secrets")
    assert SECRET in backup.read_text()

    target = make_daemon()
    target.ctl("import", str(backup))
    moved = target.ctl("url", name).stdout.strip()
    assert seen(moved)["API_TOKEN"] == SECRET


@pytest.mark.parametrize("variable", ["PYTHONPATH", "PYTHONSTARTUP", "LD_PRELOAD", "PATH",
                                      "HOME", "WFD_WORKFLOW_DIR", "TMPDIR"])
def test_names_that_change_python_or_the_sandbox_are_refused(daemon, name, variable):
    daemon.deploy(name, PRINT_ENV)
    refused = daemon.ctl("env", name, "set", f"{variable}=/evil", "OK=1", check=False)
    assert refused.returncode == 1
    assert f"{variable} is reserved" in refused.stderr
    assert daemon.ctl_json("env", name) == []  # nothing of the command was kept
