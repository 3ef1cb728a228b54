"""A canary workflow under hostile load (SPEC 8), one attack at a time.

    .venv/bin/python bench/bench_hostile.py [ATTACK...]     (or: make bench)

Starts a real daemon (`wfd serve`, default strict isolation, the zygote,
global_concurrency = 4, the default
on this 2-CPU host, max_connections = 1024) and calls a canary catch
workflow 20 times a second, open loop (each call is sent at its scheduled
time, so a stall shows as latency instead of fewer calls), while an
attacker process runs each attack in turn:
  slow-bodies     100 connections declare 1000 bytes of body and send 10
  slowloris       900 connections that never finish their headers
  conn-flood      1500 idle connections: past max_connections
  big-forms       6 senders of 10 MiB urlencoded bodies, back to back
  max-bodies      40 senders of 10 MiB JSON bodies to a workflow that sleeps 2 s
                  (what the body budget, max_pending_mb = 256, is for)
  cpu-flood       20 senders to a CPU-bound workflow (1 s of CPU each)
  bad-responses   4 senders to workflows answering 101, a bad header name, a \\x0b
  pipelined       batches of 3 pipelined requests on one connection
For each: the canary's p50/p99 latency and errors (not 200, or no answer),
what the attacker got back, the daemon's peak RSS (VmHWM of the daemon
process alone; each attack gets a fresh daemon, its peak reset through
/proc/PID/clear_refs once the attack is under way) and its peak descriptor
count.
"""

import asyncio
import collections
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import requests

CONFIG = """log_level = "warning"
global_concurrency = 4
max_connections = 1024
queue_max = 100
[limits]
timeout_s = 60
memory_mb = 1024
"""
WORKFLOWS = {
    "canary": 'def workflow(_request, settings):\n    return {"status_code": 200, "body": "ok"}\n',
    "victim": 'def workflow(_request, settings):\n    return {"status_code": 200, "body": "x"}\n',
    "sleepy": "import time\ndef workflow(_request, settings):\n    time.sleep(2)\n",
    "cpu": "import time\ndef workflow(_request, settings):\n"
           "    end = time.process_time() + 1\n    while time.process_time() < end:\n"
           "        pass\n",
    "status101": 'def workflow(_request, settings):\n    return {"status_code": 101, "body": ""}\n',
    "badname": 'def workflow(_request, settings):\n'
               '    return {"status_code": 200, "body": "", "headers": {"A B": "1"}}\n',
    "vtab": 'def workflow(_request, settings):\n'
            '    return {"status_code": 200, "body": "", "headers": {"X": "a\\x0bb"}}\n',
}
RATE = 20  # canary calls per second
BUDGET_MIB = 256  # max_pending_mb's default
MEASURE_S = 8.0
WARMUP_S = 1.5
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Daemon:
    """The daemon under test, in its own session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.socket = f"{tempfile.gettempdir()}/wfd-bench-hostile-{os.getpid()}.sock"
        self.urls: dict[str, str] = {}
        self.process: subprocess.Popen | None = None

    def start(self) -> "Daemon":
        config = self.root / "wfd.toml"
        config.write_text(CONFIG)
        log = (self.root / "wfd.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wfd", "serve", "--config", str(config),
             "--data-dir", str(self.root / "data"), "--listen", f"127.0.0.1:{self.port}",
             "--socket", self.socket], stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 30
        while not self._healthy():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the daemon did not start: see {self.root}/wfd.log")
            time.sleep(0.1)
        for name, code in WORKFLOWS.items():
            path = self.root / f"{name}.py"
            path.write_text(code)
            self.ctl("deploy", name, str(path), "--catch")
            self.urls[name] = self.ctl("url", name).strip()
        return self

    def _healthy(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).ok
        except requests.ConnectionError:
            return False

    def ctl(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "wfd", "ctl", "--socket", self.socket,
                               *args], check=True, capture_output=True, text=True).stdout

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(60)


# -- the attacker (a process of its own, so it never slows the canary's client) --

def _post(url: str, body: bytes, content_type: str) -> str:
    try:
        return str(requests.post(url, data=body, headers={"Content-Type": content_type},
                                 timeout=120).status_code)
    except requests.RequestException as exc:
        return type(exc).__name__


def _head(url: str, declared: int, content_type: str = "application/json") -> bytes:
    return (f"POST {urlsplit(url).path} HTTP/1.1\r\nHost: wfd\r\nContent-Type: "
            f"{content_type}\r\nContent-Length: {declared}\r\n\r\n").encode()


def _hold(port: int, count: int, first: bytes, stop: threading.Event, seen: collections.Counter
          ) -> None:
    """Open `count` connections, send `first` on each, keep them until `stop`."""
    held = []
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(first)
            held.append(sock)
        except OSError as exc:
            seen[type(exc).__name__] += 1
    stop.wait()
    for sock in held:
        sock.setblocking(False)
        try:
            answer = sock.recv(12)
            seen[answer.decode(errors="replace").split(" ")[1] if answer else "closed"] += 1
        except BlockingIOError:
            seen["still open"] += 1
        except OSError as exc:
            seen[type(exc).__name__] += 1
        sock.close()


def _loop(stop: threading.Event, seen: collections.Counter, send) -> None:
    while not stop.is_set():
        seen[send()] += 1


def _pipelined(port: int, url: str) -> str:
    batch = _head(url, 2) + b"{}" + _head(url, 2) + b"{}" + _head(url, 2) + b"{}"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(batch)
        data = b""
        while data.count(b"HTTP/1.1 200 ") < 3 and (chunk := sock.recv(65536)):
            data += chunk
    return f"{data.count(b'HTTP/1.1 200 ')}/3 answered"


def attack(name: str, port: int, urls: dict[str, str], stop_flag, results) -> None:
    """Run attack `name` until `stop_flag` is set; put what it saw on `results`."""
    stop, seen = threading.Event(), collections.Counter()
    threads: list[threading.Thread] = []

    def spawn(target, *args) -> None:
        threads.append(threading.Thread(target=target, args=args, daemon=True))

    form = b"&".join(b"f%07d=v" % i for i in range(10 * MIB // 11))
    items = b'{"items": [' + b",".join([b'{"a": 1, "b": "xy"}'] * (10 * MIB // 22)) + b"]}"
    if name == "slow-bodies":
        spawn(_hold, port, 100, _head(urls["victim"], 1000) + b'{"a": "123', stop, seen)
    elif name == "slowloris":
        spawn(_hold, port, 900, b"POST / HTTP/1.1\r\nHost: wfd\r\nX-Slow: ", stop, seen)
    elif name == "conn-flood":
        spawn(_hold, port, 1500, b"", stop, seen)
    elif name == "big-forms":
        for _ in range(6):
            spawn(_loop, stop, seen, lambda: _post(urls["victim"], form,
                                                   "application/x-www-form-urlencoded"))
    elif name == "max-bodies":
        for _ in range(40):
            spawn(_loop, stop, seen, lambda: _post(urls["sleepy"], items, "application/json"))
    elif name == "cpu-flood":
        for _ in range(20):
            spawn(_loop, stop, seen, lambda: _post(urls["cpu"], b"{}", "application/json"))
    elif name == "bad-responses":
        for bad in ("status101", "badname", "vtab", "status101"):
            spawn(_loop, stop, seen, lambda bad=bad: _post(urls[bad], b"{}",
                                                           "application/json"))
    elif name == "pipelined":
        spawn(_loop, stop, seen, lambda: _pipelined(port, urls["victim"]))
    for thread in threads:
        thread.start()
    stop_flag.wait()
    stop.set()
    for thread in threads:
        thread.join(150)
    results.put(dict(seen))


# -- the canary -------------------------------------------------------------------

async def canary(url: str, seconds: float, daemon: Daemon) -> dict:
    """Call `url` RATE times a second for `seconds`; latencies, errors, peak descriptors."""
    latencies: list[float] = []
    errors = collections.Counter()
    peak_fds = 0
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(scheduled: float) -> None:
            try:
                async with session.post(url, json={}) as response:
                    await response.read()
                    if response.status != 200:
                        errors[str(response.status)] += 1
                        return
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[type(exc).__name__] += 1
                return
            latencies.append((loop.time() - scheduled) * 1000)

        start = loop.time()
        calls = []
        for n in range(int(seconds * RATE)):
            scheduled = start + n / RATE
            await asyncio.sleep(max(0.0, scheduled - loop.time()))
            calls.append(asyncio.create_task(one(scheduled)))
            peak_fds = max(peak_fds, daemon.fds())
        await asyncio.gather(*calls)
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {"p50": cuts[49], "p99": cuts[98], "errors": sum(errors.values()),
            "error_kinds": dict(errors), "sent": int(seconds * RATE), "fds": peak_fds}


def run_attack(name: str, daemon: Daemon) -> dict:
    context = multiprocessing.get_context("spawn")
    stop_flag, results = context.Event(), context.Queue()
    attacker = None
    if name != "none":
        attacker = context.Process(target=attack, args=(name, daemon.port, daemon.urls,
                                                        stop_flag, results))
        attacker.start()
        time.sleep(WARMUP_S)
    daemon.reset_peak()
    measured = asyncio.run(canary(daemon.urls["canary"], MEASURE_S, daemon))
    measured["rss"] = daemon.peak_rss_mib()
    measured["attacker"] = {}
    if attacker is not None:
        stop_flag.set()
        measured["attacker"] = results.get(timeout=300)
        attacker.join(30)
    return measured


ATTACKS = ["none", "slow-bodies", "slowloris", "conn-flood", "big-forms", "max-bodies",
           "cpu-flood", "bad-responses", "pipelined"]


def main() -> int:
    chosen = sys.argv[1:] or ATTACKS
    rows = {}
    for name in chosen:  # a fresh daemon each: memory kept from one attack skews the next
        with tempfile.TemporaryDirectory(prefix="wfd-bench-hostile-") as tmp:
            daemon = Daemon(Path(tmp)).start()
            print(f"attack {name} ...", file=sys.stderr, flush=True)
            try:
                rows[name] = run_attack(name, daemon)
            finally:
                daemon.stop()
    print(f"canary at {RATE}/s for {MEASURE_S:g} s per attack; global_concurrency 4, "
          "max_connections 1024, max_pending_mb 256")
    print(f"{'attack':14} {'p50 ms':>8} {'p99 ms':>8} {'errors':>8} {'RSS MiB':>8} "
          f"{'fds':>5}  attacker saw")
    for name, row in rows.items():
        errors = f"{row['errors']}/{row['sent']}"
        seen = ", ".join(f"{k}: {v}" for k, v in sorted(row["attacker"].items()))
        print(f"{name:14} {row['p50']:8.1f} {row['p99']:8.1f} {errors:>8} {row['rss']:8.0f} "
              f"{row['fds']:5}  {seen}")
        if row["error_kinds"]:
            print(f"{'':14} canary errors: {row['error_kinds']}")
    if "max-bodies" in rows and "none" in rows:
        bound = rows["none"]["rss"] + BUDGET_MIB + (20 + 2 * 4) * 10 + 64
        print(f"max-bodies: peak RSS {rows['max-bodies']['rss']:.0f} MiB, documented bound "
              f"{bound:.0f} MiB (idle + max_pending_mb + (20 + 2 x 4) x max_body_mb + 64)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
