"""Executors: the ways an execution's child process is started.

`EXECUTORS` is the one map from the config's `executor` string to an
implementation; the rest of the daemon sees only the `Executor` interface.
"""

from collections.abc import Callable, Sequence
from dataclasses import replace

from wfd.config import Config
from wfd.executor.base import ChildLost, Executor, Job, Outcome
from wfd.executor.spawn import SpawnExecutor
from wfd.executor.zygote import ZygoteExecutor
from wfd.isolation.layers import Isolation

__all__ = ["EXECUTORS", "ChildLost", "Executor", "Job", "Outcome", "SpawnExecutor",
           "ZygoteExecutor", "make_executor"]

EXECUTORS: dict[str, Callable[[Config, Isolation], Executor]] = {
    "spawn": lambda config, isolation: SpawnExecutor(isolation),
    "zygote": lambda config, isolation: ZygoteExecutor(
        config.preload, config.spares_min, config.spares_max, isolation, config.files_root),
}


def make_executor(config: Config, isolation: Isolation,
                  preload: Sequence[str] | None = None) -> Executor:
    """The executor the config names; constructing it starts nothing.

    Both give an execution the same layers: the zygote runs under the same
    bwrap view, and each child builds its own namespaces and joins its own
    cgroup (docs/isolation.md, "The zygote"). A zygote that cannot boot so
    leaves its executions to cold spawn, still isolated. With `preload`, the
    executor of a workflow environment (wfd/executor/envs.py), preloading
    its own modules.
    """
    if preload is not None:
        config = replace(config, preload=tuple(preload))
    return EXECUTORS[config.executor](config, isolation)
