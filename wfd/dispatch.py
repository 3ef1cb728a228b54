"""Runs executions for every trigger (catch, pull, manual) the same way.

One path from "this workflow should run" to "its record and settings are
stored": admission, the executor, then the settings merge and the record
in one transaction, then one log line. Catch responses are sent only after
that transaction commits, so an acknowledged change survives a crash.
"""

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from wfd import domain, ids, logs, stages
from wfd.admission import Admission, BodyHold, Overloaded, Reservation
from wfd.config import Config, Limits
from wfd.domain import Kind, Status, Trigger, WorkflowResponse
from wfd.environments import BuildError, Environments
from wfd.executor import Executor, Job, JobError, Outcome
from wfd.files import FilesError, WorkflowFiles
from wfd.isolation.network import Policy
from wfd.metrics import Metrics
from wfd.requirements import top_level_imports
from wfd.store import ExecutionRecord, RequestFields, Store, Workflow, utc_iso


@dataclass(frozen=True)
class Executed:
    """A finished execution: its record and, for catch, the response.

    `recorded` is False when the store could not write the record (a full
    disk, a lock held too long): the caller must not say it succeeded.
    """

    record: ExecutionRecord
    response: WorkflowResponse | None
    recorded: bool = True


class Dispatcher:
    """The single place executions are started and recorded.

    Every execution runs in a task of its own, tracked until its record is
    stored, so that shutdown can wait for them all and interrupt the ones
    still running at the deadline whatever started them (catch, timer, ctl).

    The invariant, held here once for every trigger: an execution that got
    an id ends in a stored record (or, when the store cannot write, in a log
    line and a metric naming its id). Its job is encoded before anything is
    acquired for it, and whatever the executor raises becomes an `error`
    record; the executors release what they acquired on every way out.
    """

    def __init__(self, config: Config, store: Store, executor: Executor,
                 admission: Admission, metrics: Metrics | None = None,
                 files: WorkflowFiles | None = None,
                 environments: Environments | None = None) -> None:
        self.config = config
        self.store = store
        self.executor = executor
        self.admission = admission
        self.metrics = metrics or Metrics()
        self.files = files
        self.environments = environments
        self._preloads: dict[tuple[str, int], tuple[str, ...]] = {}
        # Called with each stored record: metrics, `wfd ctl logs --follow`, retention.
        self.listeners: list[Callable[[ExecutionRecord], None]] = []
        self.draining = False
        self._inflight: set[asyncio.Task[Executed]] = set()
        # The in-flight tasks not yet past the executor: only these may be
        # interrupted; one already recording its outcome is let finish.
        self._interruptible: set[asyncio.Task[Executed]] = set()
        self._interrupting = False
        # Clean-ups of executions answered before their processes were gone.
        self._cleaning: set[asyncio.Future[Any]] = set()

    def limits(self, workflow: Workflow) -> Limits:
        return self.config.limits.merged(workflow.limits)

    def network(self, workflow: Workflow | None = None) -> Policy:
        """Where its executions may connect: the daemon's allowances and the workflow's own."""
        return Policy.of(*self.config.network.allow, *(workflow.allow_net if workflow else ()))

    def hold_body(self, size: int) -> BodyHold:
        """Count a request body about to be read; raises Overloaded past the budget or stopping."""
        if self.draining:
            raise Overloaded("the daemon is stopping")
        return self.admission.hold_body(size)

    def reserve(self, workflow: Workflow, bounded: bool = True,
                body: BodyHold | None = None) -> Reservation:
        """Queue an execution of `workflow`; raises Overloaded when full or stopping."""
        if self.draining:
            raise Overloaded("the daemon is stopping")
        return self.admission.reserve(workflow.name, self.limits(workflow).concurrency, bounded,
                                      body)

    def job(self, workflow: Workflow, execution_id: str,
            request: RequestFields | None = None) -> Job:
        """The encoded job; raises JobError when its settings or request cannot be encoded."""
        return Job(execution_id=execution_id, name=workflow.name, kind=workflow.kind,
                   version=workflow.version, code=workflow.code,
                   limits=self.limits(workflow), settings=workflow.settings,
                   request=request if workflow.kind == Kind.CATCH else None,
                   response_bytes=self.config.max_body_bytes, network=self.network(workflow),
                   json_depth=self.config.max_json_depth, env=workflow.env,
                   preload=self._preload(workflow), trace=stages.active())

    async def execute(self, workflow: Workflow, trigger: Trigger,
                      request: RequestFields | None = None,
                      reservation: Reservation | None = None,
                      execution_id: str | None = None,
                      lineage: dict[str, Any] | None = None,
                      on_start: Callable[[], Awaitable[None]] | None = None,
                      keep_request: bool = False) -> Executed:
        """Run `workflow` once and store what happened.

        `lineage` is copied into the record: an async delivery's `attempt` and
        `first_attempt_id`, a replay's `replay_of`, the stored `request_id`.
        `keep_request`: store `request` under that `request_id`, in the
        record's own transaction.
        `on_start` is awaited once the execution holds its slot, before it
        starts (an async delivery is marked running then, not while it waits).

        A request that cannot be handed to a child raises JobError (with
        `part` "request") before anything starts: the caller's mistake, not
        an execution. Anything else that goes wrong is recorded.
        """
        reservation = reservation or self.reserve(workflow)
        execution_id = execution_id or ids.execution_id()
        task = asyncio.create_task(self._execute(workflow, execution_id, request, trigger,
                                                 reservation, lineage or {}, on_start,
                                                 keep_request))
        self._inflight.add(task)
        self._interruptible.add(task)
        task.add_done_callback(self._inflight.discard)
        task.add_done_callback(self._interruptible.discard)
        return await task

    def _preload(self, workflow: Workflow) -> tuple[str, ...]:
        """What the environment's zygote imports for this version: declared, else found."""
        if workflow.environment is None:
            return ()
        key = (workflow.name, workflow.version)
        if key not in self._preloads:
            declared = (workflow.requirements or {}).get("preload")
            self._preloads[key] = tuple(declared if declared is not None
                                        else top_level_imports(workflow.code))
        return self._preloads[key]

    async def _execute(self, workflow: Workflow, execution_id: str,
                       request: RequestFields | None, trigger: Trigger,
                       reservation: Reservation, lineage: dict[str, Any],
                       on_start: Callable[[], Awaitable[None]] | None,
                       keep_request: bool) -> Executed:
        started_at = datetime.now(UTC)
        try:
            job = self.job(workflow, execution_id, request)  # before anything is acquired
        except JobError as exc:
            reservation.cancel()
            if exc.part == "request":
                raise  # the caller's to refuse: nothing was started
            outcome = Outcome(Status.ERROR, 0.0, error=str(exc))
        else:
            outcome, started_at = await self._run(job, reservation, on_start,
                                                  workflow.environment)
        self._interruptible.discard(asyncio.current_task())
        record_for = functools.partial(_record, execution_id, workflow, trigger, started_at,
                                       outcome, self.limits(workflow), lineage)
        return await self._store(workflow, outcome, record_for,
                                 request if keep_request else None)

    async def _run(self, job: Job, reservation: Reservation,
                   on_start: Callable[[], Awaitable[None]] | None,
                   environment: dict[str, Any] | None) -> tuple[Outcome, datetime]:
        """Wait for a slot and run the job; whatever happens, an Outcome and its start."""
        started_at, started = datetime.now(UTC), time.perf_counter()  # if interrupted queued
        try:
            async with reservation:
                if on_start is not None:
                    await on_start()
                started_at, started = datetime.now(UTC), time.perf_counter()
                stages.stamp("admitted")
                outcome = await self._prepared_run(job, environment)
                stages.stamp("cleaned")
                if outcome.cleanup is not None:
                    reservation.hold_until(outcome.cleanup)
                    self._track(job.execution_id, outcome.cleanup)
                return outcome, started_at
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._interrupting or task is None:
                raise
            task.uncancel()
            return Outcome(Status.INTERRUPTED, (time.perf_counter() - started) * 1000,
                           error=f"the daemon stopped and the {self.config.grace_s:g} s "
                                 "grace period ran out; nothing it changed was kept"), started_at
        except Exception as exc:  # a daemon bug must still end in a record
            logs.logger.exception("execution %s failed in the daemon", job.execution_id)
            return Outcome(Status.ERROR, (time.perf_counter() - started) * 1000,
                           error=f"the daemon could not run it: {exc!r}"), started_at

    def _track(self, execution_id: str, cleanup: "asyncio.Future[Any]") -> None:
        """Follow an answered execution's clean-up: `drain` waits for it, a failure is logged."""
        self._cleaning.add(cleanup)

        def cleaned(future: "asyncio.Future[Any]") -> None:
            self._cleaning.discard(future)
            problem = None if future.cancelled() else future.exception()
            if problem is not None:
                logs.event("execution-cleanup-failed", level=logging.ERROR, id=execution_id,
                           error=str(problem))
        cleanup.add_done_callback(cleaned)

    async def _store(self, workflow: Workflow, outcome: Outcome,
                     record_for: Callable[[str | None], ExecutionRecord],
                     request: RequestFields | None) -> Executed:
        """Store the record, the settings change and `request`; say so if the store cannot."""
        try:
            record = await self.store.finish(workflow.name, outcome.settings_change,
                                             workflow.settings,
                                             self.limits(workflow).settings_kb * 1024,
                                             record_for, request)
        except Exception as exc:
            record = record_for(None)
            self.metrics.store_error("finish")
            self.metrics.execution_unrecorded(record.workflow, record.status)
            logs.event("execution-not-recorded", level=logging.ERROR, id=record.id,
                       workflow=record.workflow, version=record.version,
                       trigger=record.trigger, status=record.status, error=str(exc))
            return Executed(record, None, recorded=False)
        stages.stamp("committed")
        logs.event("execution", id=record.id, workflow=record.workflow,
                   version=record.version, trigger=record.trigger, status=record.status,
                   duration_ms=round(record.duration_ms, 1), http=record.http_status)
        for listener in self.listeners:
            listener(record)
        response = outcome.response if record.status == Status.SUCCESS else None
        return Executed(record, response)

    async def _prepared_run(self, job: Job, environment: dict[str, Any] | None = None
                            ) -> Outcome:
        """The executor's run, once the workflow's directory and environment are ready.

        An environment missing from disk (imported, pruned, then rolled back
        to) is built again from the version's exact pins.
        """
        started = time.perf_counter()
        try:
            files = built = None
            if self.files is not None:
                files = await self.files.ensure(job.name, job.limits.files_mb)
            if environment is not None and self.environments is not None:
                built = await self.environments.ensure(environment["python"],
                                                       environment["pins"])
            job = job.prepared(files, built)
        except (FilesError, BuildError, OSError) as exc:
            logs.event("prepare-failed", workflow=job.name, error=str(exc)[:500])
            return Outcome(Status.ERROR, (time.perf_counter() - started) * 1000,
                           error=f"the execution could not be prepared: {exc}")
        return await self.executor.run(job)

    async def drain(self, grace_s: float) -> int:
        """Refuse new work, wait up to `grace_s` for executions, interrupt the rest.

        Queued executions were accepted, so they may still run within the
        grace period. At the deadline each remaining task is cancelled: the
        executor's cancellation path kills the child's process group, and the
        execution is recorded `interrupted`. Returns how many were interrupted.
        """
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        await asyncio.sleep(0)  # executions spawned just before the stop reach us first
        # A loop, not one wait: a request admitted before the stop may start late.
        while self._inflight and (left := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._inflight), timeout=left)
        self._interrupting = True
        interrupted = 0
        while self._inflight:
            interrupted += len(self._interruptible)
            for task in self._interruptible:
                task.cancel()
            self._interruptible.clear()
            await asyncio.wait(set(self._inflight))
        if self._cleaning:  # bounded: each kills, waits at most seconds, and removes
            await asyncio.wait(set(self._cleaning))
        return interrupted

    async def check(self, name: str, kind: Kind, code: str, limits: Limits,
                    allow_net: list[str] | None = None,
                    env: dict[str, str] | None = None,
                    environment: dict[str, Any] | None = None,
                    preload: tuple[str, ...] = ()) -> str | None:
        """Deploy-time check of new code in a child; the problem, or None if fine.

        It runs under the workflow's egress policy and in its environment, so
        a zygote for that pair is on its way before the first execution.
        """
        network = Policy.of(*self.config.network.allow, *(allow_net or ()))
        job = Job(execution_id=ids.execution_id(), name=name, kind=kind, version=0,
                  code=code, limits=limits, mode="check", network=network, env=env or {},
                  preload=preload, json_depth=self.config.max_json_depth)
        started = time.perf_counter()
        outcome = await self._prepared_run(job, environment)
        if outcome.cleanup is not None:
            self._track(job.execution_id, outcome.cleanup)
        if outcome.status == Status.SUCCESS:
            return None
        logs.event("deploy-check-failed", workflow=name, status=outcome.status,
                   duration_ms=round((time.perf_counter() - started) * 1000, 1))
        return outcome.error or outcome.status


def capped(text: str | None, limit_bytes: int, what: str) -> str | None:
    """`text` cut to `limit_bytes` of UTF-8, with a note where it was cut."""
    if text is None:
        return None
    data = text.encode("utf-8", "replace")
    if len(data) <= limit_bytes:
        return text
    kept = data[:limit_bytes].decode("utf-8", "ignore")
    return f"{kept}\n[wfd: {what} cut here, over the {limit_bytes // 1024} KiB limit]"


def _record(execution_id: str, workflow: Workflow, trigger: Trigger, started_at: datetime,
            outcome: Outcome, limits: Limits, lineage: dict[str, Any],
            refused: str | None = None) -> ExecutionRecord:
    """The execution's record; `refused` says why the store refused its settings change.

    A refused change fails the execution: nothing it changed was kept, and a
    catch caller gets the failure's response, not the workflow's. The error
    and the traceback are capped like the output.
    """
    if refused is not None:
        outcome = replace(outcome, status=Status.ERROR, error=refused, response=None)
    http_status = domain.http_status(outcome.status, outcome.response) \
        if workflow.kind == Kind.CATCH else None
    cap = limits.output_kb * 1024
    return ExecutionRecord(
        id=execution_id, workflow=workflow.name, version=workflow.version, trigger=trigger,
        status=outcome.status, started_at=utc_iso(started_at),
        duration_ms=outcome.duration_ms, http_status=http_status,
        error=capped(outcome.error, cap, "error"),
        traceback=capped(outcome.traceback, cap, "traceback"), output=outcome.output,
        output_truncated=outcome.output_truncated, **lineage)
