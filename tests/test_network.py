"""The network of an execution, tried from outside against test hosts of our own (SPEC 9).

Each module run makes a network namespace with a veth pair and servers in it
(netns_hosts.py): 198.51.100.2 stands for a public API, 10.231.0.2 for a
private address the VM could route to, and a DNS server there is the only
resolver of the daemon's sandbox (`[network] resolv_conf`). Every case runs
on both executors through a real strict daemon.
"""

import contextlib
import json
import os
import secrets
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import netns_hosts
import pytest
import requests
from conftest import Daemon, wait_for
from netns_hosts import NAME, PRIVATE, PUBLIC

PROBE = '''
import errno, json, socket, time

def workflow(_request, settings):
    return {"status_code": 200, "body": json.dumps([probe(**t) for t in _request["targets"]])}

def probe(kind, host=None, port=None, name=None, path="/"):
    started = time.monotonic()
    try:
        if kind == "resolve":
            seen = sorted({a[4][0] for a in socket.getaddrinfo(host, 80, socket.AF_INET)})
        elif kind == "abstract":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
                unix.connect("\\0" + name)
            seen = "connected"
        else:
            with socket.create_connection((host, port), timeout=5) as tcp:
                tcp.sendall(f"GET {path} HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n".encode())
                reply = b"".join(iter(lambda: tcp.recv(4096), b""))
                seen = reply.decode().rpartition("\\r\\n\\r\\n")[2]
    except OSError as exc:
        seen = errno.errorcode.get(exc.errno, type(exc).__name__)
    return {"seen": seen, "ms": round((time.monotonic() - started) * 1000)}
'''
EXECUTORS = ["spawn", "zygote"]
REFUSED = ("EHOSTUNREACH", "ENETUNREACH", "ECONNREFUSED")


@pytest.fixture(scope="module")
def hosts() -> Iterator[netns_hosts.TestHosts]:
    made = netns_hosts.create()
    yield made
    made.remove()


@pytest.fixture(scope="module", params=EXECUTORS)
def netd(request: pytest.FixtureRequest, hosts: netns_hosts.TestHosts,
         tmp_path_factory: pytest.TempPathFactory, uv_cache) -> Iterator[Daemon]:
    """A strict daemon whose executions resolve names with the test hosts' DNS server."""
    base = tmp_path_factory.mktemp(f"network-{request.param}")
    resolv = base / "resolv.conf"
    resolv.write_text(f"nameserver {PRIVATE}\noptions timeout:2 attempts:1\n")
    resolv.chmod(0o644)  # read by the sandbox's uid
    daemon = Daemon(base / "data", f'executor = "{request.param}"\n'
                    f'env_cache_dir = "{uv_cache}"\n'
                    f'[network]\nresolv_conf = "{resolv}"\n[limits]\ntimeout_s = 20\n',
                    admin=True).start()
    assert daemon.ctl_json("status").get("zygote_state", "ready") == "ready"
    yield daemon
    daemon.kill()


def probe(daemon: Daemon, name: str, *targets: dict, allow: tuple[str, ...] = (),
          code: str = PROBE) -> list:
    flags = [flag for entry in allow for flag in ("--allow-net", entry)]
    url = daemon.deploy(name, code, *flags)
    response = requests.post(url, json={"targets": list(targets)}, timeout=60)
    assert response.status_code == 200, daemon.logs(response.headers["X-Wfd-Execution-Id"])
    return response.json()


def http(host: str, port: int = 80) -> dict:
    return {"kind": "http", "host": host, "port": port}


def test_a_public_address_is_reached_by_default(netd, hosts, name):
    before = hosts.hits()
    [reached] = probe(netd, name, http(PUBLIC))
    assert reached["seen"] == "hello from 80"
    assert hosts.hits() == before + 1


def test_a_private_address_fails_at_once_by_default(netd, hosts, name):
    before = hosts.hits()
    results = probe(netd, name, http(PRIVATE), http("169.254.169.254"), http("10.231.0.1"))
    for result in results:
        assert result["seen"] in REFUSED and result["ms"] < 500, results
    assert hosts.hits() == before


def test_an_allowance_opens_a_range_and_a_port_opens_only_that_port(netd, hosts, name):
    everything = probe(netd, name, http(PRIVATE), http(PRIVATE, 8080),
                       allow=(f"{PRIVATE}/32",))
    assert [r["seen"] for r in everything] == ["hello from 80", "hello from 8080"]
    one_port = probe(netd, f"{name}-port", http(PRIVATE), http(PRIVATE, 8080),
                     allow=(f"{PRIVATE}/32:8080",))
    assert one_port[0]["seen"] in REFUSED and one_port[1]["seen"] == "hello from 8080"


def test_two_policies_never_share_their_allowances(netd, hosts, name):
    assert probe(netd, f"{name}-a", http(PRIVATE), allow=(f"{PRIVATE}/32",))[0]["seen"] \
        == "hello from 80"
    assert probe(netd, f"{name}-b", http(PRIVATE))[0]["seen"] in REFUSED
    assert probe(netd, f"{name}-a", http(PRIVATE), allow=(f"{PRIVATE}/32",))[0]["seen"] \
        == "hello from 80"


def test_one_environment_under_two_policies_keeps_each_policy(netd, name):
    """A zygote serves one (environment, policy): sharing packages never shares allowances."""
    in_env = '# /// script\n# dependencies = ["six==1.16.0"]\n# ///\nimport six\n' + PROBE
    allowed = probe(netd, f"{name}-a", http(PRIVATE), allow=(f"{PRIVATE}/32",), code=in_env)
    assert allowed[0]["seen"] == "hello from 80"
    assert probe(netd, f"{name}-b", http(PRIVATE), code=in_env)[0]["seen"] in REFUSED
    digest = netd.ctl_json("show", f"{name}-a")["environment"]
    assert digest and netd.ctl_json("show", f"{name}-b")["environment"] == digest
    assert probe(netd, f"{name}-a", http(PRIVATE), code=in_env)[0]["seen"] == "hello from 80"
    executors = {(e["environment"], tuple(e["allow"]))
                 for e in netd.ctl_json("status").get("executors", [])}
    if netd.ctl_json("status")["executor"] == "zygote":  # one zygote, one namespace, per pair
        assert {(digest, (f"{PRIVATE}/32",)), (digest, ())} <= executors, executors
    else:  # each cold spawn has a namespace of its job's policy: one executor per environment
        assert (digest, ()) in executors and (digest, (f"{PRIVATE}/32",)) not in executors


def test_the_daemons_listeners_and_host_abstract_sockets_are_out_of_reach(netd, name):
    abstract = f"wfd-test-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind("\0" + abstract)
        listener.listen()
        results = probe(netd, name, http("127.0.0.1", netd.port),
                        http("127.0.0.1", netd.admin_port),
                        {"kind": "abstract", "name": abstract})
    assert [r["seen"] for r in results] == ["ECONNREFUSED"] * 3, results


def test_the_daemons_own_port_cannot_be_allowed(netd, name, tmp_path):
    path = tmp_path / "w.py"
    path.write_text(PROBE)
    refused = netd.ctl("deploy", name, str(path), "--catch", "--allow-net",
                       f"127.0.0.1/32:{netd.port}", check=False)
    assert refused.returncode != 0
    assert "the daemon's own port" in refused.stderr + refused.stdout
    assert netd.ctl("show", name, check=False).returncode != 0  # nothing was stored


def test_names_resolve_with_the_resolver_of_the_sandbox(netd, name):
    resolved, reached = probe(netd, name, {"kind": "resolve", "host": NAME}, http(NAME))
    assert resolved["seen"] == [PUBLIC]
    assert reached["seen"] == "hello from 80"


def test_show_lists_the_policy_and_status_the_layer(netd, name):
    probe(netd, name, http(PUBLIC), allow=(f"{PRIVATE}/32", "127.0.0.1/32:5432"))
    shown = netd.ctl_json("show", name)
    assert shown["allow_net"] == [f"{PRIVATE}/32", "127.0.0.1/32:5432"]
    assert shown["network"]["allow"] == sorted(shown["allow_net"])
    assert "10.0.0.0/8" in shown["network"]["deny"] and "169.254.0.0/16" in \
        shown["network"]["deny"]
    text = netd.ctl("show", name).stdout
    assert f"{PRIVATE}/32" in text
    layer = netd.ctl_json("status")["isolation"]["layers"]["network"]
    assert layer["active"] and PRIVATE in layer["detail"], layer
    health = requests.get(f"{netd.admin_base}/healthz", timeout=5).json()
    assert "network" in health["isolation"]["active"]
    checks = netd.ctl_json("status")["isolation"]["self_test"]
    assert {key: checks[key]["held"] for key in (
        "daemon_port_unreachable", "abstract_socket_unreachable", "private_range_denied")} \
        == dict.fromkeys(("daemon_port_unreachable", "abstract_socket_unreachable",
                          "private_range_denied"), True), checks


def test_redeploying_without_allow_net_keeps_it_and_none_removes_it(netd, name):
    probe(netd, name, http(PUBLIC), allow=(f"{PRIVATE}/32",))
    assert probe(netd, name, http(PRIVATE))[0]["seen"] == "hello from 80"  # kept
    assert json.loads(netd.ctl("show", name, "--json").stdout)["allow_net"] == [f"{PRIVATE}/32"]
    assert probe(netd, name, http(PRIVATE), allow=("none",))[0]["seen"] in REFUSED



def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _links(pid: int, what: str) -> set[str]:
    """Where the entries of /proc/PID/`what` (fd, ns) point, as far as we may look."""
    try:
        entries = os.listdir(f"/proc/{pid}/{what}")
    except OSError:
        return set()
    found = set()
    for entry in entries:
        with contextlib.suppress(OSError):
            found.add(os.readlink(f"/proc/{pid}/{what}/{entry}"))
    return found


def _namespaces_below(ancestor: int) -> set[str]:
    """The network namespaces of `ancestor`'s descendants that are not its own."""
    parents = {}
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/stat") as stat:
                parents[pid] = int(stat.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
    below = set()
    for pid in parents:
        up = pid
        while up in parents and up != ancestor:
            up = parents[up]
        if up == ancestor and pid != ancestor:
            below |= {link for link in _links(pid, "ns") if link.startswith("net:")}
    return below - {link for link in _links(ancestor, "ns") if link.startswith("net:")}


def _pastas_serving(namespaces: set[str]) -> set[int]:
    """The pasta processes (`passt` is its binary) holding one of `namespaces` open."""
    return {pid for pid in _pids()
            if _comm(pid).startswith("pass") and _links(pid, "fd") & namespaces}


SLOW = """
import time
def workflow(_request, settings):
    time.sleep(30)
"""


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_daemon_killed_outright_leaves_no_pasta_behind(hosts, tmp_path, name, executor):
    """pasta holds its namespace open and never quits by itself: it must die with the daemon."""
    daemon = Daemon(tmp_path / "data", f'executor = "{executor}"\n').start()
    with ThreadPoolExecutor(1) as pool:
        try:
            url = daemon.deploy(name, SLOW)
            pool.submit(requests.post, url, json={}, timeout=60)
            # a cold spawn's pasta lives as long as its execution: look while it runs
            pastas = wait_for(lambda: _pastas_serving(_namespaces_below(daemon.process.pid)),
                              timeout=30, what="a pasta serving the running execution")
        finally:
            daemon.process.send_signal(signal.SIGKILL)  # the daemon alone, not its group
            daemon.process.wait(10)
            daemon.kill()
    wait_for(lambda: not any(_comm(pid).startswith("pass") for pid in pastas), timeout=5,
             what="the daemon's pasta processes to end with it")
