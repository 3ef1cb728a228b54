"""Measure what each isolation layer adds to one execution, end to end.

Run as root from the repo root: `.venv/bin/python bench/bench_isolation.py [runs]`.
Each row runs a trivial catch workflow through the daemon's real executor
(cold spawn or zygote: job, result pipe, kill and cleanup) with one
combination of layers, and prints the median and 90th percentile in
milliseconds;
docs/isolation.md quotes them. Runs are sequential, so those numbers are
latency; then the strict zygote with and without the network layer runs
at concurrency 16, batches interleaved, for executions per second.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

import uvloop

from wfd import ids
from wfd.config import Limits
from wfd.executor import Executor, Job, SpawnExecutor, ZygoteExecutor
from wfd.isolation import bwrap, cgroups, network
from wfd.isolation.layers import Isolation

CODE = 'def workflow(_request, settings):\n    return {"status_code": 200, "body": "ok"}\n'


async def once(executor: Executor) -> float:
    job = Job(execution_id=ids.execution_id(), name="bench", kind="catch", version=1,
              code=CODE, limits=Limits(), request={})
    started = time.perf_counter()
    outcome = await executor.run(job)
    assert outcome.status == "success", outcome
    return (time.perf_counter() - started) * 1000


def executor_for(label: str, isolation: Isolation) -> Executor:
    if label.startswith("zygote"):
        return ZygoteExecutor(["json"], 2, 8, isolation)
    return SpawnExecutor(isolation)


CONCURRENCY = 16
BATCH = 160


async def throughput(rows: dict[str, Isolation], rounds: int) -> dict[str, float]:
    """Executions per second at CONCURRENCY, batches of each row interleaved."""
    executors = {label: executor_for(label, isolation) for label, isolation in rows.items()}
    for executor in executors.values():
        await executor.start()
    took = dict.fromkeys(rows, 0.0)
    try:
        for _ in range(rounds):
            for label, executor in executors.items():
                gate = asyncio.Semaphore(CONCURRENCY)

                async def one(runner: Executor = executor,
                              gate: asyncio.Semaphore = gate) -> None:
                    async with gate:
                        await once(runner)

                started = time.perf_counter()
                await asyncio.gather(*(one() for _ in range(BATCH)))
                took[label] += time.perf_counter() - started
    finally:
        for executor in executors.values():
            await executor.close()
    return {label: rounds * BATCH / seconds for label, seconds in took.items()}


async def measure(rows: dict[str, Isolation], runs: int) -> dict[str, list[float]]:
    """Interleaved (one of each per round), so load drifting on the host hits every row alike."""
    executors = {label: executor_for(label, isolation) for label, isolation in rows.items()}
    for executor in executors.values():
        await executor.start()
    samples: dict[str, list[float]] = {label: [] for label in rows}
    try:
        for _ in range(runs):
            for label, executor in executors.items():
                samples[label].append(await once(executor))
    finally:
        for executor in executors.values():
            await executor.close()
    return samples


def main(runs: int) -> None:
    support = bwrap.probe()
    backend = cgroups.detect()
    if not support.available or backend is None:
        sys.exit(f"need bwrap and a writable cgroup tree (bwrap: {support.reason}, "
                 f"cgroup: {backend})")
    found = network.detect()
    if not found.available:
        sys.exit(f"need pasta, nsenter and ip: {found.reason}")
    net = network.Network(found, Path("/etc/resolv.conf"))
    python = sys.executable
    rows = {
        "rlimits only (isolation = none)": Isolation("none", python, None, None),
        "+ cgroup (join prefix, limits, kill, rmdir)": Isolation("best-effort", python, None,
                                                                  backend),
        "+ bwrap (namespaces, uid, fs view, tmpfs)": Isolation("strict", python, support, None),
        "+ bwrap + network": Isolation("strict", python, support, None, net),
        "+ bwrap + cgroup (strict without network)": Isolation("strict", python, support,
                                                               backend),
        "+ bwrap + cgroup + network (strict default)": Isolation("strict", python, support,
                                                                 backend, net),
        "zygote: rlimits only": Isolation("none", python, None, None),
        "zygote: + cgroup (fd join, limits, kill, rmdir)": Isolation("best-effort", python,
                                                                     None, backend),
        "zygote: + bwrap, per-execution namespaces": Isolation("strict", python, support, None),
        "zygote: + bwrap + network": Isolation("strict", python, support, None, net),
        "zygote: + bwrap + cgroup (strict without network)": Isolation(
            "strict", python, support, backend),
        "zygote: + bwrap + cgroup + network (strict default)": Isolation(
            "strict", python, support, backend, net),
    }
    print(f"{runs} executions each, {support.version}, cgroup {backend.name}, "
          f"daemon {'root (setpriv)' if support.mode == 'setpriv' else 'unprivileged (userns)'}")
    results = uvloop.run(measure(rows, runs))
    base = statistics.median(next(iter(results.values())))
    for label, samples in results.items():
        samples.sort()
        median, p90 = statistics.median(samples), samples[int(len(samples) * 0.9)]
        print(f"{label:<56} median {median:6.1f} ms  p90 {p90:6.1f} ms  (+{median - base:.1f})")
    pair = [label for label in rows if label.startswith("zygote: + bwrap + cgroup")]
    rates = uvloop.run(throughput({label: rows[label] for label in pair}, max(1, runs // 20)))
    for label, rate in rates.items():
        print(f"{label:<56} {rate:6.1f} executions/s at concurrency {CONCURRENCY}")
    backend.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
