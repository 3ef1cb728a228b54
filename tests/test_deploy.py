"""Deploys, versions, rollback, key rotation, export and import (SPEC 1 and 6)."""

import json

import pytest
import requests

V1 = 'def workflow(_request, settings):\n    return {"status_code": 200, "body": "v1"}\n'
V2 = 'def workflow(_request, settings):\n    return {"status_code": 200, "body": "v2"}\n'


def deploy_file(daemon, name, code, *flags):
    path = daemon.data_dir.parent / f"{name}-deploy.py"
    path.write_text(code)
    return daemon.ctl("deploy", name, str(path), *flags, check=False)


@pytest.mark.parametrize("code, message", [
    ("def workflow(_request, settings):\n    return {\n", "line 2"),
    ("x = 1\ndef workflow(_request, settings)\n    pass\n", "line 2"),
    ("def handler(_request, settings):\n    pass\n", "defines no callable `workflow`"),
    ("workflow = 42\n", "defines no callable `workflow`"),
    ("def workflow(settings):\n    pass\n", "must accept 2 positional argument(s)"),
    ("import no_such_module_here\ndef workflow(a, b):\n    pass\n",
     "No module named 'no_such_module_here'"),
])
def test_broken_code_is_refused_and_the_old_version_keeps_serving(daemon, name, code, message):
    url = daemon.deploy(name, V1)
    refused = deploy_file(daemon, name, code, "--catch")
    assert refused.returncode == 1
    assert message in refused.stderr
    assert "version 1 stays in place" in refused.stderr
    assert refused.stderr.count("\n") == 1  # one line
    response = requests.post(url, json={})
    assert (response.status_code, response.text) == (200, "v1")
    assert [v["version"] for v in daemon.ctl_json("versions", name)] == [1]


def test_a_syntax_error_names_the_file_and_line(daemon, name):
    refused = deploy_file(daemon, name, "def workflow(a, b):\n    pass\n  oops(\n", "--catch")
    assert refused.returncode == 1
    assert f'File "{name}.py", line 3' in refused.stderr
    assert daemon.ctl("show", name, check=False).returncode == 1


def test_old_hrflow_signature_with_body_parameter_is_accepted(daemon, name):
    url = daemon.deploy(name, "def workflow(body, settings):\n"
                              "    return {'status_code': 200, 'body': body['x']}\n")
    assert requests.post(url, json={"x": "positional"}).text == "positional"


def test_module_globals_behave_like_a_script(daemon, name):
    url = daemon.deploy(name, """
        COUNTER = {"calls": 0}

        def format_hook(value):
            return f"<{value}>"

        def workflow(_request, settings):
            hook = globals().get("format_hook")
            missing = globals().get("missing_hook")
            COUNTER["calls"] += 1
            return {"status_code": 200,
                    "body": f"{hook('x')} {missing} {COUNTER['calls']} {__name__}"}
        """)
    assert requests.post(url, json={}).text == "<x> None 1 workflow"
    assert requests.post(url, json={}).text == "<x> None 1 workflow"  # fresh process


@pytest.mark.parametrize("bad", ["Upper", "-dash", "has space", "x" * 64, "dot.name", "é"])
def test_invalid_names_are_refused(daemon, bad):
    path = daemon.data_dir.parent / "valid-code.py"
    path.write_text(V1)
    result = daemon.ctl("deploy", "--catch", "--", bad, str(path), check=False)
    assert result.returncode == 1
    assert "invalid workflow name" in result.stderr


def test_versions_and_rollback(daemon, name):
    url = daemon.deploy(name, V1)
    daemon.deploy(name, V2)
    assert requests.post(url, json={}).text == "v2"
    versions = daemon.ctl_json("versions", name)
    assert [(v["version"], v["current"]) for v in versions] == [(1, False), (2, True)]
    assert all(isinstance(v["version"], int) and v["created_at"].endswith("Z")
               for v in versions)
    daemon.ctl("rollback", name, "1")
    assert requests.post(url, json={}).text == "v1"
    assert [v["current"] for v in daemon.ctl_json("versions", name)] == [True, False]
    missing = daemon.ctl("rollback", name, "9", check=False)
    assert (missing.returncode, missing.stderr.strip()) == (1, f"wfd ctl: {name} has no version 9")
    daemon.deploy(name, V2)
    assert [v["version"] for v in daemon.ctl_json("versions", name)] == [1, 2, 3]


def test_the_kind_is_fixed_at_creation(daemon, name):
    daemon.deploy(name, V1)
    changed = deploy_file(daemon, name, "def workflow(settings):\n    pass\n", "--pull",
                          "--every", "1h")
    assert changed.returncode == 1
    assert "is a catch workflow; its kind cannot change" in changed.stderr


def test_rotate_key_invalidates_the_old_url(daemon, name):
    old = daemon.deploy(name, V1)
    new = daemon.ctl("rotate-key", name).stdout.strip()
    assert new != old and new.rsplit("/", 1)[0] == old.rsplit("/", 1)[0]
    assert len(new.rsplit("/", 1)[1]) >= 22  # at least 128 bits, URL-safe base64
    assert requests.post(old, json={}).status_code == 404
    assert requests.post(new, json={}).status_code == 200
    assert daemon.ctl("url", name).stdout.strip() == new


def test_delete_forgets_the_workflow(daemon, name):
    url = daemon.deploy(name, V1)
    requests.post(url, json={})
    daemon.ctl("delete", name)
    assert requests.post(url, json={}).status_code == 404
    assert name not in [w["name"] for w in daemon.ctl_json("list")]
    gone = daemon.ctl("executions", name, check=False)
    assert (gone.returncode, gone.stderr.strip()) == (1, f"wfd ctl: no workflow named {name}")


def test_public_url_setting_shapes_the_printed_url(make_daemon, name):
    daemon = make_daemon('public_url = "https://hooks.example.com/"\nteam = "acme"\n')
    url = daemon.deploy(name, V1)
    assert url.startswith(f"https://hooks.example.com/teams/acme/{name}/python3.")
    local = url.replace("https://hooks.example.com", daemon.base)
    assert requests.post(local, json={}).text == "v1"


def test_export_then_import_into_a_fresh_daemon(make_daemon, name, tmp_path):
    source = make_daemon()
    url = source.deploy(name, V1)
    source.deploy(name, V2)
    source.ctl("settings", name, "set", "TOKEN=abc", "N:=3")
    source.ctl("disable", name)
    dump = tmp_path / "backup.json"
    source.ctl("export", str(dump))
    exported = json.loads(dump.read_text())
    assert [w["name"] for w in exported["workflows"]] == [name]

    target = make_daemon()
    assert f"imported 1 workflow(s): {name}" in target.ctl("import", str(dump)).stdout
    assert target.ctl_json("settings", name) == {"TOKEN": "abc", "N": 3}
    assert [(v["version"], v["current"]) for v in target.ctl_json("versions", name)] == [
        (1, False), (2, True)]
    [listed] = target.ctl_json("list")
    assert (listed["enabled"], listed["version"]) == (False, 2)
    target.ctl("enable", name)
    moved = url.replace(source.base, target.base)
    assert requests.post(moved, json={}).text == "v2"  # same key: callers change only the host
    again = target.ctl("import", str(dump), check=False)
    assert again.returncode == 1 and "exists already" in again.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something-else"}')
    refused = target.ctl("import", str(bad), check=False)
    assert refused.returncode == 1 and "not a wfd export" in refused.stderr
