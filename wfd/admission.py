"""Who may run now: a budget of body bytes, then fair execution slots (SPEC 8).

A catch request is admitted in steps, each refusing with `Overloaded` (503)
before the next costs anything:
1. `hold_body` counts the request's declared body size against
   `max_pending_bytes` before a byte is read, so a flood of large bodies is
   bounded in memory, not merely in number. No execution slot is held while
   the body arrives, so slow senders cannot starve other workflows.
2. `reserve` takes a place in the bounded wait queue (`queue_max`); a full
   queue still takes a workflow below its share of it (`_under_share`).
3. Entering the reservation waits for a slot. Waiting executions sit in one
   FIFO queue per workflow; each free slot goes to the waiting workflow
   (under its own concurrency limit) with the fewest executions running,
   ties taken round-robin. A workflow with a thousand waiters therefore
   holds no more slots than one with a few, and a newcomer gets the very
   next free slot: a flood delays it by at most one execution per slot.
   The body's bytes are released when the slot is granted.

Timer runs and async deliveries go through the same queues (`reserve` by
workflow name), so every trigger shares slots the same way.
"""

import asyncio
from collections import deque
from types import TracebackType

# `max_pending_mb`'s default (wfd/config.py), for callers without a config.
DEFAULT_PENDING_BYTES = 256 * 1024 * 1024


class Overloaded(Exception):
    """A budget is spent (queue, body bytes) or the daemon is stopping: retry later (503)."""


class BodyHold:
    """The bytes of one request body, counted against the pending budget until released."""

    def __init__(self, admission: "Admission", size: int) -> None:
        self._admission = admission
        self.size = size

    def resize(self, size: int) -> None:
        """Count `size` bytes instead: what stays queued once the body is parsed.

        Never refused: the body is already in memory, and refusing it now
        would free nothing.
        """
        self._admission.pending_bytes += size - self.size
        self.size = size

    def release(self) -> None:
        """Stop counting these bytes (the execution started, or the request ended)."""
        self.resize(0)


class _Workflow:
    """One workflow's share of the slots: its limit, what runs, who waits (FIFO)."""

    __slots__ = ("limit", "queued", "running", "waiters")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.queued = 0  # reserved, not yet running
        self.running = 0
        self.waiters: deque[asyncio.Future[None]] = deque()


class Admission:
    """Concurrency gates shared by catch requests, timers, manual runs and deliveries."""

    def __init__(self, concurrency: int, queue_max: int,
                 max_pending_bytes: int = DEFAULT_PENDING_BYTES) -> None:
        self.concurrency = concurrency
        self.queue_max = queue_max
        self.max_pending_bytes = max_pending_bytes
        self.pending_bytes = 0
        self.waiting = 0
        self.running = 0
        self._workflows: dict[str, _Workflow] = {}
        # Workflows with waiters, in the order they get the next free slot.
        self._ring: deque[_Workflow] = deque()

    def hold_body(self, size: int) -> BodyHold:
        """Count a body of `size` bytes about to be read, or Overloaded past the budget."""
        if self.pending_bytes + size > self.max_pending_bytes:
            raise Overloaded(f"{self.pending_bytes} bytes of request bodies are already "
                             "pending")
        self.pending_bytes += size
        return BodyHold(self, size)

    def reserve(self, name: str, limit: int, bounded: bool = True,
                body: BodyHold | None = None) -> "Reservation":
        """A place in the queue for one execution of `name`, or Overloaded.

        Timer runs pass `bounded=False`: there is at most one per workflow, so
        they cannot flood the queue, and refusing them would lose a tick.
        `body`, if given, is released when the execution gets its slot (or
        leaves the queue). A changed `limit` applies from now on.
        """
        workflow = self._workflows.get(name)
        if workflow is None:
            workflow = self._workflows[name] = _Workflow(limit)
        if bounded and self.waiting >= self.queue_max and not self._under_share(workflow):
            raise Overloaded(f"{self.waiting} executions are already waiting")
        workflow.limit = limit
        workflow.queued += 1
        self.waiting += 1
        return Reservation(self, workflow, body)

    def _under_share(self, workflow: _Workflow) -> bool:
        """Whether `workflow` holds less than its share of a full queue.

        A full queue still takes a workflow with fewer waiting than
        queue_max divided among the workflows waiting (itself included), so
        one workflow's flood cannot fill the queue and shut the others out.
        The queue then grows to at most twice queue_max.
        """
        sharing = sum(1 for other in self._workflows.values() if other.queued)
        if not workflow.queued:
            sharing += 1
        return workflow.queued < self.queue_max / sharing

    def forget(self, name: str) -> None:
        """Drop the gate of a deleted workflow (its running executions keep theirs)."""
        self._workflows.pop(name, None)

    async def _acquire(self, workflow: _Workflow) -> None:
        """Wait in `workflow`'s queue until `_grant` hands it a slot."""
        granted = asyncio.get_running_loop().create_future()
        workflow.waiters.append(granted)
        if workflow not in self._ring:
            self._ring.append(workflow)
        self._grant()
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release(workflow)  # granted just as the waiter was cancelled
            elif granted in workflow.waiters:  # `_grant` may have dropped it already
                workflow.waiters.remove(granted)
            raise

    def _release(self, workflow: _Workflow) -> None:
        workflow.running -= 1
        self.running -= 1
        self._grant()

    def _grant(self) -> None:
        """Hand each free slot to the waiting workflow with the fewest executions running.

        Ties go in turn order: the chosen workflow moves to the end of the
        ring. Counting running executions, not only turns, keeps a workflow
        of quick executions from waiting behind a flood of slow ones for
        every slot: each gets its share of the slots, not of the grants.
        """
        while self.running < self.concurrency:
            chosen = None
            for workflow in self._ring:
                waiters = workflow.waiters
                while waiters and waiters[0].done():  # cancelled while waiting
                    waiters.popleft()
                if (waiters and workflow.running < workflow.limit
                        and (chosen is None or workflow.running < chosen.running)):
                    chosen = workflow
            self._ring = deque(workflow for workflow in self._ring if workflow.waiters)
            if chosen is None:
                return  # nobody waits, or every waiter's workflow is at its limit
            self._ring.remove(chosen)
            chosen.waiters.popleft().set_result(None)
            chosen.running += 1
            self.running += 1
            if chosen.waiters:
                self._ring.append(chosen)


class Reservation:
    """An admitted execution: queued until entered, running while inside."""

    def __init__(self, admission: Admission, workflow: _Workflow,
                 body: BodyHold | None) -> None:
        self._admission = admission
        self._workflow = workflow
        self._body = body
        self._queued = True

    def cancel(self) -> None:
        """Leave the queue without running (the request turned out bad)."""
        if self._queued:
            self._queued = False
            self._admission.waiting -= 1
            self._workflow.queued -= 1
            if self._body is not None:
                self._body.release()

    async def __aenter__(self) -> "Reservation":
        try:
            await self._admission._acquire(self._workflow)
        finally:
            self.cancel()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._admission._release(self._workflow)
