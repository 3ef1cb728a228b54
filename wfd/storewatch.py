"""Watching the store: notice when it can write again, and keep the WAL small.

A write that fails for the store's own reasons (a full disk, a lock held
past the busy timeout) leaves `Store.write_error` set, and /healthz says
`degraded`. Nothing else may write for a while (a quiet daemon, timers
backing off), so this loop probes with a one-row write every
`PROBE_INTERVAL_S` until one succeeds: the daemon recovers by itself once
space comes back, without a restart.

While the store is healthy, a daemon that has been idle for `IDLE_S` after
writing checkpoints the WAL with TRUNCATE, so the file goes back to zero
bytes between bursts instead of holding its high-water mark on a small
disk (SQLite's own wal_autocheckpoint copies pages back during bursts but
never shrinks the file below journal_size_limit).
"""

import asyncio
import logging
import time

from wfd import logs
from wfd.metrics import Metrics
from wfd.store import Store, WriteFailed

PROBE_INTERVAL_S = 1.0
IDLE_S = 2.0


class StoreWatch:
    """The background task behind /healthz's `store` and the WAL checkpoints."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self._degraded = False
        self._checkpointed = time.monotonic()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            await self.step()

    async def step(self) -> None:
        """One look at the store: probe while degraded, checkpoint when idle."""
        if self.store.write_error is not None:
            try:
                await self.store.probe()
            except WriteFailed:
                self.metrics.store_error("probe")
        self._note_transition()
        if self._degraded:
            return
        last = self.store.last_write
        if last > self._checkpointed and time.monotonic() - last >= IDLE_S:
            try:
                frames, _ = await self.store.checkpoint()
            except WriteFailed as exc:
                self.metrics.store_error("checkpoint")
                logs.event("store-error", level=logging.WARNING, operation="checkpoint",
                           error=str(exc))
                return
            self._checkpointed = time.monotonic()
            logs.event("wal-checkpoint", level=logging.DEBUG, frames=frames)

    def _note_transition(self) -> None:
        """One log line when the store stops or starts writing again."""
        error = self.store.write_error
        if error is not None and not self._degraded:
            logs.event("store-degraded", level=logging.ERROR, error=error)
        elif error is None and self._degraded:
            logs.event("store-recovered")
        self._degraded = error is not None
