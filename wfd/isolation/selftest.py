"""The start-up self-test: one real execution that tries to break out, before serving.

Detection says what the host offers; this proves it, through the same executor
every workflow uses. The probe workflow tries to read the data directory, to
see the daemon's process or any process not its own, to write into the
Python runtime, leaves a file in its scratch directory for the next run to
find (it runs twice) and a double-forked `setsid` grandchild behind; once
the executions are over the daemon looks for that grandchild in the host's
/proc. A layer that detection
called active but the probe got past is a failure: strict refuses to start.
"""

import asyncio
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from wfd import ids
from wfd.config import Config
from wfd.domain import Kind, Status
from wfd.executor import Executor, Job, Outcome
from wfd.isolation.layers import Isolation

SURVIVOR_WAIT_S = 3.0
MARKER = "wfd-probe-left-behind"
PROBE = '''
import json, os, sys, tempfile, time

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


async def run(executor: Executor, isolation: Isolation, config: Config) -> dict[str, Check]:
    """Run the probe twice and check each layer against what detection promised.

    The second run looks for what the first left in its scratch directory:
    with a zygote, both are children of one long-lived process.
    """
    token = "wfd-probe-" + secrets.token_hex(8)
    request = {"data_dir": str(config.data_dir.resolve()),
               "db_path": str(config.db_path.resolve()),
               "daemon_pid": os.getpid(), "daemon_start": _start_time(os.getpid()),
               "token": token}
    first, second = [await executor.run(_job(config, request)) for _ in range(2)]
    sandboxed = isolation.sandboxed
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
    }


def _job(config: Config, request: dict[str, Any]) -> Job:
    return Job(execution_id=ids.execution_id(), name="wfd-self-test", kind=Kind.CATCH, version=0,
               code=PROBE, limits=config.limits, request=request)


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
