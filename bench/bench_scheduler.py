"""How fast the pull scheduler hands due workflows to the executor, and what it costs idle.

Runs the real Scheduler, Dispatcher and Store (a SQLite file in a temp dir)
on uvloop; only the executor is a stand-in that notes when each execution
reaches it and succeeds at once, so what is measured is wfd's own cost, not
a child process's start-up. Measures:

1. timer lateness (due time -> the executor is called), p50/p99, with 1 and
   with 10,000 pull workflows registered;
2. 1,000 workflows due in the same second out of 10,000: when the last one is
   handed to the dispatcher, and when the last one reaches the executor;
3. CPU used by the daemon's loop over 5 s with 10,000 timers armed and none due.

Run: `make bench` or `.venv/bin/python bench/bench_scheduler.py`.
"""

import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import uvloop

from wfd import config as config_module
from wfd.admission import Admission
from wfd.dispatch import Dispatcher
from wfd.executor import Job, Outcome
from wfd.scheduler import Scheduler
from wfd.store import Store, utc_iso

CODE = "def workflow(settings):\n    pass\n"


class InstantExecutor:
    """Stands in for a child process: notes the call time, succeeds at once."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    async def run(self, job: Job) -> Outcome:
        self.calls.append((job.name, time.time()))
        return Outcome("success", 0.1, settings_change={"set": {}, "unset": []})


class TimedDispatcher(Dispatcher):
    """The real dispatcher, noting when each execution was handed to it."""

    handed: list[float]

    async def execute(self, *args, **kwargs):  # type: ignore[override]
        self.handed.append(time.time())
        return await super().execute(*args, **kwargs)


def item(name: str, schedule: dict, next_due: str | None = None) -> dict:
    now = utc_iso()
    return {"name": name, "kind": "pull", "enabled": True, "version": 1, "catch_key": "-",
            "settings": {}, "limits": {}, "schedule": schedule, "created_at": now,
            "updated_at": now, "versions": [{"version": 1, "code": CODE, "created_at": now}]}


async def setup(directory: Path, extra: int) -> tuple[Store, Scheduler, InstantExecutor,
                                                       TimedDispatcher]:
    config = config_module.load(data_dir=str(directory))
    store = Store(directory / "wfd.db")
    await store.open()
    if extra:
        await store.import_([item(f"idle-{i:05d}", {"every_s": 86400}) for i in range(extra)])
    executor = InstantExecutor()
    dispatcher = TimedDispatcher(config, store, executor,
                                 Admission(config.concurrency, config.queue_max))
    dispatcher.handed = []
    return store, Scheduler(store, dispatcher), executor, dispatcher


def lateness_ms(store_due: dict[str, list[datetime]], calls: list[tuple[str, float]]) -> list:
    out = []
    for name, called in calls:
        dues = [d.timestamp() for d in store_due.get(name, []) if d.timestamp() <= called + 0.5]
        if dues:
            out.append((called - max(dues)) * 1000)
    return out


async def measure_lateness(extra: int, workflows: int, seconds: float) -> list[float]:
    """Lateness of every firing of `workflows` every-1s timers over `seconds`."""
    with tempfile.TemporaryDirectory() as tmp:
        store, scheduler, executor, _ = await setup(Path(tmp), extra)
        await scheduler.start()
        for i in range(workflows):
            await store.import_([item(f"tick-{i}", {"every_s": 1})])
            await scheduler.refresh(f"tick-{i}")
            await asyncio.sleep(1 / workflows)  # spread the timers over the second
        starts = {f"tick-{i}": [] for i in range(workflows)}
        real_set = scheduler.timers.set

        def noting(key: str, due: datetime) -> None:
            if key in starts:
                starts[key].append(due)
            real_set(key, due)

        scheduler.timers.set = noting  # record every due time the scheduler arms
        for i in range(workflows):
            noting(f"tick-{i}", scheduler.timers.due_of(f"tick-{i}"))
        executor.calls.clear()
        await asyncio.sleep(seconds)
        await scheduler.close()
        await store.close()
        return lateness_ms(starts, executor.calls)


async def measure_burst(total: int, due_now: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        store, scheduler, executor, dispatcher = await setup(Path(tmp), 0)
        await store.import_([item(f"w-{i:05d}", {"every_s": 86400}) for i in range(total)])
        due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
        await store.set_next_dues({
            f"w-{i:05d}": utc_iso(due if i < due_now else due + timedelta(hours=6))
            for i in range(total)})
        await scheduler.start()
        assert time.time() < due.timestamp(), "set-up took longer than the lead time"
        deadline = time.time() + 30
        while len(executor.calls) < due_now and time.time() < deadline:
            await asyncio.sleep(0.05)
        await scheduler.close()
        await store.close()
        at = due.timestamp()
        return {"handed_last_ms": (max(dispatcher.handed) - at) * 1000,
                "executor_last_ms": (max(t for _, t in executor.calls) - at) * 1000,
                "fired": len(executor.calls)}


async def measure_idle_cpu(total: int, seconds: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store, scheduler, _, _ = await setup(Path(tmp), total)
        await scheduler.start()
        await asyncio.sleep(0.5)
        before = time.process_time()
        await asyncio.sleep(seconds)
        used = time.process_time() - before
        await scheduler.close()
        await store.close()
        return used * 1000


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def main() -> None:
    print("wfd pull scheduler benchmark (real Scheduler/Dispatcher/Store, instant executor)")
    for extra, workflows, seconds, label in [(0, 1, 12, "1 registered"),
                                             (10_000, 20, 6, "10,000 registered")]:
        late = await measure_lateness(extra, workflows, seconds)
        print(f"  timer lateness, {label:>18}: p50 {statistics.median(late):6.2f} ms"
              f"  p99 {percentile(late, 0.99):6.2f} ms  max {max(late):6.2f} ms"
              f"  ({len(late)} firings)")
    burst = await measure_burst(10_000, 1_000)
    print(f"  1,000 due at once of 10,000: all handed to the dispatcher "
          f"{burst['handed_last_ms']:.0f} ms after due, all at the executor "
          f"{burst['executor_last_ms']:.0f} ms after due ({burst['fired']} fired)")
    idle = await measure_idle_cpu(10_000, 5.0)
    print(f"  idle CPU with 10,000 timers armed: {idle:.1f} ms over 5 s")


if __name__ == "__main__":
    uvloop.run(main())
