"""Measure what each isolation layer adds to one execution's start-up.

Run as root from the repo root: `PYTHONPATH=. python bench/bench_isolation.py [runs]`.
Prints medians in milliseconds; docs/isolation.md quotes them.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

from wfd import bwrap, cgroups

PY = [sys.executable, "-I", "-c", "pass"]


def median_ms(fn: Callable[[], None], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def spawn(argv: list[str]) -> Callable[[], None]:
    return lambda: subprocess.run(argv, check=True)


def cgroup_cycle(backend: cgroups.CgroupBackend, join: bool) -> Callable[[], None]:
    """create + put a process in + kill + rmdir, the per-execution cgroup overhead."""

    def cycle() -> None:
        cg = backend.create(uuid.uuid4().hex[:12], 256 << 20, 64)
        if join:
            subprocess.run(cg.join_argv(["true"]), check=True)
        else:
            proc = subprocess.Popen(["true"])
            cg.add(proc.pid)
            proc.wait()
        cg.kill()
        cg.close()

    return cycle


def main(runs: int) -> None:
    prefix = bwrap.command(sys.executable, 64 << 20)
    plain = median_ms(spawn(PY), runs)
    sandboxed = median_ms(spawn([*prefix, *PY]), runs)
    print(f"python -I -c pass            {plain:7.1f} ms")
    print(f"  under bwrap (+setpriv)     {sandboxed:7.1f} ms  (+{sandboxed - plain:.1f})")
    backend = cgroups.detect()
    if backend is None:
        print("no writable cgroup tree: cgroup costs not measured")
        return
    cg = backend.create("bench-" + uuid.uuid4().hex[:8], 256 << 20, 64)
    joined = median_ms(spawn(cg.join_argv(PY)), runs)
    cg.close()
    true_ms = median_ms(spawn(["true"]), runs)
    print(f"  with cgroup join prefix    {joined:7.1f} ms  (+{joined - plain:.1f})")
    print(f"/bin/true alone              {true_ms:7.1f} ms")
    for join in (True, False):
        how = "sh join prefix" if join else "add(pid) after spawn"
        total = median_ms(cgroup_cycle(backend, join), runs)
        print(f"cgroup {backend.name} create+{how}+kill+rmdir {total:6.1f} ms (incl. true)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
