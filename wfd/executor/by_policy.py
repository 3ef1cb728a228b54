"""A zygote per egress policy: a zygote's network namespace serves exactly one policy.

Executions of workflows whose policies differ never share a namespace, so
they never see each other's allowances. The daemon's default policy (its
`[network] allow`) has its zygote from the start; a workflow with
allowances of its own gets one at its deploy-time check (executions
cold-spawn, with the same policy, until it is ready), retired after IDLE_S
without work.
The key is the policy's; an environment's zygote would key on both.
"""

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from wfd import logs
from wfd.executor.base import Job, Outcome
from wfd.executor.zygote import ZygoteExecutor
from wfd.isolation.network import Policy

IDLE_S = 300.0


class ZygotesByPolicy:
    """Routes each job to the zygote of its policy, making and retiring them as needed."""

    def __init__(self, make: Callable[[Policy, list[str], int, int], ZygoteExecutor],
                 default: Policy, preload: Sequence[str], spares_min: int,
                 spares_max: int) -> None:
        self.make = make
        self.default = default
        self.pool = (list(preload), spares_min, spares_max)
        self.zygotes: dict[tuple[str, ...], ZygoteExecutor] = {}
        self._starting: dict[tuple[str, ...], asyncio.Task[None]] = {}
        self._running: dict[tuple[str, ...], int] = {}
        self._used: dict[tuple[str, ...], float] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Boot the default policy's zygote and wait until it is ready or has failed once."""
        zygote = self.zygotes[self.default.key] = self.make(self.default, *self.pool)
        await zygote.start()

    def configure(self, preload: Sequence[str], spares_min: int, spares_max: int) -> None:
        """New preload list or pool bounds (on SIGHUP), for every policy's zygote."""
        self.pool = (list(preload), spares_min, spares_max)
        for zygote in self.zygotes.values():
            zygote.configure(preload, spares_min, spares_max)

    async def run(self, job: Job) -> Outcome:
        key = job.network.key
        zygote = self.zygotes.get(key)
        if zygote is None:
            zygote = self.zygotes[key] = self.make(job.network, *self.pool)
            self._starting[key] = asyncio.create_task(zygote.start())
            logs.event("zygote-for-policy", allow=",".join(key))
        self._running[key] = self._running.get(key, 0) + 1
        outcome = None
        try:
            if zygote.state != "ready":  # booting: a cold spawn now beats waiting for it
                outcome = await zygote.fallback.run(job)
            else:
                outcome = await zygote.run(job)
            return outcome
        finally:
            if outcome is not None and outcome.cleanup is not None:
                # Answered early: it runs until its processes are gone.
                outcome.cleanup.add_done_callback(lambda _: self._ended(key))
            else:
                self._ended(key)

    def _ended(self, key: tuple[str, ...]) -> None:
        self._running[key] -= 1
        self._used[key] = time.monotonic()
        self._retire_idle()

    def _retire_idle(self) -> None:
        """Close the zygotes of policies nothing ran under for IDLE_S (never the default)."""
        now = time.monotonic()
        for key in [k for k, used in self._used.items()
                    if k != self.default.key and not self._running.get(k)
                    and now - used > IDLE_S]:
            zygote = self.zygotes.pop(key)
            self._used.pop(key)
            self._running.pop(key, None)
            task = asyncio.create_task(self._close(key, zygote))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _close(self, key: tuple[str, ...], zygote: ZygoteExecutor) -> None:
        starting = self._starting.pop(key, None)
        if starting is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        await zygote.close()

    def status(self) -> dict[str, Any]:
        """The default zygote's status, and the state of each policy's own zygote."""
        status = self.zygotes[self.default.key].status()
        others = {",".join(key): zygote.state for key, zygote in self.zygotes.items()
                  if key != self.default.key}
        if others:
            status["zygotes_by_policy"] = others
        return status

    async def close(self) -> None:
        for task in self._starting.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(zygote.close() for zygote in self.zygotes.values()),
                             *self._closing, return_exceptions=True)
