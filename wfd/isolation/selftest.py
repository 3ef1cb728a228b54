"""The start-up self-test: one real execution that tries to break out, before serving.

Detection says what the host offers; this proves it, through the same executor
every workflow uses. The probe workflow tries to read the data directory, to
see the daemon's process or any process not its own, to write into the
Python runtime, to reach the daemon's port on the host's loopback, an
abstract unix socket the daemon opens and (without sending a packet) the
metadata address, leaves a file in its scratch directory for the next run to
find (it runs twice) and a double-forked `setsid` grandchild behind; once
the executions are over the daemon looks for that grandchild in the host's
/proc. A layer that detection
called active but the probe got past is a failure: strict refuses to start.
"""

import asyncio
import contextlib
import ipaddress
import os
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from wfd import ids
from wfd.config import Config
from wfd.domain import Kind, Status
from wfd.executor import Executor, Job, Outcome
from wfd.isolation.layers import Isolation
from wfd.isolation.network import Policy

SURVIVOR_WAIT_S = 3.0
# The metadata service's address: the policy must refuse it (probed without a packet).
PRIVATE_PROBE = "169.254.169.254"
DENIED_ERRORS = ("EHOSTUNREACH", "ENETUNREACH", "EACCES", "EPERM")
MARKER = "wfd-probe-left-behind"
PROBE = '''
import errno, json, os, socket, sys, tempfile, time

def workflow(_request, settings):
    scratch = tempfile.gettempdir()
    left = sorted(os.listdir(scratch))
    open(os.path.join(scratch, "wfd-probe-left-behind"), "w").close()
    processes = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    seen = {
        "scratch_before": left,
        "foreign_processes": [p for p in processes if p not in (1, os.getpid())],
        "data_dir_readable": readable(_request["data_dir"], _request["db_path"]),
        "daemon_visible": same_process(_request["daemon_pid"], _request["daemon_start"]),
        "processes": processes,
        "euid": os.geteuid(),
        "capabilities": capabilities(),
        "runtime_writable": writable(sys.prefix),
        "daemon_port": reached(("127.0.0.1", _request["daemon_port"])),
        "abstract_socket": reached("\\0" + _request["abstract"], socket.AF_UNIX),
        "private_route": routed(_request["private"]),
    }
    leave_survivor(_request["token"])
    return {"status_code": 200, "body": json.dumps(seen)}

def readable(directory, db):
    try:
        os.listdir(directory)
        return True
    except OSError:
        pass
    try:
        open(db, "rb").close()
        return True
    except OSError:
        return False

def reached(address, family=socket.AF_INET):
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(address)
            return True
        except OSError as exc:
            return errno.errorcode.get(exc.errno, str(exc))

def routed(address):
    # A UDP connect sends nothing: it only asks the routing whether the address is reachable.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((address, 80))
            return True
        except OSError as exc:
            return errno.errorcode.get(exc.errno, str(exc))

def same_process(pid, start):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19] == start
    except OSError:
        return False

def capabilities():
    with open("/proc/self/status") as status:
        return next(line.split()[1] for line in status if line.startswith("CapEff:"))

def writable(directory):
    path = os.path.join(directory, f"wfd-probe-{os.getpid()}")
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        return False
    os.unlink(path)
    return True

def leave_survivor(token):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, 4096)
            # One process that carries the token itself: killing what bears
            # the token then leaves nothing behind (a shell's `sleep` child would).
            os.execv(sys.executable, [sys.executable, "-I", "-c",
                                      "import time; time.sleep(300)", token])
        os._exit(0)
    os.wait()
    # Return only once the grandchild runs, or the daemon's look for it proves nothing.
    for _ in range(500):
        if any(running(pid, token) for pid in os.listdir("/proc") if pid.isdigit()):
            return
        time.sleep(0.01)
    raise RuntimeError("the probe's grandchild never started")

def running(pid, token):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return token.encode() in cmdline.read()
    except OSError:
        return False
'''


@contextlib.contextmanager
def _listeners(name: str) -> Iterator[int]:
    """While the probe runs: a port of the daemon's on the host's loopback, an abstract socket.

    The HTTP listeners open only after the self-test, and their own port
    must not answer anything else meanwhile (health checks poll it), so the
    daemon listens on a fresh loopback port for the probe to try.
    """
    with socket.socket() as tcp, socket.socket(socket.AF_UNIX) as unix:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        unix.bind("\0" + name)
        unix.listen()
        yield tcp.getsockname()[1]


@dataclass(frozen=True)
class Check:
    """One thing the probe tried: did it stay closed, and should it have."""

    held: bool
    expected: bool
    seen: Any

    @property
    def failed(self) -> bool:
        return self.expected and not self.held


def _start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat: tells a process apart from a later one with its pid."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def _pids_running(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and token.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _survivors(token: str, wait_s: float) -> list[int]:
    """The probe's grandchildren still running after `wait_s`; killed before returning."""
    deadline = time.monotonic() + wait_s
    while (pids := _pids_running(token)) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    return pids


async def run(executor: Executor, isolation: Isolation, config: Config,
              policy: Policy | None = None) -> dict[str, Check]:
    """Run the probe twice and check each layer against what detection promised.

    The second run looks for what the first left in its scratch directory:
    with a zygote, both are children of one long-lived process. It runs
    under `policy` (default: the daemon's `[network] allow`); where that
    allows the metadata address, its route is not expected to be denied.
    """
    policy = policy or Policy.of(*config.network.allow)
    token = "wfd-probe-" + secrets.token_hex(8)
    with _listeners(token) as port:
        request = {"data_dir": str(config.data_dir.resolve()),
                   "db_path": str(config.db_path.resolve()),
                   "daemon_pid": os.getpid(), "daemon_start": _start_time(os.getpid()),
                   "token": token, "daemon_port": port, "abstract": token,
                   "private": PRIVATE_PROBE}
        first, second = [await executor.run(_job(config, request, policy)) for _ in range(2)]
    sandboxed = isolation.sandboxed
    networked = isolation.network is not None
    kills = sandboxed or isolation.backend is not None
    # Give a kill in flight time to land only where one is promised.
    survivors = await asyncio.to_thread(_survivors, token, SURVIVOR_WAIT_S if kills else 0)
    ran, seen = _seen(first)
    ran_again, seen_again = _seen(second)
    return {
        "probe_ran": Check(ran and ran_again, True, first.error or second.error or "success"),
        "data_dir_hidden": Check(ran and not seen["data_dir_readable"], sandboxed,
                                 seen.get("data_dir_readable")),
        "host_processes_hidden": Check(ran and not seen["daemon_visible"], sandboxed,
                                       seen.get("processes")),
        "other_executions_hidden": Check(ran and not seen["foreign_processes"], sandboxed,
                                         seen.get("foreign_processes")),
        "unprivileged": Check(ran and seen["euid"] != 0 and int(seen["capabilities"], 16) == 0,
                              sandboxed, {k: seen.get(k) for k in ("euid", "capabilities")}),
        "runtime_read_only": Check(ran and not seen["runtime_writable"], sandboxed,
                                   seen.get("runtime_writable")),
        "scratch_not_shared": Check(ran_again and MARKER not in seen_again["scratch_before"],
                                    True, seen_again.get("scratch_before")),
        "no_survivors": Check(ran and ran_again and not survivors, kills, survivors),
        "daemon_port_unreachable": Check(ran and seen["daemon_port"] is not True, networked,
                                         seen.get("daemon_port")),
        "abstract_socket_unreachable": Check(ran and seen["abstract_socket"] is not True,
                                             networked, seen.get("abstract_socket")),
        "private_range_denied": Check(ran and seen["private_route"] in DENIED_ERRORS,
                                      networked and not _allows_probe(policy),
                                      seen.get("private_route")),
    }


def _allows_probe(policy: Policy) -> bool:
    """Whether `policy` opens the port the probe's private route check asks about."""
    probe = ipaddress.ip_address(PRIVATE_PROBE)
    return any(probe in entry.ip_network and entry.port in (None, 80) for entry in policy.allow)


def _job(config: Config, request: dict[str, Any], policy: Policy) -> Job:
    return Job(execution_id=ids.execution_id(), name="wfd-self-test", kind=Kind.CATCH, version=0,
               code=PROBE, limits=config.limits, request=request, network=policy)


def _seen(outcome: Outcome) -> tuple[bool, dict[str, Any]]:
    """Whether the probe ran, and what it saw."""
    if outcome.status != Status.SUCCESS or outcome.response is None:
        return False, {}
    return True, orjson.loads(outcome.response["body"])


def failures(checks: dict[str, Check]) -> list[str]:
    """Names of the checks that should have held and did not."""
    return [name for name, check in checks.items() if check.failed]


def report(checks: dict[str, Check]) -> dict[str, Any]:
    """Plain data for `wfd ctl status`: each check as held / expected / what the probe saw."""
    return {name: {"held": c.held, "expected": c.expected, "seen": c.seen}
            for name, c in checks.items()}
