"""Reliable delivery (SPEC 11): the durable queue of async requests, retries, replay.

An async request is committed to the store (request, queue entry, and its
idempotency key, in one transaction) before its 202 is sent; from then on
the store, not memory, is the truth. The worker here takes queued
deliveries when they are due, under the same admission as every other
execution, and after each attempt settles the delivery: `done`, queued
again after a backoff, or `dead`.

Crash safety, in two rules:
- A delivery is marked `running` only once its attempt has an execution
  slot (the dispatcher's `on_start`), and settled only after the attempt's record is
  stored. So at start-up a delivery still `running` was cut off by a crash:
  its attempt is recorded `interrupted` (unless its record made it to the
  store) and it is retried like any failed attempt, never run twice in
  parallel and never forgotten.
- The worker keeps only ids and due times in memory; the request is read
  from the store when the attempt starts.
"""

import asyncio
import contextlib
import heapq
import logging
import random
import time
from collections import deque
from datetime import UTC, datetime

from wfd import ids, logs
from wfd.admission import Overloaded, Reservation
from wfd.dispatch import Dispatcher, Executed
from wfd.domain import FAILURE_HTTP_STATUS, Status, Trigger
from wfd.metrics import Metrics
from wfd.store import DeliveryPolicy, ExecutionRecord, RequestFields, Store, Workflow, utc_iso

# Statuses of an attempt that make an async delivery try again (SPEC 11).
RETRYABLE = frozenset({Status.ERROR, Status.TIMEOUT, Status.MEMORY, Status.CPU,
                       Status.INTERRUPTED})
MAX_BACKOFF_S = 3600.0


def retry_delay(failures: int, base_s: float, rng: random.Random) -> float:
    """Seconds before the next attempt after `failures` failed ones: full jitter.

    Uniform between 0 and `base_s * 2**(failures - 1)`, capped at an hour, so
    that senders' bursts that failed together do not retry together.
    """
    ceiling = min(MAX_BACKOFF_S, base_s * 2 ** min(failures - 1, 64))
    return rng.uniform(0, ceiling)


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class Deliveries:
    """Async deliveries from acceptance to `done` or `dead`, and the stored requests."""

    def __init__(self, store: Store, dispatcher: Dispatcher, metrics: Metrics,
                 rng: random.Random | None = None) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.rng = rng or random.Random()
        self._timers: list[tuple[float, str, str]] = []  # (due, id, workflow), a heap
        self._ready: dict[str, deque[tuple[float, str]]] = {}  # workflow -> due ones
        self._known: set[str] = set()  # ids in _timers or _ready
        self._taken: set[str] = set()  # ids of attempts taken, not yet settled
        self._running: dict[str, int] = {}  # workflow -> attempts taken, not yet settled
        self._unstarted: dict[str, float] = {}  # id -> due, of taken attempts not in a slot
        self._limits: dict[str, int] = {}  # workflow -> its concurrency, once seen
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    # -- taking requests -------------------------------------------------------

    async def accept(self, workflow: Workflow, request: RequestFields, delivery_id: str,
                     idempotency_key: str | None = None,
                     response: tuple[int, dict[str, str], bytes] | None = None) -> None:
        """Commit an async request to the queue; returns once it survives a crash."""
        accepted_at = await self.store.accept_delivery(delivery_id, workflow.name, request,
                                                       idempotency_key, response)
        self.metrics.delivery(workflow.name, "accepted")
        self._queue(delivery_id, workflow.name, _epoch(accepted_at))

    async def run(self, workflow: Workflow, policy: DeliveryPolicy, trigger: Trigger,
                  request: RequestFields, reservation: Reservation | None = None,
                  execution_id: str | None = None) -> Executed:
        """Run a request now (sync catch, `wfd ctl run`); kept for replay unless told not to.

        The request is stored in its record's transaction: never one without the other.
        """
        execution_id = execution_id or ids.execution_id()
        lineage = {"request_id": execution_id} if policy.store_requests else {}
        return await self.dispatcher.execute(workflow, trigger, request, reservation,
                                             execution_id, lineage,
                                             keep_request=policy.store_requests)

    # -- the worker ------------------------------------------------------------

    async def start(self) -> None:
        """Settle what a crash cut off, load the queue, and start taking deliveries."""
        await self._recover()
        await self.resume(None)
        self._loop = asyncio.create_task(self._take_loop())

    def stop_taking(self) -> None:
        """Shutdown, first step: start no new attempt; queued ones wait for the restart."""
        if self._loop is not None:
            self._loop.cancel()

    async def close(self) -> None:
        """Shutdown, after the dispatcher's drain: let the attempts settle."""
        if self._loop is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def resume(self, name: str | None) -> None:
        """Take the queued deliveries of `name` (all with None) that the worker does not hold.

        Called at start-up, and when a workflow is enabled: deliveries of a
        disabled one wait in the store, not in memory.
        """
        for delivery_id, workflow, due_at in await self.store.queued_deliveries(name):
            # One being settled is queued again by its own attempt.
            if delivery_id not in self._known and delivery_id not in self._taken:
                self._queue(delivery_id, workflow, _epoch(due_at))

    def depth(self) -> tuple[int, float]:
        """(deliveries due and waiting for a slot, seconds the longest-waiting one has waited)."""
        now = time.time()
        dues = [due for queue in self._ready.values() for due, _ in queue]
        dues += [due for due, _, _ in self._timers if due <= now]
        dues += self._unstarted.values()
        return len(dues), (now - min(dues)) if dues else 0.0

    def _queue(self, delivery_id: str, name: str, due: float) -> None:
        self._known.add(delivery_id)
        heapq.heappush(self._timers, (due, delivery_id, name))
        self._wake.set()

    async def _take_loop(self) -> None:
        while True:
            self._wake.clear()
            now = time.time()
            while self._timers and self._timers[0][0] <= now:
                due, delivery_id, name = heapq.heappop(self._timers)
                self._ready.setdefault(name, deque()).append((due, delivery_id))
            self._start_ready()
            timeout = self._timers[0][0] - now if self._timers else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _start_ready(self) -> None:
        """Start due deliveries, one per workflow in turn, within the slots there are.

        At most `global_concurrency` attempts are taken at once, and per
        workflow at most its `concurrency`: a backlog waits here, in the
        store, not in admission's queue, where it would hold up other work
        (and, for a workflow being disabled, would still run).
        """
        capacity = self.dispatcher.admission.concurrency
        started = True
        while started and sum(self._running.values()) < capacity:
            started = False
            for name in list(self._ready):
                if sum(self._running.values()) >= capacity:
                    break
                if self._running.get(name, 0) >= min(self._limits.get(name, capacity),
                                                     capacity):
                    continue
                queue = self._ready[name]
                due, delivery_id = queue.popleft()
                if not queue:
                    del self._ready[name]
                self._known.discard(delivery_id)
                self._taken.add(delivery_id)
                self._unstarted[delivery_id] = due
                self._running[name] = self._running.get(name, 0) + 1
                task = asyncio.create_task(self._attempt(name, delivery_id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                started = True

    async def _attempt(self, name: str, delivery_id: str) -> None:
        try:
            await self._run_attempt(name, delivery_id)
        except Overloaded:
            self._queue(delivery_id, name, time.time() + 1)  # stopping: stays queued
        except Exception:
            logs.event("delivery-attempt-failed", level=logging.ERROR, exc_info=True,
                       workflow=name, id=delivery_id, retry_in_s=10)
            self._queue(delivery_id, name, time.time() + 10)
        finally:
            self._taken.discard(delivery_id)
            self._unstarted.pop(delivery_id, None)
            self._running[name] -= 1
            if not self._running[name]:
                del self._running[name]
            self._wake.set()

    async def _run_attempt(self, name: str, delivery_id: str) -> None:
        found = await self.store.queued_delivery(delivery_id)
        if found is None:
            return  # deleted with its workflow
        workflow, policy, delivery = found
        if not workflow.enabled:
            return  # waits in the store until `enable` (resume)
        self._limits[name] = self.dispatcher.limits(workflow).concurrency
        attempt_id = delivery_id if delivery.attempt == 1 else ids.execution_id()

        async def start() -> None:
            self._unstarted.pop(delivery_id, None)
            await self.store.start_delivery(delivery_id, attempt_id)

        executed = await self.dispatcher.execute(
            workflow, Trigger.CATCH, delivery.request,
            self.dispatcher.reserve(workflow, bounded=False), attempt_id,
            {"attempt": delivery.attempt, "first_attempt_id": delivery_id,
             "request_id": delivery_id}, on_start=start)
        await self._settle(name, delivery_id, delivery.attempt, attempt_id,
                           executed.record.status, policy)

    async def _settle(self, name: str, delivery_id: str, attempt: int, attempt_id: str,
                      status: Status, policy: DeliveryPolicy) -> None:
        """After an attempt: done, queued again after a backoff, or dead."""
        retry = status in RETRYABLE and attempt <= policy.retries
        retry_at = time.time() + retry_delay(attempt, policy.retry_backoff_s, self.rng)
        state = await self.store.settle_delivery(
            delivery_id, status, utc_iso(datetime.fromtimestamp(retry_at, UTC)) if retry
            else None, policy.store_requests)
        if state is None:
            return
        if state == "queued":
            self.metrics.delivery(name, "retried")
            logs.event("delivery-retry", workflow=name, id=delivery_id, attempt=attempt,
                       status=status, retry_in_s=round(retry_at - time.time(), 3))
            self._queue(delivery_id, name, retry_at)
        elif state == "dead":
            self.metrics.delivery(name, "dead")
            logs.event("delivery-dead", level=logging.WARNING, workflow=name, id=delivery_id,
                       attempts=attempt, last_id=attempt_id, status=status)
        else:
            self.metrics.delivery(name, "done")

    async def _recover(self) -> None:
        """Deliveries running when the daemon died: record them interrupted, then retry."""
        for delivery_id, name, attempt, attempt_id, recorded in \
                await self.store.running_deliveries():
            workflow = await self.store.workflow(name)
            if workflow is None:
                continue
            status = Status(recorded) if recorded else Status.INTERRUPTED
            if recorded is None:
                await self.store.record(ExecutionRecord(
                    id=attempt_id, workflow=name, version=workflow.version,
                    trigger=Trigger.CATCH, status=status, started_at=utc_iso(), duration_ms=0.0,
                    http_status=FAILURE_HTTP_STATUS[status],
                    error="the daemon stopped abruptly (crash or kill) during this attempt; "
                          "nothing it changed was kept; recorded at the restart",
                    attempt=attempt, first_attempt_id=delivery_id, request_id=delivery_id))
                logs.event("delivery-interrupted", workflow=name, id=delivery_id,
                           attempt=attempt)
            await self._settle(name, delivery_id, attempt, attempt_id, status,
                               await self.store.delivery_policy(name))
