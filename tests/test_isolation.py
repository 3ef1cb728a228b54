"""Isolation modes at start-up: what each refuses, degrades to, and reports.

The hostile suite (test_hostile.py) attacks a strict daemon; this file checks
the operator's side: the start-up error of strict mode on a host without
bwrap or with a layer that fails its self-test, best-effort's degradation to
the layers that remain, `none`, and what `wfd ctl status` and /healthz say in
each case.
"""

import os
import shutil

import pytest
import requests
from conftest import Daemon, wait_for

# A PATH without bwrap or setpriv: how a host without bubblewrap looks to the daemon.
NO_BWRAP = {"PATH": "/nonexistent"}
SANDBOX_LAYERS = ("namespaces", "identity", "filesystem", "network")
NETWORK_CHECKS = ("daemon_port_unreachable", "abstract_socket_unreachable",
                  "private_range_denied")
SANDBOX_CHECKS = ("data_dir_hidden", "host_processes_hidden", "other_executions_hidden",
                  "unprivileged", "runtime_read_only", *NETWORK_CHECKS)


def layers(daemon: Daemon) -> dict[str, bool]:
    status = daemon.ctl_json("status")["isolation"]
    return {name: layer["active"] for name, layer in status["layers"].items()}


def self_test(daemon: Daemon) -> dict[str, dict]:
    return daemon.ctl_json("status")["isolation"]["self_test"]


def test_strict_is_the_default_and_every_layer_is_active_and_proven(daemon):
    status = daemon.ctl_json("status")["isolation"]
    assert status["mode"] == "strict"
    assert all(layers(daemon).values()), status["layers"]
    assert {name: c["held"] for name, c in self_test(daemon).items()} == dict.fromkeys(
        ("probe_ran", *SANDBOX_CHECKS, "scratch_not_shared", "no_survivors"), True)
    health = requests.get(f"{daemon.base}/healthz", timeout=5).json()
    assert health["isolation"] == {"mode": "strict", "active": list(layers(daemon)),
                                   "self_test": "passed"}


def test_ctl_status_text_lists_each_layer(daemon):
    text = daemon.ctl("status").stdout
    executor = daemon.ctl_json("status")["executor"]
    assert f"isolation: strict (executor {executor})" in text
    for name in ("rlimits", *SANDBOX_LAYERS, "cgroup", "no_survivors"):
        assert any(line.split()[:2] == [name, "on"] for line in text.splitlines()), text


def test_status_says_how_each_executor_gets_its_namespaces(daemon):
    status = daemon.ctl_json("status")
    detail = status["isolation"]["layers"]["namespaces"]["detail"]
    forked = "per execution its own user, mount, pid and ipc namespaces" in detail
    assert forked == (status["executor"] == "zygote"), detail


def test_strict_without_bwrap_refuses_to_start_and_says_what_to_do(make_daemon):
    daemon = make_daemon(start=False, env=NO_BWRAP)
    assert daemon.spawn().wait(30) == 1
    log = daemon.log()
    assert "cannot-start" in log and "bwrap not on PATH" in log
    assert "apt-get install bubblewrap" in log and 'isolation = "best-effort"' in log


# A bubblewrap that quietly gives no PID namespace (a broken build, a wrapper
# gone wrong): every other layer stays as detection expects.
BWRAP_WITHOUT_PID_NAMESPACE = """#!/bin/sh
for arg; do
    shift
    [ "$arg" = --unshare-pid ] || set -- "$@" "$arg"
done
exec {bwrap} "$@"
"""


def test_strict_refuses_to_start_when_one_layer_fails_its_self_test(make_daemon, tmp_path):
    wrapper = tmp_path / "bin" / "bwrap"
    wrapper.parent.mkdir()
    wrapper.write_text(BWRAP_WITHOUT_PID_NAMESPACE.format(bwrap=shutil.which("bwrap")))
    wrapper.chmod(0o755)
    daemon = make_daemon('executor = "spawn"\n', start=False,
                         env={"PATH": f"{wrapper.parent}:{os.environ['PATH']}"})
    assert daemon.spawn().wait(30) == 1
    log = daemon.log()
    assert "cannot-start" in log and "isolation self-test failed, refusing to serve: " in log
    assert "host_processes_hidden: saw [" in log
    assert "data_dir_hidden" not in log  # only the layer that failed is named
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{daemon.base}/healthz", timeout=5)


def test_best_effort_without_bwrap_keeps_the_cgroup_and_says_what_is_off(make_daemon, name):
    daemon = make_daemon('isolation = "best-effort"\n', env=NO_BWRAP)
    active = layers(daemon)
    assert [n for n in SANDBOX_LAYERS if active[n]] == []
    assert active["cgroup"] and active["no_survivors"] and active["rlimits"]
    checks = self_test(daemon)
    assert [n for n in SANDBOX_CHECKS if checks[n]["expected"]] == []
    assert checks["no_survivors"] == {"held": True, "expected": True, "seen": []}
    assert "isolation-self-test-failed" not in daemon.log()  # nothing promised failed
    assert "bwrap not on PATH" in daemon.log()
    url = daemon.deploy(name, 'def workflow(_request, settings):\n    return {"status_code": '
                              '200, "body": "ok"}\n')
    assert requests.post(url, json={}, timeout=30).text == "ok"


def test_none_reports_every_sandbox_layer_off_and_what_the_probe_got_through(make_daemon):
    daemon = make_daemon('isolation = "none"\n')
    active = layers(daemon)
    assert active == {"rlimits": True, "namespaces": False, "identity": False,
                      "filesystem": False, "network": False, "cgroup": False,
                      "no_survivors": False}
    checks = self_test(daemon)
    # Run as root here: the probe really read the data dir and saw the daemon.
    assert not checks["data_dir_hidden"]["held"] and not checks["host_processes_hidden"]["held"]
    assert [n for n, c in checks.items() if c["expected"]] == ["probe_ran",
                                                                "scratch_not_shared"]
    health = requests.get(f"{daemon.base}/healthz", timeout=5).json()
    assert health["isolation"]["active"] == ["rlimits"]


@pytest.fixture
def broken_pasta(tmp_path) -> dict[str, str]:
    """A PATH whose `pasta` does not run: how a host without a working passt looks."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "pasta").write_text("#!/bin/sh\nexit 1\n")
    (fake / "pasta").chmod(0o755)
    return {"PATH": f"{fake}:/usr/local/bin:/usr/bin:/bin:/usr/sbin"}


def test_strict_without_the_network_layer_refuses_to_start_and_says_what_to_do(make_daemon,
                                                                               broken_pasta):
    daemon = make_daemon(start=False, env=broken_pasta)
    assert daemon.spawn().wait(30) == 1
    log = daemon.log()
    assert "cannot-start" in log and "pasta does not run" in log, log
    assert "apt-get install passt iproute2" in log and 'isolation = "best-effort"' in log


def test_best_effort_without_the_network_layer_says_so_and_runs_on_the_host_network(
        make_daemon, name, standin, broken_pasta):
    daemon = make_daemon('isolation = "best-effort"\n', env=broken_pasta)
    active = layers(daemon)
    assert not active["network"] and active["namespaces"] and active["filesystem"]
    detail = daemon.ctl_json("status")["isolation"]["layers"]["network"]["detail"]
    assert "pasta does not run" in detail
    checks = self_test(daemon)
    assert {n: checks[n]["expected"] for n in NETWORK_CHECKS} == dict.fromkeys(
        NETWORK_CHECKS, False)
    assert not checks["daemon_port_unreachable"]["held"]  # the host's loopback: reached
    assert "executions share the HOST'S NETWORK" in daemon.log()
    assert "ISOLATION SELF-TEST FAILED" not in daemon.log()
    server = standin()
    server.routes[("GET", "/")] = (200, {}, "host")
    url = daemon.deploy(name, 'import requests\ndef workflow(_request, settings):\n'
                              '    return {"status_code": 200, "body": requests.get('
                              '_request["url"], timeout=10).text}\n')
    assert requests.post(url, json={"url": server.url}, timeout=30).text == "host"


def test_the_probes_survivor_is_killed_even_without_any_layer(make_daemon):
    """In `none` the probe's setsid grandchild escapes; the self-test must still reap it."""
    daemon = make_daemon('isolation = "none"\n')
    seen = self_test(daemon)["no_survivors"]["seen"]
    assert len(seen) == 2  # the probe runs twice
    wait_for(lambda: not any(map(_alive, seen)), timeout=5, what="probe survivors killed")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def test_an_unknown_isolation_mode_is_a_config_error(make_daemon):
    daemon = make_daemon('isolation = "paranoid"\n', start=False)
    assert daemon.spawn().wait(30) == 2
    assert "isolation must be 'strict', 'best-effort' or 'none', got 'paranoid'" in daemon.log()
