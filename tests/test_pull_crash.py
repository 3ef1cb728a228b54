"""A crash between storing a tick's next due time and its run never fires that tick twice.

The window is a few instructions wide, too narrow to hit with a signal sent
from outside, so the crash is taken at the exact moment instead: the real
scheduler, dispatcher and store (SQLite on disk) hand the tick's run to an
executor that copies the database as a crash at that instant would leave it
(every committed transaction, through SQLite's backup API) and never
returns. A second scheduler then starts on that copy, as the restarted
daemon would.
"""

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from wfd.admission import Admission
from wfd.config import Config
from wfd.dispatch import Dispatcher
from wfd.executor import Job, Outcome
from wfd.scheduler import Scheduler
from wfd.store import Store, utc_iso

PULL = "def workflow(settings):\n    settings['ran'] = True\n"
HOUR = timedelta(hours=1)


class CrashAsTheRunStarts:
    """An executor standing in for the child: at the run's start, the daemon dies.

    What is on disk at that instant is copied to `after_crash`; the run never
    ends, as nothing runs in a dead process.
    """

    def __init__(self, db: Path, after_crash: Path) -> None:
        self.db, self.after_crash = db, after_crash
        self.jobs: list[Job] = []
        self.crashed = asyncio.Event()

    async def start(self) -> None:
        pass

    async def run(self, job: Job) -> Outcome:
        self.jobs.append(job)
        with sqlite3.connect(self.db) as live, sqlite3.connect(self.after_crash) as copy:
            live.backup(copy)
        self.crashed.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    def status(self) -> dict[str, Any]:
        return {"executor": "crash-stand-in"}

    async def close(self) -> None:
        pass


async def daemon_parts(db: Path, executor: Any) -> tuple[Store, Dispatcher, Scheduler]:
    store = Store(db)
    await store.open()
    dispatcher = Dispatcher(Config(), store, executor, Admission(concurrency=2, queue_max=10))
    return store, dispatcher, Scheduler(store, dispatcher)


def test_a_crash_as_the_run_starts_never_fires_that_tick_again(tmp_path: Path) -> None:
    async def main() -> None:
        db, after_crash = tmp_path / "wfd.db", tmp_path / "after-crash.db"
        crash = CrashAsTheRunStarts(db, after_crash)
        store, dispatcher, scheduler = await daemon_parts(db, crash)
        await store.deploy("hourly", "pull", PULL, {}, {"every_s": 3600}, "unused-key")
        # It fell due while the daemon was down: it runs once, at start-up.
        await store.set_next_due("hourly", utc_iso(datetime.now(UTC) - timedelta(seconds=5)))
        await scheduler.start()
        await asyncio.wait_for(crash.crashed.wait(), 10)
        assert [job.name for job in crash.jobs] == ["hourly"]
        await scheduler.close()
        await dispatcher.drain(0)
        await store.close()

        restarted, _, rescheduled = await daemon_parts(after_crash, crash)
        try:
            restart = datetime.now(UTC)
            await rescheduled.start()
            # Armed for the tick after the one that started, not for that one again.
            armed = rescheduled.timers.due_of("hourly")
            assert armed is not None and armed > restart + HOUR - timedelta(minutes=1), armed
            assert (await restarted.workflow("hourly")).next_due == utc_iso(armed)
        finally:
            await rescheduled.close()
            await restarted.close()

    asyncio.run(main())
