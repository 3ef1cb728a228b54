"""Catch latency and throughput: wfd with the zygote, wfd with cold spawn, no isolation.

    .venv/bin/python bench/bench_executors.py      (or: make bench)

Starts, on loopback, real daemons (`wfd serve`: executor "zygote" and
"spawn" under the default strict isolation, and the zygote with isolation
"none") and a plain aiohttp server that calls the same function in-process
with no isolation, then drives each with an aiohttp client:
  - p50 and p99 latency of a catch request at concurrency 1;
  - executions per second at concurrency 16, checking that every execution
    started from fresh state (a module-level counter the workflow bumps is
    1 in every one: pids repeat, each execution being PID 2 of its own PID
    namespace under isolation);
  - the memory the zygote and its spares add (PSS and USS, smaps_rollup).
"""

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

WORKFLOW = '''
import requests
from hrflow import Hrflow

calls = 0

def workflow(_request, settings):
    global calls
    calls += 1
    return {"status_code": 200, "body": str(calls)}
'''
# Cold spawn is two orders of magnitude slower: fewer requests keep the run short.
REQUESTS = {"zygote": (1000, 3000), "spawn": (60, 300), "zygote-none": (1000, 3000),
            "plain": (1000, 3000)}
CONFIG = {"zygote": 'executor = "zygote"\n', "spawn": 'executor = "spawn"\n',
          "zygote-none": 'executor = "zygote"\nisolation = "none"\n'}
WARMUP = 20
CONCURRENCY = 16


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out starting a server")
        time.sleep(0.05)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class Target:
    """One server under test, started as a subprocess in its own session."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind, self.root = kind, root
        self.port = free_port()
        self.socket = f"{tempfile.gettempdir()}/wfd-bench-{os.getpid()}-{kind}.sock"
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> "Target":
        log = (self.root / f"{self.kind}.log").open("wb")
        if self.kind == "plain":
            argv = [sys.executable, str(Path(__file__).with_name("plain_server.py")),
                    str(self.port), str(self.root / "workflow.py")]
            self.url = f"http://127.0.0.1:{self.port}/"
        else:
            config = self.root / f"{self.kind}.toml"
            config.write_text(f'{CONFIG[self.kind]}log_level = "warning"\n'
                              "global_concurrency = 32\nqueue_max = 1000\n"
                              "[limits]\nconcurrency = 32\n")
            argv = [sys.executable, "-m", "wfd", "serve", "--config", str(config),
                    "--data-dir", str(self.root / f"data-{self.kind}"),
                    "--listen", f"127.0.0.1:{self.port}", "--socket", self.socket]
        self.process = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        wait_until(lambda: listening(self.port))
        if self.kind != "plain":
            self.ctl("deploy", "bench", str(self.root / "workflow.py"), "--catch")
            self.url = self.ctl("url", "bench").strip()
        return self

    def ctl(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "wfd", "ctl", "--socket", self.socket,
                               *args], check=True, capture_output=True, text=True).stdout

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)


async def call(session: aiohttp.ClientSession, url: str) -> tuple[float, str]:
    started = time.perf_counter()
    async with session.post(url, json={"event": "profile.parsing.success"}) as response:
        body = await response.text()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {body}")
    return (time.perf_counter() - started) * 1000, body


async def measure(url: str, sequential: int, parallel: int) -> dict:
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(WARMUP):
            await call(session, url)
        latencies = [(await call(session, url))[0] for _ in range(sequential)]
        bodies: list[str] = []
        queue = iter(range(parallel))

        async def worker() -> None:
            for _ in queue:
                bodies.append((await call(session, url))[1])
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100)
    return {"p50": cuts[49], "p99": cuts[98], "rate": parallel / elapsed,
            "fresh": bodies.count("1"), "runs": parallel}


def rollup(pid: int) -> tuple[int, int]:
    """PSS and USS of one process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0])
    return fields["Pss"], fields["Private_Clean"] + fields["Private_Dirty"]


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def descendants(pid: int) -> list[int]:
    return [d for child in children(pid) for d in (child, *descendants(child))]


def zygote_memory(target: Target) -> str:
    """The zygote's python process (under bwrap: bwrap's descendant) and all below it.

    Under isolation each spare is three processes (spare, PID 1, execution).
    """
    status = json.loads(target.ctl("status", "--json"))
    zygote = status["zygote_pid"]
    while Path(f"/proc/{zygote}/comm").read_text().strip() == "bwrap":
        zygote = children(zygote)[0]  # bwrap, its PID 1, then the zygote (sh, setpriv exec'd)
    below = descendants(zygote)
    pss, uss = rollup(zygote)
    spare_pss = spare_uss = 0
    for pid in below:
        one_pss, one_uss = rollup(pid)
        spare_pss, spare_uss = spare_pss + one_pss, spare_uss + one_uss
    return (f"{target.kind}: zygote PSS {pss / 1024:.1f} MiB, USS {uss / 1024:.1f} MiB; "
            f"{len(children(zygote))} spares ({len(below)} processes) PSS "
            f"{spare_pss / 1024:.1f} MiB, USS {spare_uss / 1024:.1f} MiB;"
            f" total PSS {(pss + spare_pss) / 1024:.1f} MiB")


def main() -> int:
    results, memory = {}, []
    with tempfile.TemporaryDirectory(prefix="wfd-bench-") as tmp:
        root = Path(tmp)
        (root / "workflow.py").write_text(WORKFLOW)
        for kind, (sequential, parallel) in REQUESTS.items():
            target = Target(kind, root).start()
            try:
                results[kind] = asyncio.run(measure(target.url, sequential, parallel))
                if kind.startswith("zygote"):
                    time.sleep(1.5)  # one ping interval: spares refilled, status fresh
                    memory.append(zygote_memory(target))
            finally:
                target.stop()
    print(f"{'':12} {'p50 ms':>8} {'p99 ms':>8} {'exec/s @16':>11} {'fresh state':>12}")
    for kind, r in results.items():
        fresh = f"{r['fresh']}/{r['runs']}" if kind != "plain" else "(in-process)"
        print(f"{kind:12} {r['p50']:8.2f} {r['p99']:8.2f} {r['rate']:11.0f} {fresh:>12}")
    zygote, spawn, plain = results["zygote"], results["spawn"], results["plain"]
    print(f"spawn/zygote: p50 x{spawn['p50'] / zygote['p50']:.0f}, "
          f"throughput x{zygote['rate'] / spawn['rate']:.0f}")
    print(f"zygote/plain: p50 x{zygote['p50'] / plain['p50']:.1f}, "
          f"throughput x{plain['rate'] / zygote['rate']:.1f} (the price of isolation)")
    print("\n".join(memory))
    print(f"cpus: {os.cpu_count()}, load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
