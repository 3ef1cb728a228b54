"""Admission (wfd/admission.py): the queue bound, per-workflow and global slots."""

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from wfd.admission import Admission, Overloaded, Reservation


def gates(concurrency: int, queue_max: int) -> Admission:
    """The admission under test: `concurrency` slots in all, `queue_max` places to wait."""
    return Admission(concurrency=concurrency, queue_max=queue_max)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 5))


async def entered(reservation: Reservation, started: list[str], name: str,
                  release: asyncio.Event) -> None:
    async with reservation:
        started.append(name)
        await release.wait()


async def settle() -> None:
    """Let every task that can make progress do so (no timers involved)."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_the_queue_refuses_beyond_its_bound_before_anything_waits() -> None:
    admission = gates(1, 2)
    first, second = admission.reserve("a", 5), admission.reserve("a", 5)
    with pytest.raises(Overloaded, match="2 executions are already waiting"):
        admission.reserve("a", 5)
    assert admission.waiting == 2
    # A full queue still takes a workflow below its share (2 places among 2 workflows).
    other = admission.reserve("b", 5)
    with pytest.raises(Overloaded):
        admission.reserve("b", 5)
    assert admission.waiting == 3
    # A timer run is never refused: there is at most one per workflow.
    admission.reserve("pull", 1, bounded=False)
    assert admission.waiting == 4
    first.cancel()
    first.cancel()  # twice leaves the queue once
    second.cancel()
    other.cancel()
    assert admission.waiting == 1
    admission.reserve("a", 5)


def test_a_workflows_limit_holds_its_next_execution_in_the_queue() -> None:
    async def main() -> None:
        admission = gates(4, 10)
        started: list[str] = []
        release = asyncio.Event()
        tasks = [asyncio.create_task(entered(admission.reserve("a", 2), started, f"a{i}",
                                             release)) for i in range(3)]
        await settle()
        assert started == ["a0", "a1"]
        assert (admission.running, admission.waiting) == (2, 1)
        release.set()
        await asyncio.gather(*tasks)
        assert started == ["a0", "a1", "a2"]
        assert (admission.running, admission.waiting) == (0, 0)

    run(main())


def test_one_workflows_backlog_holds_no_global_slot() -> None:
    async def main() -> None:
        admission = gates(2, 10)
        started: list[str] = []
        release = asyncio.Event()
        busy = [asyncio.create_task(entered(admission.reserve("busy", 1), started, f"busy{i}",
                                            release)) for i in range(5)]
        await settle()
        other = asyncio.create_task(entered(admission.reserve("other", 1), started, "other",
                                            release))
        await settle()
        assert started == ["busy0", "other"]  # busy1..4 wait for busy's slot, not a global one
        release.set()
        await asyncio.gather(*busy, other)

    run(main())


def test_the_global_limit_bounds_all_workflows_together() -> None:
    async def main() -> None:
        admission = gates(2, 10)
        started: list[str] = []
        release = asyncio.Event()
        tasks = [asyncio.create_task(entered(admission.reserve(name, 5), started, name,
                                             release)) for name in ("a", "b", "c")]
        await settle()
        assert started == ["a", "b"] and admission.running == 2
        release.set()
        await asyncio.gather(*tasks)
        assert started == ["a", "b", "c"]

    run(main())


def test_a_changed_limit_applies_to_new_executions() -> None:
    async def main() -> None:
        admission = gates(10, 10)
        started: list[str] = []
        release = asyncio.Event()
        old = asyncio.create_task(entered(admission.reserve("a", 1), started, "old", release))
        await settle()
        raised = [asyncio.create_task(entered(admission.reserve("a", 3), started, f"new{i}",
                                              release)) for i in range(2)]
        await settle()
        assert started == ["old", "new0", "new1"]
        release.set()
        await asyncio.gather(old, *raised)

    run(main())


def test_an_execution_cancelled_while_waiting_gives_back_its_place() -> None:
    async def main() -> None:
        admission = gates(1, 10)
        started: list[str] = []
        release = asyncio.Event()
        holder = asyncio.create_task(entered(admission.reserve("a", 5), started, "holder",
                                             release))
        await settle()
        waiter = asyncio.create_task(entered(admission.reserve("b", 5), started, "waiter",
                                             release))
        await settle()
        assert admission.waiting == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert (admission.waiting, admission.running) == (0, 1)
        release.set()
        await holder
        # Both gates were given back: the next one enters at once.
        async with admission.reserve("b", 1):
            assert admission.running == 1

    run(main())


def test_a_forgotten_workflow_starts_with_a_new_gate() -> None:
    async def main() -> None:
        admission = gates(5, 10)
        started: list[str] = []
        release = asyncio.Event()
        old = asyncio.create_task(entered(admission.reserve("a", 1), started, "old", release))
        await settle()
        admission.forget("a")  # deleted, then deployed again under the same name
        again = asyncio.create_task(entered(admission.reserve("a", 1), started, "again",
                                            release))
        await settle()
        assert started == ["old", "again"]
        release.set()
        await asyncio.gather(old, again)

    run(main())
