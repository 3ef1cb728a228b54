"""Workflow environments (SPEC 10): packages declared, built with uv from the index, shared.

These build real environments from the package index, with small pure
packages (six, tomli-w). One daemon serves the module, and every daemon
here shares one uv cache, so each wheel is downloaded once per session.
"""

import json
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import Daemon, wait_for


def with_six(version: str) -> str:
    return f"""\
# /// script
# dependencies = ["six=={version}"]
# ///
import sys
import six

def workflow(_request, settings):
    return {{"status_code": 200, "body": f"six {{six.__version__}} in {{sys.prefix}}"}}
"""


@pytest.fixture(scope="module")
def envd(tmp_path_factory: pytest.TempPathFactory, uv_cache: Path) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path_factory.mktemp("envs") / "data",
                    f'env_cache_dir = "{uv_cache}"\n[limits]\ntimeout_s = 20\n').start()
    yield daemon
    daemon.kill()


def deploy(daemon: Daemon, name: str, code: str, *flags: str, check: bool = True):
    path = daemon.data_dir.parent / f"{name}.py"
    path.write_text(textwrap.dedent(code))
    return daemon.ctl("deploy", name, str(path), "--catch", *flags, check=check)


def url(daemon: Daemon, name: str) -> str:
    return daemon.ctl("url", name).stdout.strip()


def body(address: str) -> str:
    response = requests.post(address, json={}, timeout=30)
    assert response.status_code == 200, response.text
    return response.text


def test_a_declared_package_is_imported_while_the_default_environment_has_none(envd, name):
    deployed = deploy(envd, name, with_six("1.16.0"))
    assert "resolving six==1.16.0" in deployed.stderr
    assert body(url(envd, name)).startswith("six 1.16.0 in ")
    shown = envd.ctl_json("show", name)
    assert shown["requirements"]["dependencies"] == ["six==1.16.0"]
    assert len(shown["environment"]) == 16

    refused = deploy(envd, f"{name}-plain", """
        import six
        def workflow(_request, settings):
            return None
        """, check=False)
    assert refused.returncode == 1
    assert "No module named 'six'" in refused.stderr


def test_requires_python_that_no_host_interpreter_satisfies_is_refused_naming_them(
        envd, name):
    code = with_six("1.16.0").replace("# dependencies", '# requires-python = ">=3.99"\n'
                                                        "# dependencies")
    refused = deploy(envd, name, code, check=False)
    assert refused.returncode == 1
    assert "no interpreter on this host satisfies requires-python '>=3.99'" in refused.stderr
    assert "available: 3." in refused.stderr


def test_two_workflows_run_conflicting_versions_of_one_package_at_once(envd, name):
    deploy(envd, f"{name}-old", with_six("1.16.0"))
    deploy(envd, f"{name}-new", with_six("1.17.0"))
    addresses = [url(envd, f"{name}-old"), url(envd, f"{name}-new")] * 4
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(body, addresses))
    assert [a.split(" in ")[0] for a in answers] == ["six 1.16.0", "six 1.17.0"] * 4
    assert envd.ctl_json("show", f"{name}-old")["environment"] != envd.ctl_json(
        "show", f"{name}-new")["environment"]


def test_an_unresolvable_requirement_is_refused_naming_it_and_the_old_version_serves(
        envd, name):
    deploy(envd, name, with_six("1.16.0"))
    broken = with_six("1.16.0").replace('"six==1.16.0"',
                                        '"six==1.16.0", "wfd-no-such-package-zq9==1.0"')
    refused = deploy(envd, name, broken, check=False)
    assert refused.returncode == 1
    assert "deploy refused, version 1 stays in place" in refused.stderr
    assert "wfd-no-such-package-zq9" in refused.stderr
    assert [v["version"] for v in envd.ctl_json("versions", name)] == [1]
    assert body(url(envd, name)).startswith("six 1.16.0")


def test_requirements_file_and_a_second_deploy_of_the_same_set_reuses_its_environment(
        envd, name, tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# what the connector needs\ntomli-w==1.0.0\n")
    code = """
        import tomli_w
        def workflow(_request, settings):
            return {"status_code": 200, "body": tomli_w.dumps({"a": 1})}
        """
    first = deploy(envd, f"{name}-a", code, "--requirements", str(requirements))
    assert "building environment" in first.stderr
    assert body(url(envd, f"{name}-a")) == "a = 1\n"
    second = deploy(envd, f"{name}-b", code, "--requirements", str(requirements))
    digest = envd.ctl_json("show", f"{name}-a")["environment"]
    assert f"reusing environment {digest}" in second.stderr
    assert "building" not in second.stderr
    assert envd.ctl_json("show", f"{name}-b")["environment"] == digest
    assert envd.ctl_json("show", f"{name}-b")["requirements"]["dependencies"] == [
        "tomli-w==1.0.0"]
    [listed] = [e for e in envd.ctl_json("envs") if e["hash"] == digest]
    assert listed["workflows"] == [f"{name}-a", f"{name}-b"]
    assert listed["packages"] == ["tomli-w==1.0.0"] and listed["size_mb"] > 0
    assert listed["zygote"]["state"] == "ready" and listed["zygote"]["self_test"] == "passed"

    for workflow in (f"{name}-a", f"{name}-b"):
        envd.ctl("delete", workflow)
    assert digest in envd.ctl_json("envs", "prune")["removed"]
    assert digest not in [e["hash"] for e in envd.ctl_json("envs")]


def test_an_idle_zygote_stops_and_the_least_recently_used_makes_room(
        make_daemon, name, uv_cache):
    daemon = make_daemon(f'env_cache_dir = "{uv_cache}"\nenv_idle_s = 2\nmax_zygotes = 1\n')
    deploy(daemon, f"{name}-a", with_six("1.16.0"))
    deploy(daemon, f"{name}-b", with_six("1.17.0"))

    def zygotes() -> dict[str, str]:
        return {e["workflows"][0]: e["zygote"]["state"] for e in daemon.ctl_json("envs")}

    # A proven environment's request cold-spawns while its zygote starts again.
    assert body(url(daemon, f"{name}-a")).startswith("six 1.16.0")
    wait_for(lambda: zygotes() == {f"{name}-a": "ready", f"{name}-b": "stopped"}, timeout=30,
             what="a's zygote to start in b's place")
    assert body(url(daemon, f"{name}-b")).startswith("six 1.17.0")
    wait_for(lambda: zygotes() == {f"{name}-a": "stopped", f"{name}-b": "ready"}, timeout=30,
             what="b's zygote to start in a's place")
    wait_for(lambda: zygotes()[f"{name}-b"] == "stopped", timeout=10,
             what="the idle zygote to stop")
    assert body(url(daemon, f"{name}-b")).startswith("six 1.17.0")  # starts again


def test_export_carries_the_requirements_and_import_rebuilds_the_environment(
        make_daemon, name, uv_cache, tmp_path):
    source = make_daemon(f'env_cache_dir = "{uv_cache}"\n')
    deploy(source, name, with_six("1.16.0"))
    digest = source.ctl_json("show", name)["environment"]
    backup = tmp_path / "backup.json"
    source.ctl("export", str(backup))
    [version] = json.loads(backup.read_text())["workflows"][0]["versions"]
    assert version["requirements"]["dependencies"] == ["six==1.16.0"]
    assert version["environment"]["pins"] == "six==1.16.0\n"

    target = make_daemon(f'env_cache_dir = "{uv_cache}"\n')
    target.ctl("import", str(backup))
    assert [e["hash"] for e in target.ctl_json("envs")] == [digest]
    assert body(url(target, name)).startswith("six 1.16.0")


def test_an_environment_no_workflow_uses_is_removed_after_env_keep_days(
        make_daemon, name, uv_cache):
    daemon = make_daemon(f'env_cache_dir = "{uv_cache}"\nenv_keep_days = 0\n')
    deploy(daemon, name, with_six("1.16.0"))
    digest = daemon.ctl_json("show", name)["environment"]
    daemon.ctl("delete", name)
    assert [e["hash"] for e in daemon.ctl_json("envs")] == [digest]  # until the next pass
    daemon.stop()
    daemon.start()  # a pass runs at start-up, then hourly
    wait_for(lambda: daemon.ctl_json("envs") == [], timeout=10,
             what="the unused environment to be removed")
    assert not (daemon.data_dir / "envs" / digest).exists()


# Run by the environment's interpreter at start-up (a .pth file, as a package
# may install): the self-test's probe then finds its runtime writable.
FAULT = "import sys; sys.prefix = '/tmp'\n"


def test_a_zygote_failing_its_self_test_refuses_executions_until_a_start_passes(
        make_daemon, name, uv_cache):
    daemon = make_daemon(f'env_cache_dir = "{uv_cache}"\nenv_idle_s = 1\n')
    deploy(daemon, name, with_six("1.16.0"))
    address = url(daemon, name)
    digest = daemon.ctl_json("show", name)["environment"]
    [site] = (daemon.data_dir / "envs" / digest).glob("lib/python3*/site-packages")
    fault = site / "wfd-test-fault.pth"
    fault.write_text(FAULT)

    def state() -> str:
        return daemon.ctl_json("envs")[0]["zygote"]["state"]

    wait_for(lambda: state() == "stopped", timeout=10, what="the idle zygote to stop")
    # The environment passed a self-test: its request cold-spawns while the zygote restarts.
    assert body(address).startswith("six 1.16.0")
    wait_for(lambda: "isolation-self-test-failed" in daemon.log(), timeout=30,
             what="the restarted zygote's self-test to fail")
    for _ in range(2):  # each waits for a new start, whose self-test fails again
        refused = requests.post(address, json={}, timeout=30)
        assert refused.status_code == 500
        error = daemon.logs(refused.headers["X-Wfd-Execution-Id"])["error"]
        assert "self-test failed" in error and "runtime_read_only" in error, error
    assert state() == "stopped"

    fault.unlink()
    assert body(address).startswith("six 1.16.0")  # a start that passes serves again
    assert daemon.ctl_json("envs")[0]["zygote"]["self_test"] == "passed"
