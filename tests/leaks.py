"""Hostile requests of each kind SPEC 8 names, and how to count what a daemon holds.

Shared by tests/test_records.py (a batch of each kind, on both executors)
and bench/bench_leaks.py (1,000 of each, with the numbers in a table).
"""

import os
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

CGROUP_ROOT = Path("/sys/fs/cgroup")

# A workflow that writes `FORGED` on its own result pipe, then exits before
# the runner can write the real result: whatever it wrote is all there is.
FORGER = """
import os

def pipes():
    for fd in sorted(map(int, os.listdir("/proc/self/fd"))):
        try:
            if fd > 2 and os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:"):
                yield fd
        except OSError:  # the directory listing's own descriptor, closed by now
            pass

def workflow(_request, settings):
    for fd in list(pipes()):
        os.write(fd, FORGED)
        os.close(fd)
    os._exit(0)
"""
NOOP = "def workflow(_request, settings):\n    return None\n"


def nested(depth: int) -> bytes:
    """A JSON document of `depth` nested lists inside an object: {"a": [[...]]}."""
    return b'{"a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def forger(forged: bytes) -> str:
    return f"FORGED = {forged!r}\n{FORGER}"


def _multipart(name: bytes) -> tuple[bytes, str]:
    boundary = "wfdboundary"
    body = (b"--wfdboundary\r\nContent-Disposition: form-data; name=\"" + name + b"\"\r\n\r\n"
            b"value\r\n--wfdboundary--\r\n")
    return body, f"multipart/form-data; boundary={boundary}"


def post(body: bytes, content_type: str) -> Callable[[str], requests.Response]:
    def send(url: str) -> requests.Response:
        # One connection per request, closed by the daemon: only what the
        # daemon itself keeps open is counted.
        return requests.post(url, data=body, timeout=60,
                             headers={"Content-Type": content_type, "Connection": "close"})

    return send


def post_json(body: bytes) -> Callable[[str], requests.Response]:
    return post(body, "application/json")


def post_multipart(name: bytes) -> Callable[[str], requests.Response]:
    return post(*_multipart(name))


@dataclass(frozen=True)
class Kind:
    """One hostile request: the workflow it goes to, how it is sent, what must come back.

    `status` is the recorded status, or None where nothing may start (a 400).
    `error` is a part of the recorded error message.
    """

    code: str
    send: Callable[[str], requests.Response]
    http: int
    status: str | None = None
    error: str = ""


KINDS = {
    # Bodies the daemon cannot hand to a child: refused before anything starts.
    "json-300-deep": Kind(NOOP, post_json(nested(300)), 400),
    "json-65-deep": Kind(NOOP, post_json(nested(65)), 400),
    "multipart-name-not-utf8": Kind(NOOP, post_multipart(b"\xff\xfename"), 400),
    "form-value-not-utf8": Kind(NOOP, post(b"a=%ff%fe", "application/x-www-form-urlencoded"),
                                400),
    "query-not-utf8": Kind(NOOP, lambda url: post_json(b"{}")(url + "?k%ff=%fe"), 400),
    # Results the child forges or mangles on its result pipe.
    "result-not-json": Kind(forger(b'{"outcome": "succ'), post_json(b"{}"), 500, "error",
                            "malformed result: not JSON"),
    "result-unset-not-str": Kind(
        forger(b'{"outcome": "success", "settings": {"set": {}, "unset": [[1]]}}'),
        post_json(b"{}"), 500, "error", "unsets a key that is not a string"),
    "result-settings-300-deep": Kind(
        forger(b'{"outcome": "success", "settings": {"set": ' + nested(300)
               + b', "unset": []}}'),
        post_json(b"{}"), 500, "error", "settings nested deeper than 64 levels"),
    "result-bad-header": Kind(
        forger(b'{"outcome": "success", "response": {"status_code": 200, "body": "",'
               b' "headers": {"a": 1}}}'),
        post_json(b"{}"), 500, "error", "invalid response: headers must map str to str"),
    # A workflow that returns settings nested too deep.
    "settings-100-deep": Kind(textwrap.dedent("""
        def workflow(_request, settings):
            deep = []
            for _ in range(100):
                deep = [deep]
            settings["deep"] = deep
        """), post_json(b"{}"), 500, "error", "nested deeper than the limit of 64 levels"),
    # An exception message of 5 MB.
    "error-5mb": Kind(textwrap.dedent("""
        def workflow(_request, settings):
            raise ValueError("x" * (5 * 1024 * 1024))
        """), post_json(b"{}"), 500, "error", "[wfd: error cut here, over the 1024 KiB limit]"),
}


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found.extend(frontier)
    return found


def cgroups(pid: int) -> list[Path]:
    """The execution cgroups of the daemon `pid` (v1: wfd/PID/exec-*; v2: beside its leaf)."""
    found: list[Path] = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers:
            for controller in controllers.split(","):
                found += (CGROUP_ROOT / controller / path.lstrip("/") / "wfd" / str(pid)
                          ).glob("exec-*")
        elif path.endswith("/daemon"):
            found += (CGROUP_ROOT / path.lstrip("/")).parent.glob("exec-*")
    return found


def descriptors(pid: int) -> dict[int, str]:
    """The daemon's open descriptors and what each is (for a message naming a leak)."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
    return found


def resources(pid: int) -> dict[str, int]:
    """What the daemon holds now: descriptors, processes below it, execution cgroups."""
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "processes": len(descendants(pid)),
            "cgroups": len(cgroups(pid))}
