"""One executor per (environment, egress policy) in use, and the rules of their lives.

A zygote runs one environment's interpreter and preloads its imports, and
its network namespace serves exactly one egress policy (executions of
workflows whose policies differ never share a namespace, so never see each
other's allowances). So an executor is keyed by both (`key_of`): the
environment's hash, or None for wfd's own; and the policy's key, or () when
no executor shares a namespace (no network layer, or cold spawn, which makes
each execution's namespace from its job's policy).

- The default executor (wfd's own environment under the daemon's `[network]
  allow`) starts with the daemon, is proven by its start-up self-test, and
  runs until the daemon stops.
- Any other is made at its first job (usually the deploy-time check): its
  environment's copy of `sandbox` refreshed, the executor started, then the
  self-test run through it under its policy. Meanwhile jobs cold-spawn with
  the same environment and policy, once that environment has passed a
  self-test in this daemon; the jobs of an environment not yet proven wait
  for the start instead. In strict mode a failed self-test stops the
  executor, fails the jobs waiting for it, and unproves its environment, so
  the next job waits for a new start: refuse, never run weaker.
- It stops after `env_idle_s` without a job, and at most `max_zygotes` run
  besides the default: making one more stops the least recently used idle
  one first (all busy: one more runs for a while; the idle check trims).
- SIGHUP's pool bounds reach every zygote, and its `preload` those of wfd's
  own environment; an environment's zygote keeps the imports of its code.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from wfd import logs
from wfd.config import Config
from wfd.domain import Status
from wfd.environments import Environment, Environments
from wfd.executor.base import Executor, Job, Outcome
from wfd.executor.spawn import SpawnExecutor
from wfd.executor.zygote import ZygoteExecutor
from wfd.isolation import selftest
from wfd.isolation.layers import Isolation
from wfd.isolation.network import Policy

IDLE_CHECK_S = 1.0
# (environment hash or None for wfd's own, the egress policy's key or ()).
Key = tuple[str | None, tuple[str, ...]]
# Makes one executor: the config, the isolation around its interpreter, its
# policy and what it preloads (wfd.executor.make_executor).
ExecutorFactory = Callable[[Config, Isolation, Policy, Sequence[str]], Executor]


@dataclass
class Slot:
    """One executor other than the default, and how it is being used."""

    executor: Executor
    fallback: Executor  # a cold spawn with the same environment and policy
    preload: list[str]
    started: "asyncio.Task[None] | None" = None
    running: int = 0
    last_used: float = field(default_factory=time.monotonic)
    self_test: str = "running"

    @property
    def ready(self) -> bool:
        """Started and self-tested; a failed start removes the slot instead."""
        return self.started is not None and self.started.done() \
            and not self.started.cancelled() and self.started.exception() is None


def _describe(key: Key, slot: Slot) -> dict[str, Any]:
    status = slot.executor.status()
    return {"environment": key[0], "allow": list(key[1]),
            "state": status.get("zygote_state", "spawn") if slot.ready else "starting",
            "pid": status.get("zygote_pid"), "running": slot.running,
            "self_test": slot.self_test, "idle_s": round(time.monotonic() - slot.last_used, 1),
            "preload": slot.preload}


class ExecutorRouter:
    """The executor the daemon uses: routes each job to the executor of its key."""

    def __init__(self, config: Config, isolation: Isolation, environments: Environments,
                 make: ExecutorFactory) -> None:
        self.config = config
        self.isolation = isolation
        self.environments = environments
        self.make = make
        self.per_policy = isolation.network is not None and config.executor == "zygote"
        self.default_policy = Policy.of(*config.network.allow)
        self.default = make(config, isolation, self.default_policy, config.preload)
        self.default_key: Key = (None, self.default_policy.key if self.per_policy else ())
        self.slots: dict[Key, Slot] = {}
        # Environments a self-test passed in (None: wfd's own, by the start-up check).
        self.proven: set[str | None] = {None}
        self._reaper: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()

    def key_of(self, job: Job) -> Key:
        """Which executor serves a job (see the module docstring)."""
        return (job.environment.digest if job.environment is not None else None,
                job.network.key if self.per_policy else ())

    async def start(self) -> None:
        """Start the default executor (a zygote: until ready or failed once), the idle check."""
        await self.default.start()
        self._reaper = asyncio.create_task(self._stop_idle())

    def configure(self, config: Config) -> None:
        """A reloaded config (SIGHUP): idle and LRU bounds, and each zygote's pool."""
        self.config = config
        pairs: list[tuple[Executor, Sequence[str]]] = [(self.default, config.preload)]
        for (environment, _), slot in self.slots.items():
            if environment is None:
                slot.preload = list(config.preload)
            pairs.append((slot.executor, slot.preload))
        for executor, preload in pairs:
            if isinstance(executor, ZygoteExecutor):  # restarts it if they changed
                executor.configure(preload, config.spares_min, config.spares_max)

    def status(self) -> dict[str, Any]:
        """The default executor's status, and each other executor's."""
        status = self.default.status()
        if self.slots:
            status["executors"] = [_describe(key, slot) for key, slot in self.slots.items()]
        return status

    def environment_status(self, digest: str) -> dict[str, Any] | None:
        """What `wfd ctl envs` says of an environment: its most recently used executor."""
        used = [(slot.last_used, key) for key, slot in self.slots.items() if key[0] == digest]
        if not used:
            return None
        key = max(used)[1]
        return {**_describe(key, self.slots[key]), "executors": len(used)}

    async def run(self, job: Job) -> Outcome:
        key = self.key_of(job)
        if key == self.default_key:
            return await self.default.run(job)
        try:
            slot = self._slot(key, job)
        except OSError as exc:
            return _not_started(exc)
        slot.running += 1
        slot.last_used = time.monotonic()
        try:
            if slot.ready:
                executor = slot.executor
            elif key[0] in self.proven:  # starting: a cold spawn now beats waiting for it
                executor = slot.fallback
            else:
                assert slot.started is not None
                try:
                    await asyncio.shield(slot.started)
                except Exception as exc:  # each job that waited records why
                    return _not_started(exc)
                executor = slot.executor
            return await executor.run(job)
        finally:
            slot.running -= 1
            slot.last_used = time.monotonic()

    def _slot(self, key: Key, job: Job) -> Slot:
        """The slot for `key`, made (and its start begun) if there is none."""
        environment = job.environment
        preload = sorted(set(job.preload)) if environment else list(self.config.preload)
        slot = self.slots.get(key)
        if slot is not None:
            if not set(preload) <= set(slot.preload) and isinstance(slot.executor,
                                                                    ZygoteExecutor):
                slot.preload = sorted({*slot.preload, *preload})  # restarts with the longer list
                slot.executor.configure(slot.preload, self.config.spares_min,
                                        self.config.spares_max)
            return slot
        isolation = self.isolation
        if environment is not None:
            interpreter = self.environments.interpreter_of(environment)
            if interpreter is None:
                raise OSError(f"environment {environment.digest} has no interpreter recorded")
            isolation = isolation.for_environment(environment.path, interpreter)
        self._make_room()
        policy = job.network if self.per_policy else self.default_policy
        slot = Slot(self.make(self.config, isolation, policy, preload),
                    SpawnExecutor(isolation), preload)
        slot.started = asyncio.create_task(self._start(key, slot, isolation, environment,
                                                       policy))
        slot.started.add_done_callback(_retrieve)
        self.slots[key] = slot
        logs.event("executor-starting", environment=key[0] or "default",
                   allow=",".join(key[1]))
        return slot

    async def _start(self, key: Key, slot: Slot, isolation: Isolation,
                     environment: Environment | None, policy: Policy) -> None:
        try:
            if environment is not None:
                await asyncio.to_thread(self.environments.refresh, environment)
            await slot.executor.start()
            checks = await selftest.run(slot.executor, isolation, self.config, policy)
        except BaseException:
            self._forget(key, slot)
            await slot.executor.close()
            raise
        failed = selftest.failures(checks)
        slot.self_test = "failed: " + ", ".join(failed) if failed else "passed"
        logs.event("executor-started", environment=key[0] or "default",
                   allow=",".join(key[1]), self_test=slot.self_test)
        if not failed or self.isolation.mode != "strict":  # best-effort serves anyway
            self.proven.add(key[0])
            if failed:
                logs.event("isolation-self-test-failed", level=logging.ERROR,
                           environment=key[0] or "default", serving="anyway",
                           failed=",".join(failed))
            return
        logs.event("isolation-self-test-failed", level=logging.ERROR,
                   environment=key[0] or "default", failed=",".join(failed))
        self.proven.discard(key[0])
        self._forget(key, slot)
        await slot.executor.close()
        raise OSError(f"the isolation self-test failed in environment {key[0] or 'default'}: "
                      f"{', '.join(failed)}")

    def _forget(self, key: Key, slot: Slot) -> None:
        if self.slots.get(key) is slot:
            del self.slots[key]

    def _make_room(self) -> None:
        """Below max_zygotes besides the default: stop the least recently used idle ones."""
        while len(self.slots) >= self.config.max_zygotes:
            idle = [(slot.last_used, key) for key, slot in self.slots.items()
                    if slot.running == 0 and slot.ready]
            if not idle:
                return  # all busy: run one more for a while; the idle check trims later
            self._stop(min(idle)[1], "the least recently used, to make room")

    async def _stop_idle(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            now = time.monotonic()
            for key, slot in list(self.slots.items()):
                if (slot.running == 0 and slot.ready
                        and now - slot.last_used >= self.config.env_idle_s):
                    self._stop(key, f"idle for {self.config.env_idle_s:g} s")

    def _stop(self, key: Key, why: str) -> None:
        """Forget the slot at once (its next job makes a new one); close it in the background."""
        slot = self.slots.pop(key)
        task = asyncio.create_task(slot.executor.close())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
        logs.event("executor-stopped", environment=key[0] or "default",
                   allow=",".join(key[1]), reason=why)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for key, slot in list(self.slots.items()):
            if slot.started is not None and not slot.started.done():
                slot.started.cancel()
                with contextlib.suppress(BaseException):
                    await slot.started
            if key in self.slots:
                self._stop(key, "the daemon is stopping")
        await asyncio.gather(*self._stopping, return_exceptions=True)
        await self.default.close()


def _not_started(exc: Exception) -> Outcome:
    return Outcome(Status.ERROR, 0.0, error=f"the execution's executor could not start: {exc}")


def _retrieve(task: "asyncio.Task[None]") -> None:
    """A failed start is reported to the jobs that waited for it, if any; never as unretrieved."""
    if not task.cancelled():
        task.exception()
