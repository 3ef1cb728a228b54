"""The scheduler's timer core: due times for many keys, and one task that fires them.

It knows nothing of workflows, the store or the executor. The scheduler puts
each enabled pull workflow's next due time in a `TimerQueue` under the
workflow's name, runs `TimerQueue.run(fire)` as one task, and in `fire`
hands the run to the executor and sets the workflow's next due time.

Timers are one-shot: a key leaves the queue when it fires, and stays out
until the caller sets it again. Due times are wall-clock UTC datetimes,
because that is what schedules and the store speak; the task sleeps on the
event loop's monotonic clock and reads the wall clock again on waking, so a
clock stepped backwards never fires a timer early. A clock stepped forwards
is noticed within `MAX_SLEEP_S`: the task never sleeps longer than that.

Not thread-safe: call every method from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime

from wfd import logs

# The longest single sleep. It bounds how late a timer fires after the wall
# clock is stepped forwards (the monotonic sleep does not see the step), at
# the cost of one wake-up per MAX_SLEEP_S when nothing is due.
MAX_SLEEP_S = 10.0

Fire = Callable[[str, datetime], object]
# (due as POSIX seconds, insertion order, key, due): ordered by due time, ties
# in insertion order, so keys and datetimes are never compared.
_Entry = tuple[float, int, str, datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"due times must be timezone-aware, got naive {value!r}")
    return value.astimezone(UTC)


class TimerQueue:
    """Due times by key, in a heap with lazy removal, and the task that fires them.

    `set` and `remove` are O(log n) and O(1): a replaced or removed entry
    stays in the heap, is recognised as stale because the key now maps to a
    different entry, and is dropped when it reaches the top. The heap is
    rebuilt when stale entries outnumber live ones, so churn cannot grow it
    without bound.

    `now` is the wall clock, replaceable so tests can move it;
    `max_sleep_s` bounds each sleep (see `MAX_SLEEP_S`).
    """

    def __init__(
        self, now: Callable[[], datetime] = _utc_now, max_sleep_s: float = MAX_SLEEP_S
    ) -> None:
        self._now = now
        self._max_sleep_s = max_sleep_s
        self._live: dict[str, _Entry] = {}
        self._heap: list[_Entry] = []
        self._order = itertools.count()
        self._waiter: asyncio.Future[None] | None = None
        self._running = False
        self._closed = False

    def __len__(self) -> int:
        return len(self._live)

    def due_of(self, key: str) -> datetime | None:
        """The pending due time of `key` (UTC), or None if it has none."""
        entry = self._live.get(key)
        return None if entry is None else entry[3]

    def set(self, key: str, due: datetime) -> None:
        """Make `key` fire at `due`, replacing any due time it had.

        A due time in the past fires at once. Waking the sleeping task only
        when the new entry heads the heap is enough: any other entry is due
        no earlier than what the task already sleeps towards.
        """
        due = _as_utc(due)
        entry = (due.timestamp(), next(self._order), key, due)
        self._live[key] = entry
        heapq.heappush(self._heap, entry)
        if self._heap[0] is entry:
            self._wake()
        self._compact_if_sparse()

    def remove(self, key: str) -> None:
        """Cancel `key`'s pending firing, if any."""
        if self._live.pop(key, None) is not None:
            self._compact_if_sparse()

    def pop_due(self, now: datetime) -> list[tuple[str, datetime]]:
        """Take every entry due at or before `now` out of the queue, earliest first."""
        limit = _as_utc(now).timestamp()
        due: list[tuple[str, datetime]] = []
        while self._heap and self._heap[0][0] <= limit:
            entry = heapq.heappop(self._heap)
            if self._live.get(entry[2]) is entry:
                del self._live[entry[2]]
                due.append((entry[2], entry[3]))
        return due

    async def run(self, fire: Fire) -> None:
        """Call `fire(key, due)` for each timer as it falls due, until `close()`.

        `fire` runs on the loop and must return quickly (start a task for
        real work). It may call `set` and `remove`. An exception from it
        is logged with the key and due time and does not stop other timers.
        """
        if self._running:
            raise RuntimeError("TimerQueue.run is already running")
        self._running = True
        try:
            while not self._closed:
                for key, due in self.pop_due(self._now()):
                    self._fire_one(fire, key, due)
                await self._sleep(self._seconds_to_next())
        finally:
            self._running = False

    def close(self) -> None:
        """Stop `run` at its next wake-up, which this triggers at once."""
        self._closed = True
        self._wake()

    def _fire_one(self, fire: Fire, key: str, due: datetime) -> None:
        try:
            fire(key, due)
        except Exception:
            logs.event("timer-callback-failed", level=logging.ERROR, exc_info=True, key=key,
                       due=due.isoformat())

    def _seconds_to_next(self) -> float:
        """How long to sleep: to the earliest live due time, rounded up to 1 ms.

        Rounding up keeps a millisecond-resolution loop timer (uvloop's) from
        waking a hair early and spinning until the wall clock catches up.
        """
        while self._heap and self._live.get(self._heap[0][2]) is not self._heap[0]:
            heapq.heappop(self._heap)
        if not self._heap:
            return self._max_sleep_s
        seconds = self._heap[0][0] - self._now().timestamp()
        return min(self._max_sleep_s, max(0.0, math.ceil(seconds * 1000) / 1000))

    async def _sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        handle = loop.call_later(seconds, self._wake)
        try:
            await waiter
        finally:
            handle.cancel()
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _compact_if_sparse(self) -> None:
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)
