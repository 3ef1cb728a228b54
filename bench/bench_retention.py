"""Size of the database after a flood of executions, with retention on and off.

    .venv/bin/python bench/bench_retention.py [EXECUTIONS] [OUTPUT_BYTES]

Records EXECUTIONS (default 5,000) executions of one workflow, each with
OUTPUT_BYTES (default 1,024) of printed output, through the store, with the
pruner running as in the daemon (default retention: 1,000 per workflow), and
again without it. Prints the file size (after the WAL is checkpointed), the
rows left, and the time per execution spent recording and pruning.
"""

import asyncio
import sys
import tempfile
import time
from pathlib import Path

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wfd import ids
from wfd.config import Retention
from wfd.retention import Pruner
from wfd.store import ExecutionRecord, Store, utc_iso


async def flood(path: Path, executions: int, output: str, prune: bool) -> tuple[int, int, float]:
    store = Store(path)
    await store.open()
    await store.deploy("bench", "catch", "def workflow(r, s):\n    pass\n", {}, None, "k")
    pruner = Pruner(store, lambda: Retention())  # the defaults
    task = asyncio.create_task(pruner.run()) if prune else None
    started = time.perf_counter()
    for _ in range(executions):
        record = ExecutionRecord(id=ids.execution_id(), workflow="bench", version=1,
                                 trigger="catch", status="success", started_at=utc_iso(),
                                 duration_ms=10.0, http_status=200, output=output)
        pruner.note(await store.finish(record.workflow, None, {}, 1 << 20,
                                       lambda _, record=record: record))
    if task:
        task.cancel()
        await pruner.prune()  # what the next pass would do
    elapsed = time.perf_counter() - started
    rows = (await store.counts())["executions"]
    await store.close()
    return path.stat().st_size, rows, elapsed / executions * 1e6


def main() -> None:
    executions = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    output = "x" * (int(sys.argv[2]) if len(sys.argv) > 2 else 1024)
    with tempfile.TemporaryDirectory() as directory:
        for prune in (True, False):
            size, rows, per = asyncio.run(flood(Path(directory) / f"{prune}.db", executions,
                                                output, prune))
            print(f"retention {'on ' if prune else 'off'}: {size / 1024:8.0f} KiB, "
                  f"{rows:6d} rows, {per:6.0f} us per execution")


if __name__ == "__main__":
    main()
