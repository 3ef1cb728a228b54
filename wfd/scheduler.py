"""Pull workflows: fire each enabled one at its schedule, never two runs at once.

The time arithmetic lives in wfd/schedule.py (pure functions) and the timer
heap in wfd/timers.py; this module adds what needs the store and the
dispatcher:

- The next due time is persisted *before* a tick's execution starts, so a
  crash never fires the same tick twice, and a restart finds each workflow's
  due time where it left it. An overdue workflow runs once at start-up, then
  keeps its schedule (`schedule.first_due_after_restart`).
- No overlap: a tick that comes while the workflow's previous run (timer or
  manual) is still going is skipped. Each skipped tick is counted at once in
  the store (`skipped` in `wfd ctl show`); the records are coalesced: one
  `skipped` record per stuck run, written when it ends, however many ticks it
  swallowed.
- Timer runs wait for an execution slot like any other, but never count
  against the catch queue's bound: there is at most one per workflow.
"""

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

from wfd import ids, logs
from wfd.dispatch import Dispatcher, Executed
from wfd.domain import Kind, Status, Trigger
from wfd.metrics import Metrics
from wfd.schedule import Schedule, first_due_after_restart, next_due
from wfd.store import ExecutionRecord, Store, Workflow, WriteFailed, utc_iso
from wfd.timers import TimerQueue

# A batch of ticks the store could not take is retried after this, doubling
# up to RETRY_MAX_S: a lock held past the busy timeout or a full disk delays
# the runs, never drops the timers.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0


class Busy(Exception):
    """The workflow has a run in progress; pull runs never overlap."""


def utc_now() -> datetime:
    return datetime.now(UTC)


class Scheduler:
    """Owns the timers of every enabled pull workflow."""

    def __init__(self, store: Store, dispatcher: Dispatcher, metrics: Metrics | None = None
                 ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.metrics = metrics or Metrics()
        self.timers = TimerQueue()
        # name -> due times skipped while its current run goes on
        self._running: dict[str, list[datetime]] = {}
        # Bumped by every refresh, so a tick that started before an operator's
        # change (disable, reschedule) does not re-arm the old timer.
        self._generation: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending: list[tuple[str, datetime, int]] = []
        self._batches: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    async def start(self) -> None:
        """Arm every enabled pull workflow, applying the missed-fire policy."""
        now = utc_now()
        for workflow in await self.store.workflows():
            if workflow.kind != Kind.PULL or not workflow.enabled:
                continue
            stored = _parse_time(workflow.next_due)
            due = first_due_after_restart(_schedule(workflow), stored, now)
            if due != stored:
                await self.store.set_next_due(workflow.name, utc_iso(due))
            self.timers.set(workflow.name, due)
        self._loop_task = asyncio.create_task(self.timers.run(self._fire))

    async def close(self) -> None:
        """Stop firing; runs already started finish on their own.

        A batch of ticks being written is let finish, so the due times it
        persists match the runs it started; one waiting to retry gives up.
        """
        self.timers.close()
        self._closed.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        await asyncio.gather(*self._batches, return_exceptions=True)

    async def refresh(self, name: str, reset: bool = True) -> None:
        """Re-arm `name` after an operator changed it (deploy, enable, disable, delete).

        With `reset` the schedule starts again from now: a new schedule takes
        effect at once, and a re-enabled workflow does not catch up on the
        ticks it missed while disabled.
        """
        self._generation[name] = self._generation.get(name, 0) + 1
        workflow = await self.store.workflow(name)
        if workflow is None or workflow.kind != Kind.PULL or not workflow.enabled:
            self.timers.remove(name)
            if workflow is not None and workflow.next_due is not None:
                await self.store.set_next_due(name, None)
            return
        due = _parse_time(workflow.next_due)
        if reset or due is None:
            due = next_due(_schedule(workflow), utc_now())
            # Armed first: if the store cannot take the due time now, the
            # timer runs anyway (the tick stores the next one).
            self.timers.set(name, due)
            await self.store.set_next_due(name, utc_iso(due))
        self.timers.set(name, due)

    async def run_now(self, workflow: Workflow, trigger: Trigger = Trigger.MANUAL,
                      lineage: dict[str, Any] | None = None) -> Executed:
        """A manual run (`wfd ctl run`, `replay`): refused while a run is in progress."""
        if workflow.name in self._running:
            raise Busy(f"{workflow.name} has a run in progress; pull runs never overlap")
        return await self._execute(workflow, trigger, lineage)

    def _fire(self, name: str, due: datetime) -> None:
        """Called by the timer loop: queue the tick; never block the loop.

        Ticks that fall due together are handled as one batch (one read and one
        write of the store for all of them), so a thousand workflows due in the
        same second reach the executor within that second.
        """
        self._pending.append((name, due, self._generation.get(name, 0)))
        if len(self._pending) == 1:
            batch = asyncio.create_task(self._tick_batch())
            self._batches.add(batch)
            batch.add_done_callback(self._batches.discard)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tick_batch(self) -> None:
        """Persist the batch's next due times, then start its runs.

        A store error (locked past the busy timeout, a full disk) is logged,
        counted and retried with backoff until it goes through: the ticks'
        timers are re-armed only by a batch that was written, so giving up
        would stop those workflows for good.
        """
        await asyncio.sleep(0)  # let the timer loop queue every tick due now
        batch, self._pending = self._pending, []
        delay = RETRY_FIRST_S
        while True:
            try:
                runs, dues = await self._persist(batch)
                break
            except WriteFailed as exc:
                self.metrics.store_error("tick")
                logs.event("tick-store-error", level=logging.ERROR, ticks=len(batch),
                           error=str(exc), retry_in_s=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), delay)
            if self._closed.is_set():
                return
            delay = min(delay * 2, RETRY_MAX_S)
        await self._start(runs, dues)

    async def _persist(self, batch: list[tuple[str, datetime, int]]
                       ) -> tuple[list[tuple[Workflow, datetime, int]], dict[str, datetime]]:
        """Read the batch's workflows and store their next due times (one read, one write)."""
        found = {w.name: w for w in await self.store.workflows([name for name, _, _ in batch])}
        now, runs, dues = utc_now(), [], {}
        for name, due, generation in batch:
            workflow = found.get(name)
            if (workflow is None or workflow.kind != Kind.PULL or not workflow.enabled
                    or self._generation.get(name, 0) != generation):
                continue
            # Anchored on the due time, not the actual start, so the grid does not
            # drift; after `now`, so a late tick never schedules one in the past.
            dues[name] = next_due(_schedule(workflow), max(due, now), last_started=due)
            runs.append((workflow, due, generation))
            self.metrics.timer_fired((now - due).total_seconds())
        # Persisted before any run starts: a crash cannot fire these ticks twice.
        await self.store.set_next_dues({name: utc_iso(due) for name, due in dues.items()})
        return runs, dues

    async def _start(self, runs: list[tuple[Workflow, datetime, int]],
                     dues: dict[str, datetime]) -> None:
        for workflow, due, generation in runs:
            if self._generation.get(workflow.name, 0) != generation:
                continue  # changed by an operator while the batch was being written
            self.timers.set(workflow.name, dues[workflow.name])
            skipped = self._running.get(workflow.name)
            if skipped is None:
                self._spawn(self._execute(workflow, Trigger.PULL))
            else:
                skipped.append(due)
                self.metrics.tick_skipped(workflow.name)
                # Awaited here, not spawned: close() waits for this batch, so
                # the count is never written after the store is closed.
                await self._stored("skipped", self.store.add_skipped(workflow.name, 1))

    async def _stored(self, operation: str, write: Any) -> None:
        """Await a write whose failure only loses a count or a skipped record: log it."""
        try:
            await write
        except WriteFailed as exc:
            self.metrics.store_error(operation)
            logs.event("store-error", level=logging.ERROR, operation=operation, error=str(exc))

    async def _execute(self, workflow: Workflow, trigger: Trigger,
                       lineage: dict[str, Any] | None = None) -> Executed:
        skipped = self._running[workflow.name] = []
        try:
            reservation = self.dispatcher.reserve(workflow, bounded=False)
            return await self.dispatcher.execute(workflow, trigger, reservation=reservation,
                                                 lineage=lineage)
        finally:
            del self._running[workflow.name]
            if skipped:
                await self._record_skipped(workflow, skipped)

    async def _record_skipped(self, workflow: Workflow, skipped: list[datetime]) -> None:
        """One record for all the ticks a long run swallowed."""
        record = ExecutionRecord(
            id=ids.execution_id(), workflow=workflow.name, version=workflow.version,
            trigger=Trigger.PULL, status=Status.SKIPPED, started_at=utc_iso(skipped[0]),
            duration_ms=0.0,
            error=(f"{len(skipped)} tick(s) skipped between {utc_iso(skipped[0])} and "
                   f"{utc_iso(skipped[-1])}: the previous run was still going"))
        await self._stored("skipped", self.store.record(record))
        logs.event("skipped", workflow=workflow.name, ticks=len(skipped))


def _schedule(workflow: Workflow) -> Schedule:
    return Schedule.from_json(workflow.schedule or {})


def _parse_time(text: Any) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
