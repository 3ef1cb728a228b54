"""Where a catch execution's time and CPU go: strict vs none, zygote vs spawn, same run.

    .venv/bin/python bench/bench_stages.py [--quick]      (or: make bench)

For each variant a real daemon (`wfd serve` with `trace_stages = true`) is
started on loopback and driven by an aiohttp client:
  - low rate: one request every 100 ms (what a webhook sees), p50/p99;
  - back to back: one request after the other, p50/p99;
  - concurrency 16: executions per second;
  - the stage breakdown: the median time between consecutive stages
    (wfd/stages.py) of the requests of each phase, read from
    the daemon's `stages` log lines; `client` is the bench's own clock when
    the response arrived (CLOCK_MONOTONIC is one clock host-wide);
  - CPU per execution over the whole process tree (daemon, zygote, spares,
    children, bwrap, pasta): the sum of utime, stime and the reaped
    children's times of every process below the bench, read from /proc
    before the requests and after the last execution was cleaned up, so
    each finished execution is counted in whoever reaped it (the zygote,
    the daemon, a namespace's init); the same daemon left idle for as long
    (timers, pings, spares refilled) is subtracted. The bench is also the
    child subreaper of the tree, so that nothing is left behind. (Counting
    RUSAGE_CHILDREN after a stop instead loses every subtree whose reaper
    is killed rather than exits: the zygote's, under bwrap.)

`--compare DIR` also runs each variant from another checkout (its own
.venv, e.g. a worktree of the commit before a change), variant after
variant in the same run, so that a before/after table shares its load.
"""

import argparse
import asyncio
import ctypes
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

from wfd.stages import STAGES

WORKFLOW = '''
import requests
from hrflow import Hrflow

def workflow(_request, settings):
    return {"status_code": 200, "body": "ok"}
'''
VARIANTS = {
    "strict zygote": 'executor = "zygote"\nisolation = "strict"\n',
    "none zygote": 'executor = "zygote"\nisolation = "none"\n',
    "strict spawn": 'executor = "spawn"\nisolation = "strict"\n',
    "none spawn": 'executor = "spawn"\nisolation = "none"\n',
}
# (low-rate, back-to-back, concurrency 16) requests; cold spawn is ~20x slower.
COUNTS = {"zygote": (100, 300, 1500), "spawn": (30, 40, 120)}
QUICK = {"zygote": (30, 60, 300), "spawn": (10, 10, 40)}
LOW_RATE_INTERVAL_S = 0.1
CONCURRENCY = 16
WARMUP = 20
PR_SET_CHILD_SUBREAPER = 36
REAP_TIMEOUT_S = 20.0
EXECUTION_HEADER = "X-Wfd-Execution-Id"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def become_subreaper() -> None:
    """Orphans of the daemon's tree (pasta, a zygote whose bwrap died) are reparented to us."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap_all() -> int:
    """Wait for every process left in our tree; how many there were besides the daemon."""
    reaped, deadline = 0, time.monotonic() + REAP_TIMEOUT_S
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid:
            reaped += 1
        elif time.monotonic() > deadline:
            raise RuntimeError("processes of the daemon's tree did not exit")
        else:
            time.sleep(0.01)


def tree_cpu_s(root: int) -> float:
    """CPU of `root` and every process below it, with the children each has reaped."""
    total, pending = 0.0, [root]
    while pending:
        pid = pending.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15]) / CLOCK_TICKS
            for task in os.listdir(f"/proc/{pid}/task"):
                pending += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
        except (OSError, ValueError):
            continue  # it exited meanwhile: its parent has its times now
    return total


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class Daemon:
    """One `wfd serve` with the bench workflow deployed; stopped with SIGTERM and reaped."""

    def __init__(self, name: str, config: str, root: Path, tree: Path | None = None) -> None:
        slug = name.replace(" ", "-").replace("@", "")
        self.root, self.port = root, free_port()
        self.log = root / f"{slug}-{time.monotonic_ns()}.log"
        self.socket = f"{tempfile.gettempdir()}/wfd-stages-{os.getpid()}-{slug}.sock"
        toml = root / f"{slug}.toml"
        toml.write_text(f'{config}log_format = "json"\nlog_level = "info"\n'
                        "trace_stages = true\nglobal_concurrency = 32\nqueue_max = 1000\n"
                        "[limits]\nconcurrency = 32\n")
        # Another checkout runs with its own interpreter, from its own directory.
        self.python = str(tree / ".venv" / "bin" / "python") if tree else sys.executable
        self.cwd = tree
        self.argv = [self.python, "-m", "wfd", "serve", "--config", str(toml),
                     "--data-dir", str(root / f"data-{slug}-{time.monotonic_ns()}"),
                     "--listen", f"127.0.0.1:{self.port}", "--socket", self.socket]
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=log, cwd=self.cwd)
        deadline = time.monotonic() + 30
        while not listening(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        (self.root / "workflow.py").write_text(WORKFLOW)
        self.ctl("deploy", "bench", str(self.root / "workflow.py"), "--catch")
        self.url = self.ctl("url", "bench").strip()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def wait_idle(self) -> None:
        """Until no execution is running or being cleaned up (their CPU is then counted)."""
        deadline = time.monotonic() + 30
        while orjson.loads(self.ctl("status", "--json"))["running"]:
            if time.monotonic() > deadline:
                raise RuntimeError("executions still running 30 s after the last request")
            time.sleep(0.01)

    def ctl(self, *args: str) -> str:
        return subprocess.run([self.python, "-m", "wfd", "ctl", "--socket", self.socket, *args],
                              check=True, capture_output=True, text=True, cwd=self.cwd).stdout

    def stop(self) -> None:
        """SIGTERM (a clean shutdown: the zygote and its spares are stopped), then reap all."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        reap_all()

    def stages(self) -> dict[str, dict[str, float]]:
        """The `stages` lines of the log, by execution id."""
        found = {}
        for line in self.log.read_bytes().splitlines():
            if line.startswith(b"{") and b'"stages"' in line:
                entry = orjson.loads(line)
                if entry.get("event") == "stages":
                    found[entry["id"]] = entry
        return found


@dataclass
class Result:
    low: list[tuple[str, float, float]] = field(default_factory=list)  # id, ms, client stamp
    seq: list[tuple[str, float, float]] = field(default_factory=list)
    par: list[tuple[str, float, float]] = field(default_factory=list)
    rate: float = 0.0
    cpu_ms: float = 0.0
    executions: int = 0
    stages: dict[str, dict[str, float]] = field(default_factory=dict)


async def call(session: aiohttp.ClientSession, url: str) -> tuple[str, float, float]:
    """One catch request: (execution id, latency ms, monotonic time the answer arrived)."""
    started = time.monotonic()
    async with session.post(url, json={"event": "profile.parsing.success"}) as response:
        body = await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {body!r}")
        arrived = time.monotonic()
        return response.headers[EXECUTION_HEADER], (arrived - started) * 1000, arrived


async def drive(url: str, counts: tuple[int, int, int], result: Result) -> float:
    """Warm-up, low rate, back to back, concurrency 16; returns the wall time taken."""
    low, seq, parallel = counts
    began = time.monotonic()
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(WARMUP):
            await call(session, url)
        due = time.monotonic()
        for _ in range(low):
            due += LOW_RATE_INTERVAL_S
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            result.low.append(await call(session, url))
        for _ in range(seq):
            result.seq.append(await call(session, url))
        queue = iter(range(parallel))

        async def worker() -> None:
            for _ in queue:
                result.par.append(await call(session, url))
        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        result.rate = parallel / (time.monotonic() - started)
    result.executions = WARMUP + low + seq + parallel
    return time.monotonic() - began


def measure(name: str, config: str, counts: tuple[int, int, int], root: Path,
            tree: Path | None) -> Result:
    """The loaded run, then an idle one as long, each on a fresh daemon."""
    result = Result()
    daemon = Daemon(name, config, root, tree)
    try:
        daemon.start()
        before = tree_cpu_s(daemon.pid)
        wall = asyncio.run(drive(daemon.url, counts, result))
        daemon.wait_idle()
        loaded = tree_cpu_s(daemon.pid) - before
    finally:
        daemon.stop()
    result.stages = daemon.stages()
    idle = Daemon(name, config, root, tree)
    try:
        idle.start()
        before = tree_cpu_s(idle.pid)
        time.sleep(wall)
        idled = tree_cpu_s(idle.pid) - before
    finally:
        idle.stop()
    result.cpu_ms = (loaded - idled) * 1000 / result.executions
    return result


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def breakdown(result: Result, calls: list[tuple[str, float, float]]) -> dict[str, float]:
    """Median time from the stage before to each stage, over `calls` (ms)."""
    steps: dict[str, list[float]] = {}
    for execution_id, _, arrived in calls:
        line = result.stages.get(execution_id)
        if line is None:
            continue
        previous = 0.0  # offsets are relative to `received`
        for stage in STAGES[1:]:
            if stage in line:
                steps.setdefault(stage, []).append(line[stage] - previous)
                previous = line[stage]
        if "sent" in line and "received_at" in line:
            steps.setdefault("client", []).append((arrived - line["received_at"]) * 1000
                                                  - line["sent"])
    return {stage: statistics.median(values) for stage, values in steps.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--only", action="append", choices=list(VARIANTS),
                        help="run only this variant (repeatable)")
    parser.add_argument("--compare", type=Path, metavar="DIR",
                        help="also run each variant from the checkout in DIR (row `@base`)")
    args = parser.parse_args()
    become_subreaper()
    counts = QUICK if args.quick else COUNTS
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="wfd-stages-") as tmp:
        for name, config in VARIANTS.items():
            if args.only and name not in args.only:
                continue
            executor = name.split()[1]
            if args.compare:
                results[f"{name} @base"] = measure(name, config, counts[executor], Path(tmp),
                                                   args.compare.resolve())
            results[name] = measure(name, config, counts[executor], Path(tmp), None)
    report(results)
    return 0


def report(results: dict[str, Result]) -> None:
    print(f"{'variant':<20} {'low p50':>8} {'low p99':>8} {'b2b p50':>8} {'b2b p99':>8}"
          f" {'exec/s@16':>10} {'CPU ms/exec':>12}")
    for name, r in results.items():
        low = [ms for _, ms, _ in r.low]
        seq = [ms for _, ms, _ in r.seq]
        print(f"{name:<20} {percentile(low, 50):8.2f} {percentile(low, 99):8.2f}"
              f" {percentile(seq, 50):8.2f} {percentile(seq, 99):8.2f} {r.rate:10.0f}"
              f" {r.cpu_ms:12.2f}")
    pairs = [(f"strict {executor}{tree}", f"none {executor}{tree}")
             for tree in ("", " @base") for executor in ("zygote", "spawn")]
    for strict, none in pairs:
        if strict in results and none in results:
            s, n = results[strict], results[none]
            ratio = (percentile([ms for _, ms, _ in s.low], 50)
                     / percentile([ms for _, ms, _ in n.low], 50))
            print(f"{strict} / {none}: CPU x{s.cpu_ms / n.cpu_ms:.2f}, low-rate p50 x{ratio:.2f}")
    titles = {"low": "low rate (1 per 100 ms)", "seq": "back to back",
              "par": f"concurrency {CONCURRENCY}"}
    for phase, title in titles.items():
        tables = {name: breakdown(r, getattr(r, phase)) for name, r in results.items()}
        print(f"\nstage breakdown, {title}: median ms since the stage before")
        print(f"{'stage':<11}" + "".join(f" {name:>20}" for name in tables))
        for stage in (*STAGES[1:], "client"):
            cells = [tables[name].get(stage) for name in tables]
            if any(cell is not None for cell in cells):
                print(f"{stage:<11}" + "".join(
                    f" {cell:20.3f}" if cell is not None else f" {'-':>20}" for cell in cells))
    print(f"\ncpus: {os.cpu_count()}, load average {os.getloadavg()}")


if __name__ == "__main__":
    sys.exit(main())
