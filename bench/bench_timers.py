"""How late, how fast and how idle the timer queue is, on asyncio and on uvloop.

    /work/venv/bin/python bench/bench_timers.py

Measures, for each loop:
  - lateness (fire time minus due time) over 200 chained firings, with 1 and
    with 10,000 timers registered;
  - hand-off: how long after their shared due time 1,000 timers due at once,
    among 10,000, have all been passed to ``fire``;
  - CPU used by the loop over 3 s with 10,000 timers, none due.
The spec asks for a tick within 100 ms of its due time; the goal is a few ms.
"""

import asyncio
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import uvloop

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wfd.timers import TimerQueue

FIRINGS = 200
REGISTERED = 10_000
BURST = 1_000
IDLE_S = 3.0
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def now() -> datetime:
    return datetime.now(UTC)


def fill_idle(queue: TimerQueue, count: int) -> None:
    """Register ``count`` timers due an hour or more from now, so none fires."""
    start = now() + timedelta(hours=1)
    for i in range(count):
        queue.set(f"idle-{i}", start + timedelta(seconds=i))


async def lateness_ms(registered: int) -> list[float]:
    """Chain FIRINGS firings 3-7 ms apart, each set from the previous one's callback."""
    queue = TimerQueue()
    fill_idle(queue, registered - 1)
    late: list[float] = []
    done = asyncio.Event()

    def fire(key: str, due: datetime) -> None:
        late.append((now() - due) / timedelta(milliseconds=1))
        if len(late) == FIRINGS:
            done.set()
        else:
            queue.set("chain", now() + timedelta(microseconds=random.randint(3000, 7000)))

    queue.set("chain", now() + timedelta(milliseconds=5))
    task = asyncio.create_task(queue.run(fire))
    await asyncio.wait_for(done.wait(), 10)
    queue.close()
    await task
    return late


async def burst_handoff_ms() -> tuple[float, float]:
    """Time from the shared due time to the first and to the last of BURST firings."""
    queue = TimerQueue()
    fill_idle(queue, REGISTERED - BURST)
    due = now() + timedelta(milliseconds=200)
    for i in range(BURST):
        queue.set(f"burst-{i}", due)
    fired_at: list[datetime] = []
    done = asyncio.Event()

    def fire(key: str, _due: datetime) -> None:
        fired_at.append(now())
        if len(fired_at) == BURST:
            done.set()

    task = asyncio.create_task(queue.run(fire))
    await asyncio.wait_for(done.wait(), 10)
    queue.close()
    await task
    return tuple((at - due) / timedelta(milliseconds=1) for at in (fired_at[0], fired_at[-1]))


async def idle_cpu_ms() -> float:
    """CPU time the process spends while the queue waits IDLE_S with nothing due."""
    queue = TimerQueue()
    fill_idle(queue, REGISTERED)
    task = asyncio.create_task(queue.run(lambda key, due: None))
    await asyncio.sleep(0)
    before = time.process_time()
    await asyncio.sleep(IDLE_S)
    used = time.process_time() - before
    queue.close()
    await task
    return used * 1000


def percentile(values: list[float], pct: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def bench(loop_name: str) -> list[tuple[str, str]]:
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        rows = []
        for registered in (1, REGISTERED):
            late = runner.run(lateness_ms(registered))
            rows.append(
                (
                    f"lateness, {registered:,} registered ({FIRINGS} firings)",
                    f"p50 {percentile(late, 50):.2f} ms  p99 {percentile(late, 99):.2f} ms  "
                    f"max {max(late):.2f} ms",
                )
            )
        first, last = runner.run(burst_handoff_ms())
        rows.append(
            (
                f"hand-off, {BURST:,} due at once among {REGISTERED:,}",
                f"first {first:.2f} ms  last {last:.2f} ms after due",
            )
        )
        cpu = runner.run(idle_cpu_ms())
        rows.append((f"idle CPU, {REGISTERED:,} timers, {IDLE_S:.0f} s", f"{cpu:.2f} ms"))
    return rows


def main() -> None:
    for loop_name in LOOPS:
        print(f"\n{loop_name}")
        for label, value in bench(loop_name):
            print(f"  {label:<44} {value}")


if __name__ == "__main__":
    main()
