"""Async delivery: what a 202 costs, how fast the queue drains, what stored requests weigh.

    .venv/bin/python bench/bench_delivery.py      (or: make bench)

Starts a real daemon on loopback (zygote executor, strict isolation) and:
  - sends, interleaved one after the other so that both see the same load,
    requests that are rejected (a wrong key: 404) and async requests that
    are accepted (202 once the store has committed them), and prints p50 and
    p99 of each. Only the commit of the delivery stands between the two;
  - queues QUEUED deliveries behind a slow execution, then deploys a fast
    version and measures how many per second the worker drains at
    concurrency 16 (from wfd_deliveries_total);
  - in-process, stores 10,000 requests of 2 KiB of JSON (webhook-like: ids,
    words, numbers) through the store, as async deliveries and as the
    requests of sync executions, and prints the growth of the database file.
"""

import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import requests

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wfd import ids
from wfd.domain import Status, Trigger
from wfd.store import ExecutionRecord, Store, utc_iso

WORKFLOW = "def workflow(_request, settings):\n    return None\n"
LATENCY_REQUESTS = 1000
QUEUED = 2000
CONCURRENCY = 16
STORED = 10_000
WORDS = ["python", "engineer", "data", "paris", "senior", "lead", "team", "project",
         "customer", "sales", "manager", "marketing", "java", "cloud", "remote", "contract",
         "years", "experience", "university", "master", "skills", "french", "english",
         "german", "recruiter", "talent", "pipeline", "onboarding", "hired"]


def profile_request(rng: random.Random, size: int = 2048) -> dict:
    """A webhook's `_request` of about `size` bytes of JSON: headers, ids, words, numbers."""
    request = {"Content-Type": "application/json", "User-Agent": "HrFlow-Webhook/1.0",
               "type": "profile.parse.success", "origin": "api",
               "profile": {"key": f"{rng.getrandbits(160):040x}", "experiences": []}}
    while len(orjson.dumps(request)) < size:
        request["profile"]["experiences"].append({
            "title": " ".join(rng.choices(WORDS, k=3)), "company": rng.choice(WORDS).title(),
            "start": f"20{rng.randint(10, 24)}-{rng.randint(1, 12):02d}",
            "description": " ".join(rng.choices(WORDS, k=12)), "id": rng.getrandbits(48)})
    return request


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout: float = 60.0, what: str = "the daemon",
               interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


class Daemon:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.socket = f"{tempfile.gettempdir()}/wfd-bench-delivery-{os.getpid()}.sock"
        self.config = root / "wfd.toml"
        self.config.write_text('log_level = "warning"\nglobal_concurrency = 16\n'
                               "queue_max = 1000\n[limits]\nconcurrency = 16\n")
        self.process: subprocess.Popen | None = None

    def start(self) -> "Daemon":
        log = (self.root / "wfd.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wfd", "serve", "--config", str(self.config),
             "--data-dir", str(self.root / "data"), "--listen", f"127.0.0.1:{self.port}",
             "--socket", self.socket], stdout=log, stderr=log, start_new_session=True)
        wait_until(self._healthy)
        return self

    def _healthy(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/healthz",
                                timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def ctl(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "wfd", "ctl", "--socket", self.socket,
                               *args], check=True, capture_output=True, text=True).stdout

    def done(self) -> float:
        text = requests.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("wfd_deliveries_total{") and 'state="done"' in line)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(60)


async def latencies(url: str) -> dict[str, list[float]]:
    """Rejected and accepted requests, alternating, each timed on its own."""
    seen: dict[str, list[float]] = {"404": [], "202": []}
    async with aiohttp.ClientSession() as session:
        for i in range(LATENCY_REQUESTS * 2 + 40):
            kind = "404" if i % 2 else "202"
            target = url + "-wrong-key" if kind == "404" else url
            started = time.perf_counter()
            async with session.post(target, json={"i": i}) as response:
                await response.read()
                if str(response.status) != kind:
                    raise RuntimeError(f"expected {kind}, got {response.status}")
            if i >= 40:  # warm-up
                seen[kind].append((time.perf_counter() - started) * 1000)
    return seen


async def fill(url: str, count: int) -> None:
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        todo = iter(range(count))

        async def sender() -> None:
            for i in todo:
                async with session.post(url, json={"i": i}) as response:
                    if response.status != 202:
                        raise RuntimeError(f"expected 202, got {response.status}")
        await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))


def drain_rate(daemon: Daemon, root: Path, url: str) -> tuple[float, int]:
    """Deliveries per second the worker drains from a full queue, at concurrency 16.

    The queue is filled while the workflow runs one slow execution at a time;
    the measurement starts when a fast version with concurrency 16 is deployed.
    """
    slow = root / "slow.py"
    slow.write_text("import time\ndef workflow(_request, settings):\n    time.sleep(1)\n")
    daemon.ctl("deploy", "bench", str(slow), "--catch", "--concurrency", "1")
    before = daemon.done()
    asyncio.run(fill(url, QUEUED))
    daemon.ctl("deploy", "bench", str(root / "workflow.py"), "--catch", "--concurrency", "16")
    first, started = daemon.done(), time.perf_counter()
    wait_until(lambda: daemon.done() >= before + QUEUED, timeout=600, what="the queue to drain",
               interval=0.25)  # scrapes cost the daemon CPU: not too often
    drained = daemon.done() - first
    return drained / (time.perf_counter() - started), int(drained)


def sync_rate(daemon: Daemon, root: Path) -> float:
    """The same workflow called synchronously at concurrency 16: the executor's own pace."""
    daemon.ctl("deploy", "bench-sync", str(root / "workflow.py"), "--catch")
    url = daemon.ctl("url", "bench-sync").strip()

    async def run() -> float:
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        async with aiohttp.ClientSession(connector=connector) as session:
            todo = iter(range(QUEUED // 4))

            async def sender() -> None:
                for i in todo:
                    async with session.post(url, json={"i": i}) as response:
                        if response.status != 200:
                            raise RuntimeError(f"expected 200, got {response.status}")
            started = time.perf_counter()
            await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))
            return QUEUED // 4 / (time.perf_counter() - started)
    return asyncio.run(run())


async def store_growth(root: Path) -> tuple[int, int]:
    """Bytes the database grows by for STORED requests of ~2 KiB: async, and sync.

    A sync request is stored with its execution's record, in its transaction.

    Sizes are taken after closing the store, which checkpoints the WAL into the file.
    """
    sizes = []
    rng = random.Random(14)
    sample = [profile_request(rng) for _ in range(100)]
    for kind in ("async", "sync"):
        store = Store(root / f"{kind}.db")
        await store.open()
        await store.deploy("bench", "catch", WORKFLOW, {}, None, "k")
        await store.close()
        before = store.path.stat().st_size
        await store.open()
        for i in range(STORED):
            if kind == "async":
                await store.accept_delivery(ids.execution_id(), "bench", sample[i % 100])
            else:
                execution_id = ids.execution_id()
                record = ExecutionRecord(id=execution_id, workflow="bench", version=1,
                                         trigger=Trigger.CATCH, status=Status.SUCCESS,
                                         started_at=utc_iso(), duration_ms=1.0,
                                         request_id=execution_id)
                await store.finish("bench", None, {}, 2**20, lambda _, r=record: r,
                                   sample[i % 100])
        await store.close()
        sizes.append(store.path.stat().st_size - before)
    return sizes[0], sizes[1]


def quantiles(values: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(values, n=100)
    return cuts[49], cuts[98]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="wfd-bench-delivery-") as tmp:
        root = Path(tmp)
        (root / "workflow.py").write_text(WORKFLOW)
        daemon = Daemon(root).start()
        try:
            daemon.ctl("deploy", "bench", str(root / "workflow.py"), "--catch", "--async")
            url = daemon.ctl("url", "bench").strip()
            seen = asyncio.run(latencies(url))
            wait_until(lambda: daemon.done() >= LATENCY_REQUESTS + 20, timeout=300,
                       what="the latency run's deliveries")
            rate, drained = drain_rate(daemon, root, url)
            sync = sync_rate(daemon, root)
        finally:
            daemon.stop()
        async_bytes, sync_bytes = asyncio.run(store_growth(root))
    print(f"{'':28} {'p50 ms':>8} {'p99 ms':>8}")
    for kind, label in (("404", "rejected (404, wrong key)"), ("202", "accepted (202, async)")):
        p50, p99 = quantiles(seen[kind])
        print(f"{label:28} {p50:8.2f} {p99:8.2f}")
    (r50, r99), (a50, a99) = quantiles(seen["404"]), quantiles(seen["202"])
    print(f"202 - 404: p50 {a50 - r50:+.2f} ms, p99 {a99 - r99:+.2f} ms")
    print(f"queue drained: {drained} deliveries at {rate:.0f}/s; the same workflow called "
          f"synchronously: {sync:.0f}/s (concurrency {CONCURRENCY})")
    size = len(orjson.dumps(profile_request(random.Random(14))))
    print(f"store growth per {STORED:,} requests of {size / 1024:.1f} KiB: async "
          f"{async_bytes / 2**20:.1f} MiB, sync (request and record) {sync_bytes / 2**20:.1f} MiB")
    print(f"cpus: {os.cpu_count()}, load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
