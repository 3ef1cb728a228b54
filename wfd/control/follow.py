"""`wfd ctl logs NAME --follow`: the daemon's bounded buffer for one stream.
"""

import asyncio
from collections import deque

from wfd.control.protocol import CommandError
from wfd.store import ExecutionRecord

# Output a `logs --follow` client may lag behind by before it is cut off:
# a record carries up to output_kb (1 MiB) of output.
FOLLOW_BUFFER_BYTES = 32 * 1024 * 1024


class Follower:
    """One `--follow` stream's buffer of records not yet sent.

    Bounded: a client that reads slower than executions end is cut off
    with an error rather than growing the daemon's memory without limit.
    """

    def __init__(self) -> None:
        self._records: deque[ExecutionRecord] = deque()
        self._bytes = 0
        self._wake = asyncio.Event()
        self._ended: str | None = None

    def push(self, record: ExecutionRecord) -> None:
        size = len(record.output) + len(record.traceback or "")
        if self._bytes + size > FOLLOW_BUFFER_BYTES:
            self.end("fell behind: too many executions' output waiting to be sent; "
                     "follow again")
        elif self._ended is None:
            self._records.append(record)
            self._bytes += size
            self._wake.set()

    def end(self, reason: str) -> None:
        self._ended = self._ended or reason
        self._wake.set()

    async def next_batch(self) -> list[ExecutionRecord]:
        """The records buffered so far, waiting for one; raises CommandError once ended."""
        await self._wake.wait()
        self._wake.clear()
        if self._ended is not None:
            raise CommandError(self._ended)
        batch = list(self._records)
        self._records.clear()
        self._bytes = 0
        return batch
