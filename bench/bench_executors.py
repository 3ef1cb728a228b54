"""Catch latency and throughput: wfd with the zygote, wfd with cold spawn, no isolation.

    .venv/bin/python bench/bench_executors.py      (or: make bench)
    .venv/bin/python bench/bench_executors.py --baseline OTHER/.venv/bin/python

`--baseline` runs the zygote targets a second time, in the same run, with
another interpreter that has another revision of wfd installed (a git
worktree with its own venv): the before/after comparison of a change.

Starts, on loopback, real daemons (`wfd serve`: executor "zygote" and
"spawn" under the default strict isolation, and the zygote with isolation
"none") and a plain aiohttp server that calls the same function in-process
with no isolation, then drives each with an aiohttp client:
  - p50 and p99 latency of a catch request at concurrency 1, back to back
    and at a low arrival rate (one request every LOW_RATE_INTERVAL_S: the
    rate of a webhook, where nothing on the host is warm from the previous
    request);
  - the CPU an execution costs across the daemon's whole process tree
    (daemon, zygote, spares, children: a cpuacct cgroup around the daemon,
    when the host has a v1 cpuacct hierarchy), back to back and at 16;
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

CPUACCT = Path("/sys/fs/cgroup/cpuacct")
LOW_RATE_INTERVAL_S = 0.1
LOW_RATE_REQUESTS = 100

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

    def __init__(self, kind: str, root: Path, python: str = sys.executable,
                 label: str = "") -> None:
        self.kind, self.root, self.python = kind, root, python
        self.label = label or kind
        self.port = free_port()
        self.socket = f"{tempfile.gettempdir()}/wfd-bench-{os.getpid()}-{self.label}.sock"
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.cpu = CpuMeter(f"wfd-bench-{os.getpid()}-{self.label}")

    def start(self) -> "Target":
        log = (self.root / f"{self.label}.log").open("wb")
        if self.kind == "plain":
            argv = [sys.executable, str(Path(__file__).with_name("plain_server.py")),
                    str(self.port), str(self.root / "workflow.py")]
            self.url = f"http://127.0.0.1:{self.port}/"
        else:
            config = self.root / f"{self.kind}.toml"
            config.write_text(f'{CONFIG[self.kind]}log_level = "warning"\n'
                              "global_concurrency = 32\nqueue_max = 1000\n"
                              "[limits]\nconcurrency = 32\n")
            argv = [self.python, "-m", "wfd", "serve", "--config", str(config),
                    "--data-dir", str(self.root / f"data-{self.label}"),
                    "--listen", f"127.0.0.1:{self.port}", "--socket", self.socket]
        # cwd: `-m wfd` imports from the current directory first, whichever python runs it.
        self.process = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True,
                                        cwd=self.root, preexec_fn=self.cpu.join)
        wait_until(lambda: listening(self.port))
        if self.kind != "plain":
            self.ctl("deploy", "bench", str(self.root / "workflow.py"), "--catch")
            self.url = self.ctl("url", "bench").strip()
        return self

    def ctl(self, *args: str) -> str:
        return subprocess.run([self.python, "-m", "wfd", "ctl", "--socket", self.socket,
                               *args], check=True, capture_output=True, text=True,
                              cwd=self.root).stdout

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)
        self.cpu.close()


class CpuMeter:
    """CPU used by a process tree: a cpuacct cgroup the server joins before it execs.

    Every process it starts stays in it (wfd moves its executions only in
    the pids, memory and cpu hierarchies), so its usage counter covers the
    daemon, the zygote, every spare and every execution, reaped or not.
    None of it without a v1 cpuacct hierarchy (then "n/a").
    """

    def __init__(self, name: str) -> None:
        self.path = CPUACCT / name if (CPUACCT / "cpuacct.usage").exists() else None
        if self.path is not None:
            self.path.mkdir()

    def join(self) -> None:
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def used_ns(self) -> int | None:
        return int((self.path / "cpuacct.usage").read_text()) if self.path else None

    def close(self) -> None:
        if self.path is not None:
            for _ in range(100):  # the last processes may still be exiting
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.05)


async def call(session: aiohttp.ClientSession, url: str) -> tuple[float, str]:
    started = time.perf_counter()
    async with session.post(url, json={"event": "profile.parsing.success"}) as response:
        body = await response.text()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {body}")
    return (time.perf_counter() - started) * 1000, body


def per_execution_ms(before: int | None, after: int | None, executions: int) -> float | None:
    return None if before is None or after is None else (after - before) / executions / 1e6


async def measure(target: Target, sequential: int, parallel: int, low_rate: int) -> dict:
    url, cpu = target.url, target.cpu
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(WARMUP):
            await call(session, url)
        used = cpu.used_ns()
        latencies = [(await call(session, url))[0] for _ in range(sequential)]
        cpu_sequential = per_execution_ms(used, cpu.used_ns(), sequential)
        slow: list[float] = []
        loop = asyncio.get_running_loop()
        for _ in range(low_rate):
            due = loop.time() + LOW_RATE_INTERVAL_S
            slow.append((await call(session, url))[0])
            await asyncio.sleep(max(0.0, due - loop.time()))
        bodies: list[str] = []
        queue = iter(range(parallel))

        async def worker() -> None:
            for _ in queue:
                bodies.append((await call(session, url))[1])
        used = cpu.used_ns()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
        cpu_parallel = per_execution_ms(used, cpu.used_ns(), parallel)
    cuts = statistics.quantiles(latencies, n=100)
    slow_cuts = statistics.quantiles(slow, n=100) if low_rate else [float("nan")] * 99
    return {"p50": cuts[49], "p99": cuts[98], "rate": parallel / elapsed,
            "fresh": bodies.count("1"), "runs": parallel,
            "slow_p50": slow_cuts[49], "slow_p99": slow_cuts[98],
            "cpu_seq": cpu_sequential, "cpu_par": cpu_parallel}


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
    """The zygote's python process (under bwrap: bwrap's descendant) and its spares.

    Each spare is one process, the execution it will be.
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
    return (f"{target.label}: zygote PSS {pss / 1024:.1f} MiB, USS {uss / 1024:.1f} MiB; "
            f"{len(children(zygote))} spares ({len(below)} processes) PSS "
            f"{spare_pss / 1024:.1f} MiB, USS {spare_uss / 1024:.1f} MiB;"
            f" total PSS {(pss + spare_pss) / 1024:.1f} MiB")


def targets(root: Path, baseline: str | None) -> list[Target]:
    """Each kind with this checkout's wfd, and the zygote kinds with the baseline's too."""
    made = [Target(kind, root) for kind in REQUESTS]
    if baseline:
        made[1:1] = [Target(kind, root, baseline, f"{kind}@base") for kind in REQUESTS
                     if kind.startswith("zygote")]
    return made


def ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main() -> int:
    baseline = sys.argv[sys.argv.index("--baseline") + 1] if "--baseline" in sys.argv else None
    results, memory = {}, []
    with tempfile.TemporaryDirectory(prefix="wfd-bench-") as tmp:
        root = Path(tmp)
        (root / "workflow.py").write_text(WORKFLOW)
        for target in targets(root, baseline):
            sequential, parallel = REQUESTS[target.kind]
            # A cold spawn takes longer than the low rate's interval: no low-rate row.
            low_rate = 0 if target.kind == "spawn" else LOW_RATE_REQUESTS
            target.start()
            try:
                results[target.label] = asyncio.run(measure(target, sequential, parallel,
                                                            low_rate))
                if target.kind.startswith("zygote"):
                    time.sleep(1.5)  # one ping interval: spares refilled, status fresh
                    memory.append(zygote_memory(target))
            finally:
                target.stop()
    print(f"{'':17} {'p50 ms':>7} {'p99 ms':>7} {'low-rate p50':>13} {'p99':>7} "
          f"{'exec/s @16':>11} {'CPU ms/exec':>12} {'@16':>6} {'fresh state':>12}")
    for label, r in results.items():
        fresh = f"{r['fresh']}/{r['runs']}" if label != "plain" else "(in-process)"
        print(f"{label:17} {r['p50']:7.2f} {r['p99']:7.2f} {r['slow_p50']:13.2f} "
              f"{r['slow_p99']:7.2f} {r['rate']:11.0f} {ms(r['cpu_seq']):>12} "
              f"{ms(r['cpu_par']):>6} {fresh:>12}")
    for suffix in ("", "@base"):
        strict, none = results.get("zygote" + suffix), results.get("zygote-none" + suffix)
        if strict and none:
            cpu = (f", CPU x{strict['cpu_seq'] / none['cpu_seq']:.2f}"
                   if strict["cpu_seq"] and none["cpu_seq"] else "")
            print(f"strict/none{suffix}: p50 x{strict['p50'] / none['p50']:.2f}, low-rate p50 "
                  f"x{strict['slow_p50'] / none['slow_p50']:.2f}{cpu}")
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
