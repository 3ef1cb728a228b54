"""TimerQueue on a real event loop, with both loops the daemon may run on.

Waits are for conditions (a timer fired), each with a deadline, and every
wait's result is asserted. Lateness is measured against the wall clock,
which is what due times are expressed in.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import uvloop

from wfd.timers import TimerQueue

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
RunLoop = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=sorted(LOOPS))
def run_loop(request: pytest.FixtureRequest) -> RunLoop:
    def run(coro: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            runner.run(coro)

    return run


def now() -> datetime:
    return datetime.now(UTC)


def ms(n: float) -> timedelta:
    return timedelta(milliseconds=n)


class Recorder:
    """A ``fire`` callback that remembers each firing and when it happened."""

    def __init__(self) -> None:
        self.fired: list[tuple[str, datetime, datetime]] = []
        self._changed = asyncio.Event()

    def __call__(self, key: str, due: datetime) -> None:
        self.fired.append((key, due, now()))
        self._changed.set()

    def names(self) -> list[str]:
        return [key for key, _, _ in self.fired]

    async def until(self, condition: Callable[[], bool], timeout_s: float = 2.0) -> bool:
        """Wait until ``condition()`` holds after some firing; False on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not condition():
            self._changed.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, remaining))
            except TimeoutError:
                return condition()
        return True


async def running(
    queue: TimerQueue, fire: Callable[[str, datetime], object], body: Callable[[], Awaitable[None]]
) -> None:
    """Run ``queue`` while ``body`` runs, then check that ``close`` stops it."""
    task = asyncio.create_task(queue.run(fire))
    try:
        await body()
    finally:
        queue.close()
        await asyncio.wait_for(task, 1.0)
    assert task.done()


def test_timer_fires_within_100ms_of_due(run_loop: RunLoop) -> None:
    async def main() -> None:
        queue, rec = TimerQueue(), Recorder()
        due = now() + ms(50)
        queue.set("digest", due)

        async def body() -> None:
            assert await rec.until(lambda: len(rec.fired) == 1)
            key, fired_due, at = rec.fired[0]
            assert (key, fired_due) == ("digest", due)
            assert timedelta(0) <= at - due < ms(100)
            assert len(queue) == 0
            assert queue.due_of("digest") is None

        await running(queue, rec, body)

    run_loop(main())


def test_earlier_timer_set_while_sleeping_fires_first(run_loop: RunLoop) -> None:
    async def main() -> None:
        queue, rec = TimerQueue(), Recorder()
        queue.set("late", now() + timedelta(seconds=5))
        queue.set("warmup", now())

        async def body() -> None:
            # Once warmup has fired, the task is asleep towards "late".
            assert await rec.until(lambda: rec.names() == ["warmup"])
            due = now() + ms(30)
            queue.set("early", due)
            assert await rec.until(lambda: len(rec.fired) == 2, timeout_s=1.0)
            key, _, at = rec.fired[1]
            assert key == "early"
            assert at - due < ms(100)
            assert queue.due_of("late") is not None

        await running(queue, rec, body)

    run_loop(main())


def test_removed_timer_does_not_fire(run_loop: RunLoop) -> None:
    async def main() -> None:
        queue, rec = TimerQueue(), Recorder()
        queue.set("removed", now() + ms(20))
        queue.set("kept", now() + ms(60))
        queue.remove("removed")
        queue.remove("never-set")

        async def body() -> None:
            assert await rec.until(lambda: "kept" in rec.names())
            assert rec.names() == ["kept"]

        await running(queue, rec, body)

    run_loop(main())


def test_setting_again_moves_the_due_time(run_loop: RunLoop) -> None:
    async def main() -> None:
        queue, rec = TimerQueue(), Recorder()
        queue.set("sooner", now() + timedelta(seconds=5))
        sooner = now() + ms(30)
        queue.set("sooner", sooner)
        queue.set("later", now() + ms(20))
        later = now() + ms(120)
        queue.set("later", later)
        queue.set("marker", now() + ms(70))
        assert len(queue) == 3
        assert queue.due_of("later") == later

        async def body() -> None:
            assert await rec.until(lambda: len(rec.fired) == 3)
            assert rec.fired[0][:2] == ("sooner", sooner)
            assert rec.names() == ["sooner", "marker", "later"]
            assert rec.fired[2][1] == later
            assert rec.fired[2][2] >= later

        await running(queue, rec, body)

    run_loop(main())


def test_thousand_due_in_one_second_among_ten_thousand_all_fire(run_loop: RunLoop) -> None:
    async def main() -> None:
        queue, rec = TimerQueue(), Recorder()
        start = now() + ms(200)
        for i in range(9_000):
            queue.set(f"idle-{i}", start + timedelta(hours=1, seconds=i))
        due = {f"due-{i}": start + ms(i) for i in range(1_000)}  # spread over one second
        for key, when in due.items():
            queue.set(key, when)
        assert len(queue) == 10_000

        async def body() -> None:
            assert await rec.until(lambda: len(rec.fired) == 1_000, timeout_s=3.0)
            assert {key: fired_due for key, fired_due, _ in rec.fired} == due
            worst = max(at - fired_due for _, fired_due, at in rec.fired)
            assert worst < ms(100)
            assert len(queue) == 9_000

        await running(queue, rec, body)

    run_loop(main())


def test_clock_steps_never_fire_early_and_are_noticed_within_max_sleep(run_loop: RunLoop) -> None:
    async def main() -> None:
        offset = [timedelta(0)]
        queue = TimerQueue(now=lambda: now() - offset[0], max_sleep_s=0.2)
        rec = Recorder()
        due = now() + ms(50)
        queue.set("job", due)
        queue.set("warmup", now())

        async def body() -> None:
            assert await rec.until(lambda: rec.names() == ["warmup"])
            offset[0] = timedelta(hours=1)  # the wall clock is stepped back an hour
            assert not await rec.until(lambda: "job" in rec.names(), timeout_s=0.3)
            offset[0] = timedelta(0)  # and forward again: the job is now overdue
            stepped = now()
            assert await rec.until(lambda: "job" in rec.names())
            assert rec.fired[1][2] - stepped < ms(200 + 100)

        await running(queue, rec, body)

    run_loop(main())


def test_failing_callback_is_logged_and_others_still_fire(
    run_loop: RunLoop, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        queue, rec = TimerQueue(), Recorder()
        bad_due = now()
        queue.set("bad", bad_due)
        queue.set("good", now() + ms(10))

        def fire(key: str, due: datetime) -> None:
            rec(key, due)
            if key == "bad":
                raise RuntimeError("boom")

        async def body() -> None:
            assert await rec.until(lambda: rec.names() == ["bad", "good"])

        await running(queue, fire, body)
        [failed] = [r for r in caplog.records if r.getMessage() == "timer-callback-failed"]
        assert failed.wfd_fields == {"key": "bad", "due": bad_due.isoformat()}
        assert failed.exc_info and "boom" in caplog.text

    with caplog.at_level(logging.ERROR, logger="wfd"):
        run_loop(main())


def test_run_refuses_a_second_concurrent_run(run_loop: RunLoop) -> None:
    async def main() -> None:
        queue, rec = TimerQueue(), Recorder()

        async def body() -> None:
            await asyncio.sleep(0)  # let the first run start
            with pytest.raises(RuntimeError, match=r"already running"):
                await asyncio.wait_for(queue.run(rec), 1.0)

        await running(queue, rec, body)

    run_loop(main())


def test_pop_due_returns_due_entries_earliest_first_and_skips_stale_ones() -> None:
    queue = TimerQueue()
    t = datetime(2025, 1, 1, tzinfo=UTC)
    queue.set("c", t + timedelta(seconds=3))
    queue.set("a", t + timedelta(seconds=1))
    queue.set("b", t + timedelta(seconds=2))
    queue.set("b", t + timedelta(seconds=9))  # moved later: its 2s entry is stale
    queue.set("d", t + timedelta(seconds=50))
    queue.set("d", t + timedelta(milliseconds=1500))  # moved earlier
    queue.set("gone", t)
    queue.remove("gone")
    assert queue.pop_due(t + timedelta(seconds=2)) == [
        ("a", t + timedelta(seconds=1)),
        ("d", t + timedelta(milliseconds=1500)),
    ]
    assert queue.pop_due(t + timedelta(seconds=2)) == []
    assert queue.pop_due(t + timedelta(seconds=60)) == [
        ("c", t + timedelta(seconds=3)),
        ("b", t + timedelta(seconds=9)),
    ]
    assert len(queue) == 0


def test_due_times_are_stored_in_utc_and_naive_ones_refused() -> None:
    queue = TimerQueue()
    paris = datetime(2025, 6, 1, 12, tzinfo=ZoneInfo("Europe/Paris"))
    queue.set("job", paris)
    assert queue.due_of("job") == paris
    assert queue.due_of("job").tzinfo is UTC
    assert queue.due_of("job").isoformat() == "2025-06-01T10:00:00+00:00"
    with pytest.raises(ValueError, match=r"^due times must be timezone-aware"):
        queue.set("job", datetime(2025, 6, 1, 12))


def test_heap_stays_bounded_under_churn() -> None:
    # White-box: replaced entries stay in the heap until compaction drops them.
    queue = TimerQueue()
    t = datetime(2025, 1, 1, tzinfo=UTC)
    for i in range(10_000):
        queue.set(f"job-{i % 10}", t + timedelta(seconds=i))
    assert len(queue) == 10
    assert len(queue._heap) <= 2 * len(queue) + 65
    assert queue.due_of("job-3") == t + timedelta(seconds=9_993)
