"""Pruning of old execution records, off the request path.

A background task deletes records past `retention.max_age_days` and beyond
`retention.max_per_workflow` per workflow (and code versions beyond
`retention.versions_per_workflow`, which a deploy also applies at once),
`BATCH` rows per transaction and yielding to the event loop between batches,
so catch requests never wait behind a long delete. A pass runs every `interval_s`, and sooner once
`BATCH` executions have finished since the last one: under a flood the
table overshoots its bound by about one batch, not by a minute of traffic.

After a pass that deleted rows, free pages beyond a quarter of the file go
back to the file system in small incremental steps (the database is created
with auto_vacuum=INCREMENTAL), so the file shrinks after a burst instead of
staying at its high-water mark, while steady traffic reuses the pages it
freed. systemd/README.md states the VACUUM policy.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from wfd import idempotency, logs
from wfd.config import Retention
from wfd.metrics import Metrics
from wfd.store import ExecutionRecord, Store, WriteFailed, utc_iso

BATCH = 500
# Given back per incremental_vacuum step, so no one transaction is long.
RECLAIM_STEP_BYTES = 4 * 1024 * 1024
# Share of the file left free for new records to reuse.
FREE_SLACK = 0.25
INTERVAL_S = 60.0


class Pruner:
    """Keeps the executions table within the retention settings."""

    def __init__(self, store: Store, retention: Callable[[], Retention],
                 interval_s: float = INTERVAL_S, batch: int = BATCH,
                 metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics or Metrics()
        self.retention = retention  # read at each pass, so SIGHUP applies at once
        self.interval_s = interval_s
        self.batch = batch
        self._since_last = 0
        self._due = asyncio.Event()

    def note(self, record: ExecutionRecord) -> None:
        """A listener of the dispatcher: count new records, wake up after a batch."""
        self._since_last += 1
        if self._since_last >= self.batch:
            self._due.set()

    def wake(self) -> None:
        """Run a pass now (after a reload changed the retention settings)."""
        self._due.set()

    async def run(self) -> None:
        """Prune now, then at every interval (or batch of new records) until cancelled."""
        while True:
            self._since_last = 0
            self._due.clear()
            try:
                await self.prune()
            except WriteFailed as exc:
                self.metrics.store_error("retention")
                logs.event("store-error", level=logging.ERROR, operation="retention",
                           error=str(exc), retry="at the next pass")
            except Exception:
                logs.event("retention-failed", level=logging.ERROR, exc_info=True,
                           retry="at the next pass")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due.wait(), self.interval_s)

    async def prune(self, now: datetime | None = None) -> int:
        """One pass: delete in batches until nothing is past retention; how many went."""
        retention = self.retention()
        cutoff = utc_iso((now or datetime.now(UTC)) - timedelta(days=retention.max_age_days))
        deleted = 0
        while batch := await self.store.prune_executions(retention.max_per_workflow, cutoff,
                                                         self.batch):
            deleted += batch
            await asyncio.sleep(0)
        # Stored requests and finished deliveries go with the last record that needs them.
        delivery = await self.store.prune_delivery(
            utc_iso((now or datetime.now(UTC)) - idempotency.WINDOW))
        versions = await self.store.prune_versions(retention.versions_per_workflow)
        if deleted or delivery or versions:
            reclaimed = await self._reclaim()
            logs.event("pruned", executions=deleted, delivery_rows=delivery, versions=versions,
                       bytes_reclaimed=reclaimed)
        return deleted

    async def _reclaim(self) -> int:
        """Give free pages beyond FREE_SLACK of the file back; how many bytes went.

        The slack is kept because new records reuse free pages: giving all of
        them back after every pass would only make the file grow again.
        """
        reclaimed = 0
        while True:
            size = await self.store.size()
            excess = size["db_free_bytes"] - int(size["db_bytes"] * FREE_SLACK)
            if excess <= 0:
                return reclaimed
            freed = await self.store.reclaim_space(min(RECLAIM_STEP_BYTES, excess))
            if not freed:
                return reclaimed  # a database created without auto_vacuum
            reclaimed += freed
            await asyncio.sleep(0)
