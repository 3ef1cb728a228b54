"""What a daemon holds before and after 1,000 hostile requests of each kind (SPEC 8).

    .venv/bin/python bench/bench_leaks.py [-n REQUESTS] [--executor E] [--kind K]...
    (make bench: -n 200)

For each executor ("zygote", then "spawn") a strict daemon is started on
loopback; for each kind in tests/leaks.py (bodies it must refuse, results a
child forges or mangles, settings nested too deep, a 5 MB exception) one
workflow is deployed and sent REQUESTS requests (default 1,000) from 8
clients at once. Printed per kind: how many answers were the expected one,
how many executions were recorded, and the daemon's descriptors, the
processes below it and its execution cgroups before and after (each
measured once the daemon is quiet). Any difference is a leak.
"""

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import Daemon  # the test suite's real-daemon driver
from leaks import KINDS, resources

CLIENTS = 8
CONFIG = """
executor = "{executor}"
spares_min = 2
spares_max = 2
queue_max = 1000
[limits]
timeout_s = 10
# Error and traceback are capped at this too: 1,000 records of a 5 MB error stay small.
output_kb = 64
[retention]
max_per_workflow = 100000
"""


def quiet(daemon: Daemon, timeout: float = 30.0) -> dict[str, int]:
    """Resources once two samples 0.5 s apart agree (connections closed, pool refilled)."""
    pid = daemon.process.pid
    previous, deadline = resources(pid), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        current = resources(pid)
        if current == previous:
            return current
        previous = current
    return previous


def measure(daemon: Daemon, kind: str, requests: int) -> dict[str, object]:
    spec = KINDS[kind]
    name = f"bench-{kind}"
    url = daemon.deploy(name, spec.code)
    spec.send(url)  # warm up: the workflow's first execution
    before = quiet(daemon)
    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(lambda _: spec.send(url), range(requests)))
    elapsed = time.monotonic() - started
    after = quiet(daemon)
    expected = sum(1 for a in answers if a.status_code == spec.http
                   and a.json().get("status") == (spec.status or "bad_request")
                   and a.headers.get("X-Wfd-Execution-Id"))
    recorded = len(daemon.executions(name, limit=requests + 10)) - (1 if spec.status else 0)
    return {"kind": kind, "expected": expected, "recorded": recorded, "before": before,
            "after": after, "seconds": elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--requests", type=int, default=1000)
    parser.add_argument("--executor", action="append", choices=("zygote", "spawn"))
    parser.add_argument("--kind", action="append", choices=sorted(KINDS))
    args = parser.parse_args()
    requests, leaked = args.requests, False
    header = (f"{'executor':8} {'kind':26} {'answered':>9} {'recorded':>9} "
              f"{'fds':>9} {'processes':>9} {'cgroups':>9} {'req/s':>6}")
    print(f"{requests} requests of each kind, {CLIENTS} clients; before -> after\n{header}")
    for executor in args.executor or ("zygote", "spawn"):
        with TemporaryDirectory() as scratch:
            daemon = Daemon(Path(scratch) / "data", CONFIG.format(executor=executor)).start()
            try:
                for kind in args.kind or KINDS:
                    row = measure(daemon, kind, requests)
                    b, a = row["before"], row["after"]
                    leaked |= b != a
                    cells = " ".join(f"{f'{b[k]}->{a[k]}':>9}"
                                     for k in ("fds", "processes", "cgroups"))
                    recorded = row["recorded"] if KINDS[kind].status else "-"
                    print(f"{executor:8} {kind:26} {row['expected']:>9} {recorded:>9} "
                          f"{cells} {requests / row['seconds']:>6.0f}", flush=True)
            finally:
                daemon.kill()
    print("LEAKED" if leaked else "nothing leaked")
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())
