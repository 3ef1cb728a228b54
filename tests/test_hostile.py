"""The hostile suite: workflows that attack the sandbox, each run through a real daemon.

Every case checks the recorded status, the HTTP status the caller got, and
that a canary workflow still answers afterwards. The daemon runs with the
default `isolation = "strict"`: bwrap, an unprivileged uid and (on CI's cgroup
v1 hosts, or a delegated v2 subtree) a per-execution cgroup. Nothing here is
skipped when a layer is missing: the daemon refuses to start instead, and the
test fails. Processes the tests must find on the host name themselves with
PR_SET_NAME (their `comm`), since pids inside the sandbox are not host pids.
"""

import contextlib
import json
import os
import secrets
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import Daemon, wait_for

CANARY = 'def workflow(_request, settings):\n    return {"status_code": 200, "body": "alive"}\n'
CONFIG = """
[limits]
timeout_s = 5
memory_mb = 512
file_size_mb = 16
tmp_mb = 32
"""
# The executors the suite runs against: every attack, both ways an execution starts.
EXECUTORS = ["spawn", "zygote"]
# What runs above the workflow's process in its own PID namespace: bwrap as
# PID 1 for a cold spawn; nothing for a forked one, which is its own PID 1
# (sandbox/spare.py).
ABOVE = {"spawn": ["bwrap"], "zygote": []}
SET_COMM = """
import ctypes
def set_comm(name):
    ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME
"""


@pytest.fixture(scope="module", params=EXECUTORS)
def hostile(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One strict daemon per executor, with small limits so each attack ends fast."""
    daemon = Daemon(tmp_path_factory.mktemp(f"hostile-{request.param}") / "data",
                    f'executor = "{request.param}"\n{CONFIG}').start()
    status = daemon.ctl_json("status")
    assert status["isolation"]["executor"] == request.param
    # Forked from the zygote, not its cold-spawn fallback, or the zygote is untested.
    assert status.get("zygote_state", "ready") == "ready", status
    yield daemon
    daemon.kill()


@pytest.fixture(scope="module")
def canary(hostile: Daemon) -> str:
    return hostile.deploy(f"canary-{secrets.token_hex(4)}", CANARY)


def comm_token() -> str:
    """A process name (at most 15 bytes) unique to one test."""
    return "wfd" + secrets.token_hex(6)


def host_pids(comm: str) -> list[int]:
    """Live host processes named `comm` (zombies awaiting a reaper do not count)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or (entry / "comm").read_text().strip() != comm:
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def call(daemon: Daemon, name: str, code: str, *flags: str, data: dict | None = None
         ) -> tuple[requests.Response, dict]:
    """Deploy `code`, POST `data` to it, return the response and the stored record."""
    url = daemon.deploy(name, code, *flags)
    response = requests.post(url, json=data or {}, timeout=60)
    return response, daemon.logs(response.headers["X-Wfd-Execution-Id"])


def assert_contained(response: requests.Response, record: dict, status: str, http: int,
                     canary: str, error: str | None = None) -> None:
    assert (record["status"], record["http_status"]) == (status, http), record
    assert response.status_code == http
    if status != "success" and http >= 500:
        assert response.json() == {"status": status, "execution_id": record["id"]}
    if error is not None:
        assert error in (record["error"] or ""), record
    alive = requests.post(canary, json={}, timeout=30)
    assert (alive.status_code, alive.text) == (200, "alive")


def workflow(body: str, prelude: str = "") -> str:
    """A catch workflow whose body is `body` (written at column 0, indented here)."""
    return (f"{textwrap.dedent(prelude)}\n"
            f"def workflow(_request, settings):\n{textwrap.indent(textwrap.dedent(body), '    ')}")


# ------------------------------------------------------------------ limits

MEMORY_CASES = {
    "at-once": ("x = bytearray(4 * 1024 ** 3)", "MemoryError"),
    "by-growth": ("chunks = []\nwhile True:\n    chunks.append(bytearray(10 * 1024 ** 2))",
                  "MemoryError"),
    "over-threads": ("""
        import threading
        from concurrent.futures import ThreadPoolExecutor
        # All four threads exist before any allocates: a thread started once
        # memory is gone fails to start (RuntimeError), which is not the point.
        started = threading.Barrier(4)
        def grow():
            started.wait()
            chunks = []
            while True:
                chunks.append(bytearray(10 * 1024 ** 2))
        with ThreadPoolExecutor(4) as pool:
            for future in [pool.submit(grow) for _ in range(4)]:
                future.result()
        """, "MemoryError"),
    # Each child stays under RLIMIT_DATA; together they pass the cgroup's cap,
    # and the kernel OOM-kills one: only the cgroup can tell that was memory.
    "over-forked-children": ("""
        import os, time
        pids = []
        for _ in range(4):
            pid = os.fork()
            if pid == 0:
                data = b"\\x01" * (100 << 20)
                time.sleep(3)
                os._exit(0)
            pids.append(pid)
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status):
                raise RuntimeError(f"worker {pid} killed by signal {os.WTERMSIG(status)}")
        """, "memory limit of 256 MiB was reached"),
}


@pytest.mark.parametrize("case", MEMORY_CASES)
def test_memory_bombs_are_recorded_as_memory(hostile, canary, name, case):
    body, error = MEMORY_CASES[case]
    response, record = call(hostile, name, workflow(body), "--memory", "256")
    assert_contained(response, record, "memory", 500, canary, error)


def test_fork_bomb_is_capped_by_the_pids_cgroup(hostile, canary, name):
    comm = comm_token()
    code = workflow(f"""
        set_comm({comm!r})
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """, prelude=SET_COMM + "import os")
    url = hostile.deploy(name, code, "--timeout", "2")
    peak = 0
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(requests.post, url, json={}, timeout=60)
        while not future.done():
            peak = max(peak, len(host_pids(comm)))
        response = future.result()
    record = hostile.logs(response.headers["X-Wfd-Execution-Id"])
    assert 1 < peak <= 128, peak  # it did fork, and no further than processes = 128
    assert_contained(response, record, "timeout", 504, canary)
    assert host_pids(comm) == []


def test_cpu_spin_is_recorded_as_cpu(hostile, canary, name):
    response, record = call(hostile, name, workflow("while True:\n    pass"),
                            "--cpu", "1", "--timeout", "10")
    assert_contained(response, record, "cpu", 500, canary, "CPU time limit of 1 s")
    assert record["duration_ms"] < 5000


def test_sigxcpu_left_to_its_default_ends_as_cpu(hostile, canary, name):
    # A forked execution is its PID namespace's init, which the kernel would
    # spare this signal's default; the verdict must not depend on that.
    code = workflow("""
        os.kill(os.getpid(), signal.SIGXCPU)
        time.sleep(1)
        return {"status_code": 200, "body": "survived"}
        """, prelude="import os, signal, time")
    response, record = call(hostile, name, code)
    assert_contained(response, record, "cpu", 500, canary, "CPU time limit")


def test_sigxcpu_caught_and_ignored_still_ends_as_cpu(hostile, canary, name):
    code = workflow("signal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass",
                    prelude="import signal")
    response, record = call(hostile, name, code, "--cpu", "1", "--timeout", "10")
    assert_contained(response, record, "cpu", 500, canary, "CPU time limit")
    assert record["duration_ms"] < 6000


def test_sleep_ignoring_sigterm_is_killed_at_the_timeout(hostile, canary, name):
    code = workflow("signal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)",
                    prelude="import signal, time")
    url = hostile.deploy(name, code, "--timeout", "1")
    started = time.monotonic()
    response = requests.post(url, json={}, timeout=60)
    elapsed = time.monotonic() - started
    record = hostile.logs(response.headers["X-Wfd-Execution-Id"])
    assert_contained(response, record, "timeout", 504, canary, "timed out after 1 s")
    # SIGTERM is not what ends it: the kill at the deadline is, within what a user accepts.
    assert 1000 <= record["duration_ms"] < 1500
    assert elapsed < 1.5, elapsed


def test_double_forked_setsid_survivor_is_gone_afterwards(hostile, canary, name):
    comm = comm_token()
    code = workflow(f"""
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                set_comm({comm!r})
                null = os.open(os.devnull, os.O_RDWR)
                for fd in range(3):
                    os.dup2(null, fd)
                os.closerange(3, 1024)
                time.sleep(300)
            os._exit(0)
        os.wait()
        while not any(open(f"/proc/{{p}}/comm").read().strip() == {comm!r}
                      for p in os.listdir("/proc") if p.isdigit()):
            time.sleep(0.01)
        return {{"status_code": 200, "body": "left one behind"}}
        """, prelude=SET_COMM + "import os, time")
    response, record = call(hostile, name, code)
    assert response.text == "left one behind"
    assert_contained(response, record, "success", 200, canary)
    wait_for(lambda: host_pids(comm) == [], timeout=5, what=f"{comm} gone from /proc")


def test_a_2_gb_file_write_stops_at_the_file_size_limit(hostile, canary, name):
    code = workflow("""
        with open("/tmp/big", "wb") as f:
            for _ in range(2048):
                f.write(b"\\0" * (1 << 20))
        """)
    response, record = call(hostile, name, code)
    assert_contained(response, record, "error", 500, canary, "[Errno 27] File too large")


def test_filling_tmp_with_small_files_stops_at_its_size(hostile, canary, name):
    code = workflow("""
        for i in range(1_000_000):
            with open(f"/tmp/f{i}", "wb") as f:
                f.write(b"x" * 4096)
        """)
    response, record = call(hostile, name, code)
    assert_contained(response, record, "error", 500, canary, "[Errno 28] No space left")


def test_100k_open_files_stop_at_the_open_files_limit(hostile, canary, name):
    code = workflow('files = [open("/dev/null") for _ in range(100_000)]')
    response, record = call(hostile, name, code)
    assert_contained(response, record, "error", 500, canary, "[Errno 24] Too many open files")


# ------------------------------------------------------------------ what it can see

PROBE_PATH = workflow("""
    try:
        if _request.get("list"):
            os.listdir(_request["path"])
        elif _request.get("connect"):
            socket.socket(socket.AF_UNIX).connect(_request["path"])
        else:
            open(_request["path"], _request.get("mode", "rb")).close()
    except OSError as exc:
        return {"status_code": 200, "body": type(exc).__name__}
    return {"status_code": 200, "body": "OPENED"}
    """, prelude="import os, socket")


def secret_paths(daemon: Daemon) -> dict[str, dict]:
    data = daemon.data_dir.resolve()
    return {
        "sqlite-file": {"path": str(data / "wfd.db")},
        "data-dir-listing": {"path": str(data), "list": True},
        "daemon-environ": {"path": f"/proc/{daemon.process.pid}/environ"},
        "etc-shadow": {"path": "/etc/shadow"},
        "config-file": {"path": str(daemon.config_file.resolve())},
        "ctl-socket": {"path": daemon.socket, "connect": True},
        "proc-sys-write": {"path": "/proc/sys/vm/drop_caches", "mode": "wb"},
    }


@pytest.mark.parametrize("target", ["sqlite-file", "data-dir-listing", "daemon-environ",
                                    "etc-shadow", "config-file", "ctl-socket",
                                    "proc-sys-write"])
def test_secrets_are_out_of_reach(hostile, canary, name, target):
    request = secret_paths(hostile)[target]
    assert os.path.exists(request["path"]) or target == "etc-shadow"
    response, record = call(hostile, name, PROBE_PATH, data=request)
    assert response.text in ("FileNotFoundError", "PermissionError"), response.text
    assert_contained(response, record, "success", 200, canary)


def test_proc_lists_only_the_executions_own_processes(hostile, canary, name):
    code = workflow("""
        child = subprocess.Popen(["sleep", "30"])
        while open(f"/proc/{child.pid}/comm").read().strip() != "sleep":
            time.sleep(0.005)  # forked, not yet exec'd
        seen = {int(p): open(f"/proc/{p}/comm").read().strip()
                for p in os.listdir("/proc") if p.isdigit()}
        seen[os.getpid()] = "workflow"
        child.kill()
        return {"status_code": 200, "body": json.dumps(seen)}
        """, prelude="import json, os, subprocess, time")
    response, record = call(hostile, name, code)
    executor = hostile.ctl_json("status")["executor"]
    expected = [*ABOVE[executor], "workflow", "sleep"]
    assert response.json() == {str(pid): comm for pid, comm in enumerate(expected, 1)}
    assert_contained(response, record, "success", 200, canary)


def test_the_python_runtime_is_read_only(hostile, canary, name):
    target = Path(sys.prefix) / f"wfd-hostile-{secrets.token_hex(4)}"
    code = workflow(f"""
        try:
            open({str(target)!r}, "w").write("owned")
        except OSError as exc:
            return {{"status_code": 200, "body": errno.errorcode[exc.errno]}}
        """, prelude="import errno")
    response, record = call(hostile, name, code)
    assert response.text == "EROFS"
    assert not target.exists()
    assert_contained(response, record, "success", 200, canary)


def test_it_runs_as_an_unprivileged_uid_without_capabilities(hostile, canary, name):
    code = workflow("""
        caps = next(l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff"))
        return {"status_code": 200, "body": f"{os.getuid()} {os.geteuid()} {caps}"}
        """, prelude="import os")
    response, record = call(hostile, name, code)
    assert response.text == "65534 65534 0000000000000000"
    assert_contained(response, record, "success", 200, canary)


def test_no_namespace_of_its_own_to_mount_a_tmpfs_past_the_cap(hostile, canary, name):
    # A user namespace would give it the capabilities to mount a tmpfs of any
    # size (100 MB here, past tmp_mb = 32), or a network namespace of its own: refused outright,
    # directly and through a program; threads and fork still work.
    code = workflow("""
        tool = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
             "mount -t tmpfs -o size=400m none /tmp && for i in 1 2 3 4 5 6 7 8 9 10; do "
             "dd if=/dev/zero of=/tmp/$i bs=1M count=10 || exit 3; done && echo WROTE"],
            capture_output=True, text=True)
        seen = {"tool": (tool.returncode, "WROTE" in tool.stdout)}
        libc = ctypes.CDLL(None, use_errno=True)
        for label, flags in (("user", 0x10000000), ("user+mount", 0x10020000),
                             ("net", 0x40000000)):
            seen[label] = errno.errorcode.get(ctypes.get_errno()) \\
                if libc.unshare(flags) else "created"
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        seen["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        return {"status_code": 200, "body": json.dumps(seen)}
        """, prelude="import ctypes, errno, json, os, subprocess, threading")
    response, record = call(hostile, name, code)
    assert response.json() == {"user": "EPERM", "user+mount": "EPERM", "net": "EPERM",
                               "tool": [1, False], "fork": 7}, response.text
    assert_contained(response, record, "success", 200, canary)


def test_a_loopback_service_is_reachable_only_on_the_port_allowed(hostile, canary, name,
                                                                   standin):
    server, other = standin(), standin()
    for each in (server, other):
        each.routes[("GET", "/ping")] = (200, {}, "pong")
    code = workflow("""
        seen = [requests.get(_request["url"], timeout=10).text]
        try:
            requests.get(_request["other"], timeout=10)
            seen.append("reached")
        except requests.ConnectionError as exc:
            seen.append(type(exc.args[0].reason).__name__)
        return {"status_code": 200, "body": json.dumps(seen)}
        """, prelude="import json, requests")
    response, record = call(hostile, name, code, *server.allow_net,
                            data={"url": f"{server.url}/ping", "other": f"{other.url}/ping"})
    assert response.json() == ["pong", "NewConnectionError"]
    assert other.requests == []
    assert_contained(response, record, "success", 200, canary)


def test_the_environment_is_scrubbed(hostile, canary, name):
    code = workflow('return {"status_code": 200, "body": json.dumps(dict(os.environ))}',
                    prelude="import json, os")
    response, record = call(hostile, name, code)
    assert sorted(response.json()) == ["HOME", "LANG", "PATH", "PWD", "TMPDIR", "WFD_WORKFLOW_DIR"]
    assert response.json()["HOME"] == response.json()["TMPDIR"] == "/tmp"
    assert_contained(response, record, "success", 200, canary)


# ------------------------------------------------------------------ broken ends

BROKEN = {
    "os-exit-0": ("os._exit(0)", "the process exited with code 0 without reporting a result"),
    "segfault-via-ctypes": ("ctypes.string_at(0)", "the process was killed by SIGSEGV"),
    "closes-every-fd-then-returns": ("os.closerange(0, 65536)\nreturn None",
                                     "without reporting a result"),
    "returns-a-100-mb-body": ('return {"status_code": 200, "body": "x" * (100 << 20)}',
                              "body is 104857600 bytes, over the limit"),
    "settings-with-nan": ('settings["ratio"] = float("nan")',
                          "settings['ratio'] is not JSON-serializable"),
    "settings-with-a-set": ('settings["tags"] = {"a", "b"}',
                            "settings['tags'] is not JSON-serializable"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_endings_are_errors(hostile, canary, name, case):
    body, error = BROKEN[case]
    response, record = call(hostile, name, workflow(body, prelude="import ctypes, os"))
    assert_contained(response, record, "error", 500, canary, error)
    assert hostile.ctl_json("settings", name) == {}


def test_a_printed_fake_result_is_only_output(hostile, canary, name):
    fake = json.dumps({"outcome": "success", "settings": {"set": {"admin": True}, "unset": []},
                       "response": {"status_code": 299, "body": "forged", "headers": {}}})
    code = workflow(f"""
        print({fake!r}, flush=True)
        os.write(1, {fake!r}.encode())
        os.write(2, {fake!r}.encode())
        return {{"status_code": 201, "body": "real"}}
        """, prelude="import os")
    response, record = call(hostile, name, code)
    assert (response.status_code, response.text) == (201, "real")
    assert_contained(response, record, "success", 201, canary)
    assert "forged" in hostile.logs(record["id"])["output"]
    assert hostile.ctl_json("settings", name) == {}


# ------------------------------------------------------------------ nothing carries over

def test_a_global_is_not_seen_by_the_next_execution(hostile, canary, name):
    code = workflow("STATE.append(1)\nreturn {'status_code': 200, 'body': str(len(STATE))}",
                    prelude="STATE = []")
    url = hostile.deploy(name, code)
    bodies = [requests.post(url, json={}, timeout=30) for _ in range(2)]
    assert [b.text for b in bodies] == ["1", "1"]
    record = hostile.logs(bodies[1].headers["X-Wfd-Execution-Id"])
    assert_contained(bodies[1], record, "success", 200, canary)


def test_a_tmp_file_is_not_seen_by_the_next_execution(hostile, canary, name):
    code = workflow("""
        found = sorted(os.listdir("/tmp")) + sorted(os.listdir("."))
        open("/tmp/left-behind", "w").write("x")
        open("here-too", "w").write("x")
        return {"status_code": 200, "body": json.dumps(found)}
        """, prelude="import json, os")
    url = hostile.deploy(name, code)
    bodies = [requests.post(url, json={}, timeout=30) for _ in range(2)]
    first, second = (b.json() for b in bodies)
    # The same fresh view each time (a runtime bound under /tmp, where a
    # checkout may live, shows in both), and nothing the first one left.
    assert first == second
    assert not {"left-behind", "here-too"} & set(second)
    record = hostile.logs(bodies[1].headers["X-Wfd-Execution-Id"])
    assert_contained(bodies[1], record, "success", 200, canary)


def test_no_writable_place_is_shared_with_the_next_execution(hostile, canary, name):
    """Wherever one execution can write, the next one must not find it (forked: one view)."""
    code = workflow("""
        places = ["/", "/dev", "/dev/shm", "/dev/mqueue", "/tmp", "/var/tmp", "/run"]
        found = [p for p in places if os.path.exists(os.path.join(p, "wfd-left-behind"))]
        for place in places:
            try:
                open(os.path.join(place, "wfd-left-behind"), "w").close()
            except OSError:
                pass
        return {"status_code": 200, "body": json.dumps(found)}
        """, prelude="import json, os")
    url = hostile.deploy(name, code)
    bodies = [requests.post(url, json={}, timeout=30) for _ in range(2)]
    assert [b.json() for b in bodies] == [[], []]
    record = hostile.logs(bodies[1].headers["X-Wfd-Execution-Id"])
    assert_contained(bodies[1], record, "success", 200, canary)


def test_a_sysv_shared_memory_segment_is_not_seen_by_the_next_execution(hostile, canary,
                                                                         name):
    """SysV IPC outlives its processes: each execution needs an IPC namespace of its own."""
    code = workflow("""
        libc = ctypes.CDLL(None, use_errno=True)
        found = libc.shmget(0x57464421, 0, 0) != -1
        if libc.shmget(0x57464421, 4096, 0o1600) == -1:  # IPC_CREAT | 0600
            raise OSError(ctypes.get_errno(), "shmget")
        return {"status_code": 200, "body": json.dumps(found)}
        """, prelude="import ctypes, json")
    url = hostile.deploy(name, code)
    bodies = [requests.post(url, json={}, timeout=30) for _ in range(2)]
    assert [b.json() for b in bodies] == [False, False]
    record = hostile.logs(bodies[1].headers["X-Wfd-Execution-Id"])
    assert_contained(bodies[1], record, "success", 200, canary)


# ------------------------------------------------------------------ the daemon dies

@pytest.mark.parametrize("executor", EXECUTORS)
def test_sigkill_of_the_daemon_leaves_nothing_running(make_daemon, name, executor):
    daemon = make_daemon(f'executor = "{executor}"\n{CONFIG}')
    comm = comm_token()
    code = workflow(f"""
        set_comm({comm!r})
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(300)
            os._exit(0)
        time.sleep(300)
        """, prelude=SET_COMM + "import os, time")
    url = daemon.deploy(name, code, "--timeout", "300")
    callers = [threading.Thread(target=_post_ignoring_errors, args=(url,)) for _ in range(2)]
    for caller in callers:
        caller.start()
    # Two executions, each its workflow process and a setsid grandchild.
    wait_for(lambda: len(host_pids(comm)) == 4, timeout=15, what="4 workflow processes")
    os.kill(daemon.process.pid, signal.SIGKILL)
    daemon.process.wait(10)
    wait_for(lambda: host_pids(comm) == [], timeout=10, what="every execution gone")
    for caller in callers:
        caller.join(30)
    restarted = make_daemon(f'executor = "{executor}"\n{CONFIG}', data_dir=daemon.data_dir)
    canary = restarted.deploy(f"{name}-canary", CANARY)
    assert requests.post(canary, json={}, timeout=30).text == "alive"


def _post_ignoring_errors(url: str) -> None:
    """A caller whose daemon is about to die: the connection error is the point."""
    with contextlib.suppress(requests.ConnectionError):
        requests.post(url, json={}, timeout=60)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_flood_beyond_the_queue_gets_503_with_retry_after(make_daemon, name, executor):
    daemon = make_daemon(f'executor = "{executor}"\nglobal_concurrency = 1\nqueue_max = 2\n')
    url = daemon.deploy(name, """
        import time
        def workflow(_request, settings):
            time.sleep(1.5)
        """)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(requests.post, url, json={}) for _ in range(6)]
        started = time.monotonic()
        responses = [f.result() for f in futures]
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 3 and codes.count(503) >= 1, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["status"] == "overloaded"
    assert time.monotonic() - started < 30
    assert requests.post(url, json={}).status_code == 200
