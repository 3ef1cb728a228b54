"""Idempotency keys (SPEC 11): a repeated request is answered, not run again.

A request carrying `Idempotency-Key` (or, under the `standard` signature
scheme, `webhook-id`) whose key was seen for the same workflow in the last
24 hours gets the first request's response again, byte for byte, with
`Idempotent-Replayed: true`. A repeat that arrives while the first still
runs waits for it (one lock per key, in memory: one daemon owns the store),
then gets its response.

What counts as "the first response": the answer of an execution (whatever
its status) or the 202 of an accepted async request. A request refused
before anything ran (401, 413, 503 overloaded...) or cut off by the
daemon's shutdown does not use up its key: the sender's retry runs.
"""

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aiohttp import web

from wfd.store import Store, utc_iso

WINDOW = timedelta(hours=24)
MAX_KEY_CHARS = 255
REPLAYED_HEADER = "Idempotent-Replayed"
# Set by the server for each response; never replayed from the stored one.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "date", "server"})

StoredResponse = tuple[int, dict[str, str], bytes]


class BadKey(Exception):
    """An idempotency key the daemon will not keep (HTTP 400)."""


def request_key(headers: Mapping[str, str], scheme: str | None) -> str | None:
    """The request's idempotency key, if it has one."""
    key = headers.get("Idempotency-Key")
    if key is None and scheme == "standard":
        key = headers.get("webhook-id")
    if key is not None and not 0 < len(key) <= MAX_KEY_CHARS:
        raise BadKey(f"an idempotency key has 1 to {MAX_KEY_CHARS} characters")
    return key


def stored(response: web.Response) -> StoredResponse:
    """What is kept of a response to replay it."""
    headers = {str(k): v for k, v in response.headers.items() if k.lower() not in _FRAMING}
    body = response.body
    return response.status, headers, body if isinstance(body, bytes) else b""


def replayed(first: StoredResponse) -> web.Response:
    status, headers, body = first
    return web.Response(status=status, body=body, headers={**headers, REPLAYED_HEADER: "true"})


@dataclass
class Slot:
    """One request's hold on its key: the first response if there was one."""

    first: StoredResponse | None
    answer: StoredResponse | None = None


class Idempotency:
    """The keys in use and the responses kept for them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._busy: dict[tuple[str, str], asyncio.Event] = {}

    @asynccontextmanager
    async def hold(self, workflow: str, key: str, execution_id: str) -> AsyncIterator[Slot]:
        """Hold `key` while a request is handled; `slot.answer`, if set, is kept for repeats.

        Sync executions set `answer` after they ran; async ones store their
        202 with the delivery, in the same transaction, and leave it unset.
        """
        held = (workflow, key)
        while (busy := self._busy.get(held)) is not None:
            await busy.wait()
        done = self._busy[held] = asyncio.Event()
        try:
            since = utc_iso(datetime.now(UTC) - WINDOW)
            slot = Slot(first=await self.store.idempotent(workflow, key, since))
            yield slot
            if slot.answer is not None:
                await self.store.answer_idempotency(workflow, key, execution_id, slot.answer)
        finally:
            del self._busy[held]
            done.set()
