"""Who may run now: per-workflow and global concurrency, and a bounded queue.

A request is admitted in two steps. `reserve` is instant and refuses with
`Overloaded` when the queue is full, before the request body is even read,
so a flood costs no memory. Entering the reservation then waits for a slot
of the workflow and a global one, in that order, so one busy workflow's
backlog never holds global slots that other workflows could use.
"""

import asyncio
from types import TracebackType


class Overloaded(Exception):
    """The wait queue is full; the caller should retry later (HTTP 503)."""


class Admission:
    """Concurrency gates shared by catch requests, timers and manual runs."""

    def __init__(self, concurrency: int, queue_max: int) -> None:
        self.concurrency = concurrency
        self.queue_max = queue_max
        self.waiting = 0
        self.running = 0
        self._global = asyncio.Semaphore(concurrency)
        self._per_workflow: dict[str, tuple[int, asyncio.Semaphore]] = {}

    def reserve(self, name: str, limit: int, bounded: bool = True) -> "Reservation":
        """A place in the queue for one execution of `name`, or Overloaded.

        Timer runs pass `bounded=False`: there is at most one per workflow, so
        they cannot flood the queue, and refusing them would lose a tick.
        """
        if bounded and self.waiting >= self.queue_max:
            raise Overloaded(f"{self.waiting} executions are already waiting")
        known = self._per_workflow.get(name)
        if known is None or known[0] != limit:
            # A changed limit takes effect for new executions; running ones
            # release into the semaphore they took.
            known = (limit, asyncio.Semaphore(limit))
            self._per_workflow[name] = known
        self.waiting += 1
        return Reservation(self, known[1])

    def forget(self, name: str) -> None:
        """Drop the gate of a deleted workflow."""
        self._per_workflow.pop(name, None)


class Reservation:
    """An admitted execution: queued until entered, running while inside."""

    def __init__(self, admission: Admission, workflow_gate: asyncio.Semaphore) -> None:
        self._admission = admission
        self._gate = workflow_gate
        self._queued = True

    def cancel(self) -> None:
        """Leave the queue without running (the request turned out bad)."""
        if self._queued:
            self._queued = False
            self._admission.waiting -= 1

    async def __aenter__(self) -> "Reservation":
        admission = self._admission
        try:
            await self._gate.acquire()
            try:
                await admission._global.acquire()
            except BaseException:
                self._gate.release()
                raise
        finally:
            self.cancel()
        admission.running += 1
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        admission = self._admission
        admission.running -= 1
        admission._global.release()
        self._gate.release()
