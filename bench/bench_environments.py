"""Workflow environments: build time, catch latency in an environment, zygote memory.

    .venv/bin/python bench/bench_environments.py      (or: make bench)

Starts a real daemon (zygote executor, strict isolation, a fresh data
directory and uv cache, so the first build downloads from the index) and
measures, in the same run:
  - deploy time of hrflow-connectors 4.28 (34 packages): a new environment
    with an empty cache, a new environment of a similar set with the cache
    warm (one package more), and a second deploy of the same set (reused);
  - p50/p90 of a catch request to a workflow importing hrflow_connectors
    (its environment's zygote warm) against a default-environment workflow
    importing hrflow, rounds interleaved;
  - the first request after the environment's zygote was stopped
    (env_idle_s): it runs cold-spawned in the environment while the
    zygote starts and self-tests again; next to the first request after
    a daemon restart, which waits for that start (nothing runs in an
    environment before a self-test passed in it since start-up);
  - the PSS of the environment's zygote and its spares, next to the
    default zygote's.
"""

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from bench_executors import Target, call, children, descendants, listening, rollup, wait_until

CONNECTORS = "hrflow-connectors==4.28.0"
IN_ENV = f'''# /// script
# dependencies = ["{CONNECTORS}"{{extra}}]
# ///
import hrflow_connectors.v2

def workflow(_request, settings):
    return {{{{"status_code": 200, "body": "ok"}}}}
'''
DEFAULT = '''import hrflow

def workflow(_request, settings):
    return {"status_code": 200, "body": "ok"}
'''
ROUNDS, PER_ROUND = 10, 40
IDLE_S = 2


class EnvTarget(Target):
    """The benchmark's daemon: no workflow of its own, a short env_idle_s."""

    def start(self) -> "EnvTarget":
        config = self.root / "env.toml"
        config.write_text(f'log_level = "warning"\nenv_idle_s = {IDLE_S}\n'
                          f'env_cache_dir = "{self.root / "uv-cache"}"\n')
        log = (self.root / "env.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wfd", "serve", "--config", str(config),
             "--data-dir", str(self.root / "data"), "--listen", f"127.0.0.1:{self.port}",
             "--socket", self.socket], stdout=log, stderr=log, start_new_session=True)
        wait_until(lambda: Path(self.socket).exists())
        return self

    def deploy(self, name: str, code: str) -> float:
        path = self.root / f"{name}.py"
        path.write_text(code)
        started = time.perf_counter()
        self.ctl("deploy", name, str(path), "--catch")
        return time.perf_counter() - started

    def envs(self) -> list[dict]:
        return json.loads(self.ctl("envs", "--json"))


def memory(pid: int) -> tuple[float, float, int]:
    """PSS of a zygote's python process and of everything below it (MiB), and how many."""
    while Path(f"/proc/{pid}/comm").read_text().strip() == "bwrap":
        pid = children(pid)[0]
    below = descendants(pid)
    return rollup(pid)[0] / 1024, sum(rollup(p)[0] for p in below) / 1024, len(below)


async def latencies(urls: dict[str, str]) -> dict[str, list[float]]:
    seen: dict[str, list[float]] = {name: [] for name in urls}
    async with aiohttp.ClientSession() as session:
        for url in urls.values():
            for _ in range(20):
                await call(session, url)
        for _ in range(ROUNDS):
            for name, url in urls.items():
                for _ in range(PER_ROUND):
                    seen[name].append((await call(session, url))[0])
    return seen


async def one(url: str) -> float:
    async with aiohttp.ClientSession() as session:
        return (await call(session, url))[0]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="wfd-bench-envs-") as tmp:
        target = EnvTarget("envs", Path(tmp)).start()
        try:
            builds = {
                "new environment, empty cache": target.deploy("conn", IN_ENV.format(extra="")),
                "new environment, warm cache (+1 package)": target.deploy(
                    "conn-six", IN_ENV.format(extra=', "six==1.17.0"')),
                "same set again (reused)": target.deploy("conn-2", IN_ENV.format(extra="")),
                "default environment (no packages)": target.deploy("plain", DEFAULT),
            }
            urls = {name: target.ctl("url", name).strip() for name in ("conn", "plain")}
            seen = asyncio.run(latencies(urls))
            [used] = [e for e in target.envs() if "conn" in e["workflows"]]
            env_zygote = memory(used["zygote"]["pid"])
            default_zygote = memory(json.loads(target.ctl("status", "--json"))["zygote_pid"])
            firsts: dict[str, list[float]] = {"idle": [], "restart": []}
            for _ in range(3):
                wait_until(lambda: all(e["zygote"]["state"] == "stopped"
                                       for e in target.envs()), timeout=60)
                firsts["idle"].append(asyncio.run(one(urls["conn"])))
                target.stop()
                target.start()
                wait_until(lambda: listening(target.port), timeout=60)
                firsts["restart"].append(asyncio.run(one(urls["conn"])))
        finally:
            target.stop()
    print("deploy (resolve, build, check) of hrflow-connectors 4.28:")
    for what, seconds in builds.items():
        print(f"  {what:44} {seconds:6.2f} s")
    print(f"catch latency, {ROUNDS} interleaved rounds of {PER_ROUND} (ms):")
    for name, label in (("conn", "imports hrflow_connectors (its env, warm)"),
                        ("plain", "imports hrflow (default environment)")):
        cuts = statistics.quantiles(seen[name], n=10)
        print(f"  {label:44} p50 {statistics.median(seen[name]):6.2f}  p90 {cuts[8]:6.2f}")
    print(f"  difference of p50: "
          f"{statistics.median(seen['conn']) - statistics.median(seen['plain']):+.2f} ms")
    for why, label in (("idle", "the env zygote stopped idle (cold spawn meanwhile)"),
                       ("restart", "a daemon restart (waits for the zygote)")):
        print(f"first request after {label}: "
              f"{', '.join(f'{ms:.0f}' for ms in firsts[why])} ms")
    for label, (own, below, count) in (("environment zygote", env_zygote),
                                       ("default zygote", default_zygote)):
        print(f"{label:20} PSS {own:6.1f} MiB; spares ({count} processes) {below:6.1f} MiB; "
              f"total {own + below:6.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
