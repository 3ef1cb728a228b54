"""Blank cgroups for a zygote's spares, so that no cgroup move is left on a request's path.

On cgroup v1 a process joining a group waits for an RCU grace period
whenever no other move happened on the host in the last few milliseconds:
at a webhook's rate, several milliseconds on every request. So the daemon
makes groups ahead of time and hands them to the zygote (`cgroup`, with an
O_WRONLY `cgroup.procs` per hierarchy); each spare joins one as it is
forked. When a spare takes a job the zygote names its group (`started`),
and the daemon makes sure the group has that workflow's limits before it
feeds the job, so no workflow code ever runs under another's limits. One
pool of spares serves every limit: each blank group is made with the limits
the last execution asked for (most workflows share the defaults), and only
a job that asks for others has them written at hand-off.

Every group here is removed by the daemon: the execution's once it is over
(`wfd.executor.zygote`), a spare's that died unused when the zygote gives
it back (`cgroup_free`), the rest when the zygote exits.
"""

import asyncio
import os
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import orjson

from wfd import logs
from wfd.executor.base import ChildLost
from wfd.isolation.cgroups import CgroupError, ExecutionCgroup
from wfd.isolation.layers import GroupLimits


@dataclass(frozen=True)
class Blank:
    """A group made ahead of time, and the limits it was made with (None: a spare's own)."""

    cgroup: ExecutionCgroup
    limits: GroupLimits | None

    def needs(self, limits: GroupLimits) -> bool:
        """Whether `limits` must still be written before a job with them runs here."""
        return self.limits != limits


class SpareGroups:
    """The blank groups one zygote holds for its spares, and the runs waiting to learn theirs."""

    def __init__(self, channel: socket.socket,
                 make: Callable[[GroupLimits | None], ExecutionCgroup | None],
                 initial: int) -> None:
        self.channel = channel
        self.make = make
        self.initial = initial  # how many to stock once the zygote is ready
        self.enabled = True
        # The limits blank groups are made with from now on: the last run's.
        self.preset: GroupLimits | None = None
        self.blank: dict[str, Blank] = {}
        # Runs sent for a spare in a group, waiting for `started` (or `unjoined`).
        self.starting: dict[str, asyncio.Future[Blank | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def can_join(self) -> bool:
        """Whether a run may ask for a spare already in a group (else it brings its own)."""
        return self.enabled and len(self.blank) > len(self.starting)

    def expect(self, execution_id: str, limits: GroupLimits) -> "asyncio.Future[Blank | None]":
        """The group the zygote will name for this run, or None if it had none left.

        `limits` are the run's: the groups made from now on get them.
        """
        self.preset = limits
        named = asyncio.get_running_loop().create_future()
        self.starting[execution_id] = named
        return named

    def stock(self, count: int) -> None:
        """Make `count` blank groups and hand them over, in the background."""
        if self.enabled and count > 0:
            self._background(self._stock(count))

    def started(self, execution_id: str, name: str | None, kill: Callable[[], None]) -> None:
        """The run took a spare in group `name`: the execution's now; a new blank replaces it."""
        group = self.blank.pop(name, None) if name else None
        named = self.starting.pop(execution_id, None)
        if named is not None and not named.done():
            named.set_result(group)
        elif group is not None:  # its run was cancelled meanwhile: end it here
            kill()
            self._background(self._remove(group.cgroup))
        self.stock(1)

    def unjoined(self, execution_id: str) -> None:
        named = self.starting.pop(execution_id, None)
        if named is not None and not named.done():
            named.set_result(None)

    def freed(self, name: str, join_failed: bool) -> None:
        """A spare died unused (or could not join): remove its group, and replace it."""
        group = self.blank.pop(name, None)
        if group is not None:
            self._background(self._remove(group.cgroup))
        if join_failed and self.enabled:
            self.enabled = False
            logs.event("spare-cgroups-off", reason="a spare could not join its group; "
                       "executions join theirs at hand-off")
        self.stock(1)

    async def close(self, why: str) -> None:
        """The zygote is gone: fail the runs still waiting, remove every blank group."""
        self.enabled = False
        for named in self.starting.values():
            if not named.done():
                named.set_exception(ChildLost(why))
        self.starting.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        groups, self.blank = list(self.blank.values()), {}
        await asyncio.gather(*(self._remove(group.cgroup) for group in groups))

    async def _stock(self, count: int) -> None:
        try:
            for _ in range(count):
                if not await self._hand_one():
                    return
        except (OSError, CgroupError) as exc:  # no group now: runs bring their own
            logs.event("spare-cgroup-failed", error=str(exc))

    async def _hand_one(self) -> bool:
        """Make one blank group and send it to the zygote; False once there is no point."""
        limits = self.preset
        group = await asyncio.to_thread(self.make, limits)
        if group is None:
            return False
        if not self.enabled:
            await self._remove(group)
            return False
        try:
            fds = group.open_procs()
        except OSError:
            await self._remove(group)
            raise
        name = group.dirs[0].name
        # From here on, `close` or the zygote's answers remove it.
        self.blank[name] = Blank(group, limits)
        try:
            socket.send_fds(self.channel, [orjson.dumps({"op": "cgroup", "name": name})], fds)
        except OSError:
            return False  # the zygote is gone
        finally:
            for fd in fds:
                os.close(fd)
        return True

    async def _remove(self, group: ExecutionCgroup) -> None:
        try:
            await asyncio.to_thread(group.close)
        except CgroupError as exc:
            logs.event("spare-cgroup-kept", path=str(group.dirs[0]), error=str(exc))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
