"""Executors: the ways an execution's child process is started.

`EXECUTORS` is the one map from the config's `executor` string to an
implementation; the rest of the daemon sees only the `Executor` interface,
behind the router (router.py) that keeps one per environment and policy.
"""

from collections.abc import Callable, Sequence

from wfd.config import Config
from wfd.executor.base import ChildLost, Executor, Job, JobError, Outcome
from wfd.executor.spawn import SpawnExecutor
from wfd.executor.zygote import ZygoteExecutor
from wfd.isolation.layers import Isolation
from wfd.isolation.network import Policy

__all__ = ["EXECUTORS", "ChildLost", "Executor", "Job", "JobError", "Outcome", "SpawnExecutor",
           "ZygoteExecutor", "make_executor"]

EXECUTORS: dict[str, Callable[[Config, Isolation, Policy, Sequence[str]], Executor]] = {
    "spawn": lambda config, isolation, policy, preload: SpawnExecutor(isolation),
    "zygote": lambda config, isolation, policy, preload: ZygoteExecutor(
        preload, config.spares_min, config.spares_max, isolation, policy, config.files_root),
}


def make_executor(config: Config, isolation: Isolation, policy: Policy,
                  preload: Sequence[str]) -> Executor:
    """The executor the config names, for one environment and policy; it starts nothing.

    Both give an execution the same layers: the zygote runs under the same
    bwrap view, and each child builds its own namespaces and joins its own
    cgroup (docs/isolation.md, "The zygote"). A zygote that cannot boot so
    leaves its executions to cold spawn, still isolated. `isolation` is
    around the environment's interpreter; a zygote's network namespace
    serves `policy` (a cold spawn takes each job's), and it preloads `preload`.
    """
    return EXECUTORS[config.executor](config, isolation, policy, preload)
