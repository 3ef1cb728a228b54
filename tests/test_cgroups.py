"""cgroups: the v2 backend against a fake cgroupfs, the v1 backend against this kernel."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from helpers import pid_alive, pid_gone

from sandbox import protocol
from wfd.isolation import cgroups

# ---------------------------------------------------------------- v2, fake cgroupfs


def make_fake_v2(tmp_path: Path, controllers: str = "cpu io memory pids") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    own = root / "system.slice" / "wfd.service"
    own.mkdir(parents=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (own / "cgroup.controllers").write_text(controllers + "\n")
    (own / "cgroup.subtree_control").write_text("")
    (own / "cgroup.procs").write_text("4242\n")
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text("0::/system.slice/wfd.service\n")
    return root, self_cgroup


def test_v2_detect_moves_daemon_into_leaf_and_enables_controllers(tmp_path: Path) -> None:
    root, self_cgroup = make_fake_v2(tmp_path)
    backend = cgroups.detect(root, self_cgroup, pid=4242)
    own = root / "system.slice" / "wfd.service"
    assert isinstance(backend, cgroups.V2Backend)
    assert (own / "daemon" / "cgroup.procs").read_text() == "4242"
    assert (own / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert backend.describe() == {
        "cgroup": "v2",
        "path": str(own),
        "controllers": ["cpu", "memory", "pids"],
    }


def test_v2_create_writes_limits(tmp_path: Path) -> None:
    backend = cgroups.detect(*make_fake_v2(tmp_path), pid=1)
    assert backend is not None
    cg = backend.create("01J0ABC", memory_bytes=64 << 20, pids_max=32, cpu_quota=0.5)
    (leaf,) = cg.dirs
    assert leaf.name == "exec-01J0ABC"
    assert (leaf / "memory.max").read_text() == str(64 << 20)
    assert (leaf / "memory.swap.max").read_text() == "0"
    assert (leaf / "memory.oom.group").read_text() == "1"
    assert (leaf / "pids.max").read_text() == "32"
    assert (leaf / "cpu.max").read_text() == "50000 100000"


def test_v2_kill_writes_cgroup_kill(tmp_path: Path) -> None:
    backend = cgroups.detect(*make_fake_v2(tmp_path), pid=1)
    assert backend is not None
    cg = backend.create("k1", memory_bytes=1 << 20, pids_max=4)
    (cg.dirs[0] / "cgroup.procs").write_text("")
    cg.kill(timeout_s=1)
    assert (cg.dirs[0] / "cgroup.kill").read_text() == "1"


@pytest.mark.parametrize(("oom_kill", "expected"), [(0, False), (2, True)])
def test_v2_memory_oom_reads_memory_events(tmp_path: Path, oom_kill: int, expected: bool) -> None:
    backend = cgroups.detect(*make_fake_v2(tmp_path), pid=1)
    assert backend is not None
    cg = backend.create("m1", memory_bytes=1 << 20, pids_max=4)
    events = f"low 0\nhigh 0\nmax 7\noom 1\noom_kill {oom_kill}\noom_group_kill 0\n"
    (cg.dirs[0] / "memory.events").write_text(events)
    assert cg.memory_oom() is expected


def test_detect_none_without_memory_controller(tmp_path: Path) -> None:
    root, self_cgroup = make_fake_v2(tmp_path, controllers="cpu io")
    assert cgroups.detect(root, self_cgroup, pid=1) is None


def test_unsafe_exec_id_rejected(tmp_path: Path) -> None:
    backend = cgroups.detect(*make_fake_v2(tmp_path), pid=1)
    assert backend is not None
    with pytest.raises(ValueError):
        backend.create("../escape", memory_bytes=1 << 20, pids_max=4)


# ---------------------------------------------------------------- v1, real kernel


@pytest.fixture
def v1() -> Iterator[cgroups.V1Backend]:
    """The real backend on this host; CI is the same kind of host, so absence is a failure."""
    backend = cgroups.detect()
    if not isinstance(backend, cgroups.V1Backend):
        pytest.fail(f"expected writable cgroup v1 pids+memory on this host, got {backend!r}")
    yield backend
    backend.close()


@pytest.fixture
def make_cg(v1: cgroups.CgroupBackend) -> Iterator:
    made: list[cgroups.ExecutionCgroup] = []

    def create(memory_bytes: int = 256 << 20, pids_max: int = 64) -> cgroups.ExecutionCgroup:
        cg = v1.create(uuid.uuid4().hex[:12], memory_bytes, pids_max)
        made.append(cg)
        return cg

    yield create
    for cg in made:
        cg.close()
    assert all(not d.exists() for cg in made for d in cg.dirs)


def run_in(cg: cgroups.ExecutionCgroup, code: str, timeout_s: float = 30) -> subprocess.Popen:
    argv = cg.join_argv([sys.executable, "-I", "-c", textwrap.dedent(code)])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def test_join_happens_before_exec(make_cg) -> None:
    cg = make_cg()
    proc = subprocess.run(
        cg.join_argv(["cat", "/proc/self/cgroup"]), capture_output=True, text=True
    )
    assert proc.returncode == 0
    exec_name = cg.dirs[0].name
    joined = [line for line in proc.stdout.splitlines() if line.endswith(exec_name)]
    assert {line.split(":")[1] for line in joined} >= {"pids", "memory"}


def test_join_failure_has_its_own_exit_code(make_cg) -> None:
    cg = make_cg()
    cg.dirs[0] = cg.dirs[0].parent / "does-not-exist"
    proc = subprocess.run(cg.join_argv(["true"]), capture_output=True)
    cg.dirs.pop(0)
    assert proc.returncode == protocol.EXIT_JOIN_FAILED


def test_fork_bomb_stopped_at_pids_max(make_cg) -> None:
    cg = make_cg(pids_max=20)
    proc = run_in(
        cg,
        """
        import os, time
        made = 0
        try:
            for _ in range(200):
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                made += 1
        except OSError as e:
            print(made, e.errno, flush=True)
        else:
            print(made, 0, flush=True)
        time.sleep(60)
        """,
    )
    assert proc.stdout is not None
    made, err = map(int, proc.stdout.readline().split())
    assert made < 20
    assert err == 11  # EAGAIN from fork: the pids controller said no
    assert len(cg.pids()) <= 20
    cg.kill()
    assert cg.pids() == []
    assert proc.wait(timeout=10) == -9


def test_memory_limit_oom_kills_and_is_reported(make_cg) -> None:
    cg = make_cg(memory_bytes=64 << 20)
    assert not cg.memory_oom()
    proc = run_in(
        cg,
        """
        chunks = []
        for _ in range(64):
            chunks.append(bytearray(8 << 20))  # zero-filled: pages are touched
        print("survived", flush=True)
        """,
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -9
    assert "survived" not in out
    assert cg.memory_oom()


def test_kill_reaches_setsid_double_forked_grandchild(make_cg) -> None:
    cg = make_cg()
    proc = run_in(
        cg,
        """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # let the test see EOF
                time.sleep(300)
            os._exit(0)
        os.wait()
        """,
    )
    proc.communicate(timeout=10)
    assert proc.returncode == 0
    wait_for(lambda: len(cg.pids()) == 1, what="only the grandchild left in the group")
    (grandchild,) = cg.pids()
    assert pid_alive(grandchild)
    cg.kill()
    wait_for(lambda: pid_gone(grandchild), what="grandchild gone from /proc")
    assert cg.pids() == []


def test_v1_removes_only_the_groups_whose_owner_is_gone(v1) -> None:
    shared = v1.parents["pids"].parent
    dead = shared / "999999999-0badcafe"  # a daemon that was SIGKILLed: nobody holds its lock
    (dead / "exec-left-behind").mkdir(parents=True)
    live = v1.create("fresh-and-empty", 1 << 20, 4)
    other = cgroups.detect()  # another daemon starting
    assert isinstance(other, cgroups.V1Backend)
    assert not dead.exists()
    assert all(d.exists() for d in live.dirs)
    assert other.parents["pids"] != v1.parents["pids"]
    other.close()
    assert all(d.exists() for d in live.dirs)
    live.close()
    v1.close()
    assert not any(parent.exists() for parent in v1.parents.values())


def test_v1_what_a_gone_daemon_left_running_is_killed_with_its_group(v1) -> None:
    dead = v1.parents["pids"].parent / "999999999-0badf00d"
    group = dead / "exec-survivor"
    group.mkdir(parents=True)
    survivor = subprocess.Popen(
        ["/bin/sh", "-c", f'echo $$ > {group}/cgroup.procs && exec sleep 300'])
    try:
        wait_for(lambda: (group / "cgroup.procs").read_text().split() == [str(survivor.pid)],
                 what="survivor in the dead daemon's group")
        other = cgroups.detect()  # the next daemon to start
        assert other is not None
        assert survivor.wait(timeout=5) == -9
        assert not dead.exists()
        other.close()
    finally:
        survivor.kill()
        survivor.wait()


# ---------------------------------------------------------------- v1, fake cgroupfs


def make_fake_v1(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for ctrl in ("pids", "memory", "cpu"):
        (root / ctrl / "system.slice").mkdir(parents=True, exist_ok=True)
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text("3:pids:/system.slice\n2:memory:/system.slice\n"
                           "1:cpu:/system.slice\n0::/system.slice\n")
    return root, self_cgroup


def test_v1_daemons_with_the_same_pid_in_other_namespaces_keep_their_groups(
    tmp_path: Path,
) -> None:
    # Pid 42 in a container and pid 42 on the host: the number says nothing.
    first = cgroups.detect(*make_fake_v1(tmp_path), pid=42)
    second = cgroups.detect(*make_fake_v1(tmp_path), pid=42)
    assert isinstance(first, cgroups.V1Backend) and isinstance(second, cgroups.V1Backend)
    assert first.parents["pids"].name.startswith("42-")
    assert set(first.parents.values()).isdisjoint(second.parents.values())
    second.close()
    assert all(parent.is_dir() for parent in first.parents.values())
    assert not any(parent.exists() for parent in second.parents.values())
    first.close()


def test_v1_a_live_owner_invisible_here_is_judged_by_its_lock_not_its_pid(
    tmp_path: Path,
) -> None:
    # 999999999 is above any pid_max: in this namespace that daemon looks dead.
    elsewhere = cgroups.detect(*make_fake_v1(tmp_path), pid=999999999)
    assert isinstance(elsewhere, cgroups.V1Backend)
    shared = elsewhere.parents["pids"].parent
    gone = shared / "7-0badcafe"
    (gone / "exec-left-behind").mkdir(parents=True)
    starting = cgroups.detect(*make_fake_v1(tmp_path), pid=1)
    assert starting is not None
    assert all(parent.is_dir() for parent in elsewhere.parents.values())
    assert not gone.exists()
    starting.close()
    elsewhere.close()


def test_v2_subtree_taken_by_a_live_daemon_is_left_alone(tmp_path: Path) -> None:
    root, self_cgroup = make_fake_v2(tmp_path)
    own = root / "system.slice" / "wfd.service"
    first = cgroups.detect(root, self_cgroup, pid=1)
    assert first is not None
    running = first.create("running", memory_bytes=1 << 20, pids_max=4)
    why: list[str] = []
    assert cgroups.detect(root, self_cgroup, pid=2, why=why) is None
    assert why[0] == f"cgroup v2 {own} is already used by another wfd daemon"
    assert running.dirs[0].is_dir()
    first.close()
    (own / "exec-left-behind").mkdir()  # the owner is gone: its groups may go
    again = cgroups.detect(root, self_cgroup, pid=3)
    assert again is not None and not (own / "exec-left-behind").exists()
    again.close()
