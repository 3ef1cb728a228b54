"""Executions that finish together are committed together (wfd/store.py `_group_commit`).

On a real SQLite file, through the Store the daemon uses: executions that
finish at once share a transaction, yet each is as if alone: one that fails
on its own data keeps nothing and costs the others nothing, and each caller
hears back only once its record is committed (another connection sees it).
"""

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from wfd.domain import Kind, Status, Trigger
from wfd.store import ExecutionRecord, Store, StoreError, utc_iso

GROUP = 20


def record(execution_id: str) -> ExecutionRecord:
    return ExecutionRecord(id=execution_id, workflow="w", version=1, trigger=Trigger.CATCH,
                           status=Status.SUCCESS, started_at=utc_iso(), duration_ms=1.0,
                           request_id=execution_id)


def committed(path: Path) -> tuple[set[str], set[str], str]:
    """What another connection sees: record ids, stored request ids, the settings."""
    with sqlite3.connect(path) as db:
        records = {row[0] for row in db.execute("SELECT id FROM executions")}
        kept = {row[0] for row in db.execute("SELECT id FROM requests")}
        (settings,) = db.execute("SELECT settings FROM workflows").fetchone()
    return records, kept, settings


async def finish_together(store: Store, path: Path) -> list[object]:
    """GROUP executions finishing at once, each setting its own key; the 5th's id is taken."""
    seen_on_return: dict[str, bool] = {}

    async def one(i: int) -> ExecutionRecord:
        execution_id = "e0" if i == 5 else f"e{i}"
        done = await store.finish("w", {"set": {f"k{i}": i}, "unset": []}, {}, 2**20,
                                  lambda _: record(execution_id), {"i": i})
        seen_on_return[done.id] = done.id in committed(path)[0]
        return done

    results = await asyncio.gather(*(one(i) for i in range(GROUP)), return_exceptions=True)
    assert all(seen_on_return.values()), seen_on_return
    return results


def test_a_group_commits_all_but_the_one_that_failed(tmp_path):
    path = tmp_path / "wfd.db"

    async def scenario() -> list[object]:
        store = Store(path)
        await store.open()
        try:
            await store.deploy("w", Kind.CATCH, "code", {}, None, "key")
            return await finish_together(store, path)
        finally:
            await store.close()

    results = asyncio.run(scenario())
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1 and isinstance(failed[0], sqlite3.IntegrityError)
    records, kept, settings = committed(path)
    expected = {f"e{i}" for i in range(GROUP) if i != 5}
    assert records == kept == expected
    # The failed one's settings change went with it; everyone else's stayed.
    assert json.loads(settings) == {f"k{i}": i for i in range(GROUP) if i != 5}


def test_a_closed_store_fails_every_waiting_execution(tmp_path):
    async def scenario() -> None:
        store = Store(tmp_path / "wfd.db")
        await store.open()
        await store.deploy("w", Kind.CATCH, "code", {}, None, "key")
        await store.close()
        with pytest.raises(StoreError, match="the store is closed"):
            await asyncio.wait_for(store.finish("w", None, {}, 2**20, lambda _: record("e1")),
                                   5)

    asyncio.run(scenario())
