"""Catch latency and throughput: wfd with the zygote, wfd with cold spawn, no isolation.

    .venv/bin/python bench/bench_executors.py      (or: make bench)

Starts, on loopback, two real daemons (`wfd serve`, executor "zygote" and
"spawn") and a plain aiohttp server that calls the same function in-process
with no isolation, then drives each with an aiohttp client:
  - p50 and p99 latency of a catch request at concurrency 1;
  - executions per second at concurrency 16, checking that every execution
    ran in a process of its own (distinct pids);
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
import os
import requests
from hrflow import Hrflow

def workflow(_request, settings):
    return {"status_code": 200, "body": str(os.getpid())}
'''
# Cold spawn is two orders of magnitude slower: fewer requests keep the run short.
REQUESTS = {"zygote": (1000, 3000), "spawn": (60, 300), "plain": (1000, 3000)}
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
            config.write_text(f'executor = "{self.kind}"\nlog_level = "warning"\n'
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
            "pids": len(set(bodies)), "runs": parallel}


def rollup(pid: int) -> tuple[int, int]:
    """PSS and USS of one process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0])
    return fields["Pss"], fields["Private_Clean"] + fields["Private_Dirty"]


def zygote_memory(target: Target) -> str:
    status = json.loads(target.ctl("status", "--json"))
    zygote = status["zygote_pid"]
    spares = Path(f"/proc/{zygote}/task/{zygote}/children").read_text().split()
    pss, uss = rollup(zygote)
    spare_pss = spare_uss = 0
    for pid in spares:
        one_pss, one_uss = rollup(int(pid))
        spare_pss, spare_uss = spare_pss + one_pss, spare_uss + one_uss
    return (f"zygote PSS {pss / 1024:.1f} MiB, USS {uss / 1024:.1f} MiB; "
            f"{len(spares)} spares PSS {spare_pss / 1024:.1f} MiB, USS {spare_uss / 1024:.1f} MiB;"
            f" total PSS {(pss + spare_pss) / 1024:.1f} MiB")


def main() -> int:
    results = {}
    with tempfile.TemporaryDirectory(prefix="wfd-bench-") as tmp:
        root = Path(tmp)
        (root / "workflow.py").write_text(WORKFLOW)
        for kind, (sequential, parallel) in REQUESTS.items():
            target = Target(kind, root).start()
            try:
                results[kind] = asyncio.run(measure(target.url, sequential, parallel))
                if kind == "zygote":
                    time.sleep(1.5)  # one ping interval: spares refilled, status fresh
                    memory = zygote_memory(target)
            finally:
                target.stop()
    print(f"{'':8} {'p50 ms':>8} {'p99 ms':>8} {'exec/s @16':>11} {'distinct pids':>14}")
    for kind, r in results.items():
        pids = f"{r['pids']}/{r['runs']}" if kind != "plain" else "(in-process)"
        print(f"{kind:8} {r['p50']:8.2f} {r['p99']:8.2f} {r['rate']:11.0f} {pids:>14}")
    zygote, spawn, plain = results["zygote"], results["spawn"], results["plain"]
    print(f"spawn/zygote: p50 x{spawn['p50'] / zygote['p50']:.0f}, "
          f"throughput x{zygote['rate'] / spawn['rate']:.0f}")
    print(f"zygote/plain: p50 x{zygote['p50'] / plain['p50']:.1f}, "
          f"throughput x{plain['rate'] / zygote['rate']:.1f} (the price of isolation)")
    print(memory)
    print(f"cpus: {os.cpu_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
