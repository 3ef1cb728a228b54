"""Retention: old execution records go, in small batches, and the file stays bounded.

The flood tests drive the store and the pruner in-process (5,000 executions
through child processes would take minutes); the daemon test checks the
wiring: a SIGHUP with a smaller retention prunes at once.
"""

import asyncio
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

from conftest import wait_for

from wfd import ids
from wfd.config import Retention
from wfd.retention import Pruner
from wfd.store import ExecutionRecord, Store, utc_iso

FLOOD = 5000
KEEP = 100
OUTPUT = "x" * 1024  # what a chatty workflow prints, per execution


def record(workflow: str, started_at: datetime | None = None,
           output: str = OUTPUT) -> ExecutionRecord:
    return ExecutionRecord(id=ids.execution_id(), workflow=workflow, version=1,
                           trigger="catch", status="success",
                           started_at=utc_iso(started_at), duration_ms=12.5,
                           http_status=200, output=output)


async def open_store(path: Path, workflows: list[str]) -> Store:
    store = Store(path)
    await store.open()
    for name in workflows:
        await store.deploy(name, "catch", "def workflow(r, s):\n    pass\n", {}, None, "k")
    return store


async def flood(path: Path, prune: bool) -> tuple[int, int, int]:
    """FLOOD executions over two workflows, the pruner running as in the daemon.

    Returns (most records seen at once, records at the end, file size).
    """
    store = await open_store(path, ["a", "b"])
    pruner = Pruner(store, lambda: Retention(max_per_workflow=KEEP, max_age_days=30),
                    interval_s=3600)
    task = asyncio.create_task(pruner.run()) if prune else None
    most = 0
    for i in range(FLOOD):
        made = record("ab"[i % 2])
        finished = await store.finish(made.workflow, None, {}, 1 << 20,
                                      lambda _, made=made: made)
        pruner.note(finished)
        if i % 100 == 0:
            most = max(most, (await store.counts())["executions"])
    if task:
        pruner.wake()
        await wait_until(lambda: _count(store), lambda n: n <= 2 * KEEP)
        task.cancel()
    count = (await store.counts())["executions"]
    await store.close()
    return most, count, path.stat().st_size


async def _count(store: Store) -> int:
    return (await store.counts())["executions"]


async def wait_until(value, accept, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not accept(await value()):
            await asyncio.sleep(0.01)


def test_a_flood_of_executions_stays_within_retention(tmp_path):
    most, count, size = asyncio.run(flood(tmp_path / "on.db", prune=True))
    assert count == 2 * KEEP
    # The pruner wakes after each batch of 500: the table never overshoots by more.
    assert most <= 2 * KEEP + 500 + 100
    _, unpruned_count, unpruned_size = asyncio.run(flood(tmp_path / "off.db", prune=False))
    assert unpruned_count == FLOOD
    print(f"\nDB after {FLOOD} executions: retention on {size / 1024:.0f} KiB, "
          f"off {unpruned_size / 1024:.0f} KiB")
    assert size < unpruned_size / 5


def test_age_and_count_rules_and_space_given_back(tmp_path):
    async def main() -> tuple[dict, list[str], int, int]:
        store = await open_store(tmp_path / "wfd.db", ["a", "b"])
        now = datetime.now(UTC)
        big = "y" * 64 * 1024  # so that what is freed is well over the slack kept
        for days in (40, 35, 31):
            await store.record(record("a", now - timedelta(days=days), big))
        for _ in range(12):
            await store.record(record("b", output=big))
        kept_b = [r.id for r in await store.executions("b", 100)][:5]
        before = await store.size()
        pruner = Pruner(store, lambda: Retention(max_per_workflow=5, max_age_days=30),
                        batch=4)
        deleted = await pruner.prune(now)
        after = await store.size()
        remaining = {"a": await store.executions("a", 100),
                     "b": [r.id for r in await store.executions("b", 100)]}
        await store.close()
        return remaining, kept_b, deleted, before["db_bytes"] - after["db_bytes"]

    remaining, kept_b, deleted, shrunk = asyncio.run(main())
    assert remaining["a"] == []  # all older than 30 days
    assert remaining["b"] == kept_b  # the 5 newest
    assert deleted == 3 + 7
    # auto_vacuum=INCREMENTAL gave the freed pages back, but for a quarter of the file.
    assert shrunk > 10 * 64 * 1024 / 2


def test_sighup_with_a_smaller_retention_prunes_at_once(make_daemon, name):
    daemon = make_daemon(config="[retention]\nmax_per_workflow = 10\n")
    daemon.deploy(name, "def workflow(_request, settings):\n    pass\n")
    for _ in range(5):
        daemon.ctl("run", name)
    assert len(daemon.executions(name)) == 5
    daemon.config_file.write_text("[retention]\nmax_per_workflow = 3\n")
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: len(daemon.executions(name)) == 3, what="pruning to 3 records")
    assert "pruned executions=2" in daemon.log()
    status = daemon.ctl_json("status")
    assert status["executions"] == 3 and status["db_bytes"] > status["db_free_bytes"] >= 0
