"""What the shape of an execution's processes costs in CPU, from a zygote-sized interpreter.

    .venv/bin/python bench/bench_process_shapes.py [N]      (or: make bench)

The zygote preloads what the workflows import (hrflow, requests), so every
process forked from it copies its page tables and faults in the pages it
touches. This forks N executions of each shape, one after the other, and
reports the CPU of the parent and of the reaped children per execution, and
the children's page faults:

  - fork: one process (the zygote without isolation);
  - clone: one process made by clone(2) in new user, mount, PID and IPC
    namespaces, PID 1 of its own (`sandbox/isolate.py: fork_isolated`, a
    strict spare now);
  - unshare + fork: a process unshares the namespaces, and its child is PID 1;
  - unshare + init + execution: the same with an init above the execution
    (a strict spare before issue 15).

Each namespace shape maps its uid and mounts its /proc; each execution
touches a little memory, as a tiny workflow would. The rows share one run.
"""

import ctypes
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hrflow  # noqa: F401  (preloaded, as in the zygote)
import requests  # noqa: F401

from sandbox import isolate

ROUNDS = 2
WARMUP = 10
_libc = ctypes.CDLL(None, use_errno=True)
IDS = (os.getuid(), os.getgid())


def work() -> None:
    json.dumps({"items": list(range(200))})
    [object() for _ in range(2000)]


def wait(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def in_child(pid: int, child: Callable[[], int]) -> int:
    if pid == 0:
        code = 1
        try:
            code = child()
        finally:
            os._exit(code)
    return pid


def unshare() -> None:
    if _libc.unshare(isolate.NAMESPACES) != 0:
        raise OSError(ctypes.get_errno(), "unshare")


def execution() -> int:
    work()
    return 0


def isolated_execution() -> int:
    isolate.own_namespaces(*IDS)
    return execution()


def shape_fork() -> int:
    return wait(in_child(os.fork(), execution))


def shape_clone() -> int:
    return wait(in_child(isolate.fork_isolated(), isolated_execution))


def shape_unshare_fork() -> int:
    def spare() -> int:
        unshare()
        return wait(in_child(os.fork(), isolated_execution))
    return wait(in_child(os.fork(), spare))


def shape_init_execution() -> int:
    def spare() -> int:
        unshare()

        def init() -> int:
            isolate.own_namespaces(*IDS)
            return wait(in_child(os.fork(), execution))
        return wait(in_child(os.fork(), init))
    return wait(in_child(os.fork(), spare))


SHAPES = {
    "fork": shape_fork,
    "clone": shape_clone,
    "unshare + fork": shape_unshare_fork,
    "unshare + init + execution": shape_init_execution,
}


def usage() -> tuple[float, float, int]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return (own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime,
            children.ru_minflt)


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    gc.collect()
    gc.freeze()  # as the zygote does before forking
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    rss = pages * os.sysconf("SC_PAGE_SIZE") >> 20
    print(f"interpreter: {rss} MiB resident, {count} executions per shape and round")
    print(f"{'shape':<28} {'round':>5} {'parent ms':>10} {'children ms':>12} {'total ms':>9}"
          f" {'faults':>7} {'wall ms':>8}")
    for round_ in range(1, ROUNDS + 1):
        for name, shape in SHAPES.items():
            for _ in range(WARMUP):
                assert shape() == 0, name
            (own, children, faults), started = usage(), time.perf_counter()
            for _ in range(count):
                assert shape() == 0, name
            after = usage()
            wall = (time.perf_counter() - started) * 1000 / count
            parent_ms = (after[0] - own) * 1000 / count
            children_ms = (after[1] - children) * 1000 / count
            print(f"{name:<28} {round_:>5} {parent_ms:10.2f} {children_ms:12.2f}"
                  f" {parent_ms + children_ms:9.2f} {(after[2] - faults) / count:7.0f}"
                  f" {wall:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
