"""One executor per environment in use: the default one, and one per workflow environment.

A job without an environment goes to the default executor (wfd's own
interpreter and packages). A job with one goes to that environment's own
executor, made on its first job: the same kind as the default (a zygote
preloading the environment's imports, or cold spawn), with the same
isolation layers around the environment's interpreter. It is self-tested
once when it starts, like the default one at start-up; in strict mode a
failure refuses its executions (each records the error) until a start passes.

Environment executors are stopped after `env_idle_s` without a job, and
at most `max_zygotes` of them run at once: starting one more stops the
least recently used idle one first. The key of an executor is the
environment's hash alone today; it is one small value (`key_of`) so that it
can grow (say, to environment and network policy) without touching the rest.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wfd import logs
from wfd.domain import Status
from wfd.environments import Environment, Environments
from wfd.executor.base import Executor, Job, Outcome
from wfd.isolation import selftest
from wfd.isolation.layers import Isolation

IDLE_CHECK_S = 1.0
# Makes an environment's executor: (isolation around its interpreter, preload).
ExecutorFactory = Callable[[Isolation, list[str]], Executor]


@dataclass
class Slot:
    """One environment's executor and how it is being used."""

    executor: Executor
    preload: list[str]
    started: "asyncio.Task[None] | None" = None
    running: int = 0
    last_used: float = field(default_factory=time.monotonic)
    self_test: str = "running"


def key_of(job: Job) -> str:
    """Which executor serves a job (see the module docstring)."""
    assert job.environment is not None
    return job.environment.digest


class EnvironmentExecutors:
    """The executor the daemon uses: routes each job to its environment's executor."""

    def __init__(self, default: Executor, isolation: Isolation, environments: Environments,
                 make: ExecutorFactory, config: Any) -> None:
        self.default = default
        self.isolation = isolation
        self.environments = environments
        self.make = make
        self.config = config
        self.slots: dict[str, Slot] = {}
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.default.start()
        self._reaper = asyncio.create_task(self._stop_idle())

    def status(self) -> dict[str, Any]:
        return self.default.status()

    def environment_status(self, key: str) -> dict[str, Any] | None:
        """What `wfd ctl envs` says about an environment's executor, if it has one."""
        slot = self.slots.get(key)
        if slot is None:
            return None
        status = slot.executor.status()
        return {"state": status.get("zygote_state", "spawn"), "pid": status.get("zygote_pid"),
                "running": slot.running, "self_test": slot.self_test,
                "idle_s": round(time.monotonic() - slot.last_used, 1),
                "preload": slot.preload}

    async def run(self, job: Job) -> Outcome:
        if job.environment is None:
            return await self.default.run(job)
        try:
            slot = await self.warm(key_of(job), job.environment, list(job.preload))
        except OSError as exc:
            return Outcome(Status.ERROR, 0.0, error=f"the environment's executor could not start: "
                                               f"{exc}")
        slot.running += 1
        slot.last_used = time.monotonic()
        try:
            return await slot.executor.run(job)
        finally:
            slot.running -= 1
            slot.last_used = time.monotonic()

    async def warm(self, key: str, environment: Environment, preload: list[str]) -> Slot:
        """The executor for `key`, started (and self-tested) if it was not running."""
        slot = self.slots.get(key)
        if slot is not None and not set(preload) <= set(slot.preload):
            slot.preload = sorted({*slot.preload, *preload})
            configure = getattr(slot.executor, "configure", None)
            if configure is not None:  # a zygote: restarts with the longer list
                configure(slot.preload, self.config.spares_min, self.config.spares_max)
        if slot is None:
            await self._make_room()
            slot = self._slot(key, environment, sorted(set(preload)))
            self.slots[key] = slot
        assert slot.started is not None  # set by _slot
        try:
            await asyncio.shield(slot.started)
        except Exception:
            if self.slots.get(key) is slot:  # the next job tries again
                del self.slots[key]
            raise
        return slot

    def _slot(self, key: str, environment: Environment, preload: list[str]) -> Slot:
        interpreter = self.environments.interpreter_of(environment)
        if interpreter is None:
            raise OSError(f"environment {environment.digest} has no interpreter recorded")
        isolation = self.isolation.for_environment(environment.path, interpreter)
        executor = self.make(isolation, preload)
        slot = Slot(executor, preload)
        slot.started = asyncio.create_task(self._start(key, slot, isolation, environment))
        return slot

    async def _start(self, key: str, slot: Slot, isolation: Isolation,
                     environment: Environment) -> None:
        await asyncio.to_thread(self.environments.refresh, environment)
        await slot.executor.start()
        checks = await selftest.run(slot.executor, isolation, self.config)
        failed = selftest.failures(checks)
        slot.self_test = "failed: " + ", ".join(failed) if failed else "passed"
        logs.event("environment-executor-started", hash=key, self_test=slot.self_test)
        if failed:
            logs.event("isolation-self-test-failed", level=logging.ERROR, environment=key,
                       failed=",".join(failed))
            if self.isolation.mode == "strict":  # as at start-up: refuse, never run weaker
                await slot.executor.close()
                raise OSError(f"the isolation self-test failed in environment {key}: "
                              f"{', '.join(failed)}")

    async def _make_room(self) -> None:
        """At most max_zygotes environment executors: stop the least recently used idle one."""
        while len(self.slots) >= self.config.max_zygotes:
            idle = [(slot.last_used, key) for key, slot in self.slots.items()
                    if slot.running == 0 and slot.started and slot.started.done()]
            if not idle:
                return  # all busy: run one more for a while; the reaper trims later
            await self._stop(min(idle)[1], "the least recently used, to make room")

    async def _stop_idle(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            now = time.monotonic()
            for key, slot in list(self.slots.items()):
                if (slot.running == 0 and slot.started and slot.started.done()
                        and now - slot.last_used >= self.config.env_idle_s):
                    await self._stop(key, f"idle for {self.config.env_idle_s:g} s")

    async def _stop(self, key: str, why: str) -> None:
        slot = self.slots.pop(key, None)
        if slot is not None:
            await slot.executor.close()
            logs.event("environment-executor-stopped", hash=key, reason=why)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for key in list(self.slots):
            slot = self.slots[key]
            if slot.started and not slot.started.done():
                slot.started.cancel()
                with contextlib.suppress(BaseException):
                    await slot.started
            await self._stop(key, "the daemon is stopping")
        await self.default.close()
