"""A child forked by the zygote: waits as a warm spare, then runs exactly one job.

Everything here runs after the fork, in the child; the zygote's side of the
fork is in zygote.py. Nothing returns: each process ends with `os._exit`,
so no zygote code (its loop, its `finally` blocks) ever runs in it.

Without isolation the spare itself runs the job. In sandbox mode (the
zygote under bubblewrap) a spare is three processes, all made before a job
arrives so that none of that work is on the request's path:

    spare (zygote's PID namespace)   unshares its namespaces, waits, passes the exit on
    └─ init (PID 1 of its own)       mounts /proc, reaps; when it exits the kernel
       │                             kills everything left in the namespace
       └─ execution (PID 2)          takes the job, joins the cgroup, drops every
                                     capability, runs the workflow

Only the execution ever holds the job's pipes, so the daemon sees EOF when
it ends; the zygote's `kill` SIGKILLs the spare's process group, init
included, which empties the whole PID namespace (`setsid` escapees too).
"""

import json
import os
import random
import signal
import socket
import tempfile
import traceback
from collections.abc import Callable

from sandbox import isolate, limits, protocol, runner
from sandbox.protocol import MAX_RUN_FDS, PIPES, RESULT_FD

INIT_PID = 1


def serve(work: socket.socket, zygote: int, env: dict[str, str], sandboxed: bool) -> None:
    """Wait on `work` for one job's pipes, then run it. Never returns."""
    os.setsid()  # its own process group, so one killpg ends all it starts
    if not limits.die_with_parent(zygote):
        os._exit(0)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    keep = work.fileno()
    # Until a job arrives, hold nothing but the work socket: no other spare's
    # socket, no daemon channel.
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    if not sandboxed:
        os._exit(_take_job(work, env, sandboxed))
    _boot_step(isolate.unshare_namespaces)
    os._exit(_wait_for(_fork(lambda: _init(work, env)), work))


def _boot_step(step: Callable[[], None]) -> None:
    """Run one isolation step; if it fails, this process ends as a boot failure."""
    try:
        step()
    except OSError:
        traceback.print_exc()
        os._exit(protocol.EXIT_BOOT_FAILED)


def _fork(child: Callable[[], None]) -> int:
    """Fork; the child runs `child` (which never returns)."""
    pid = os.fork()
    if pid == 0:
        child()
    return pid


def _wait_for(pid: int, work: socket.socket) -> int:
    """Give up the work socket, then wait for `pid` and pass its exit on."""
    work.close()
    while True:
        reaped, status = os.waitpid(-1, 0)
        if reaped == pid:
            return _exit_code(status)


def _exit_code(status: int) -> int:
    """A signal death as 128 + N, the way bwrap reports it to the daemon."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _init(work: socket.socket, env: dict[str, str]) -> None:
    """PID 1 of the execution's namespace: its /proc, then reap until the execution ends.

    An init ignores signals it has no handler for, sent from inside its
    namespace: with Python's SIGINT handler gone, the execution cannot
    interrupt it.
    """
    limits.die_with_parent(0)  # the spare, outside this PID namespace
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _boot_step(isolate.mount_proc)
    os._exit(_wait_for(_fork(lambda: _execution(work, env)), work))


def _execution(work: socket.socket, env: dict[str, str]) -> None:
    limits.die_with_parent(INIT_PID)
    os._exit(_take_job(work, env, sandboxed=True))


def _take_job(work: socket.socket, env: dict[str, str], sandboxed: bool) -> int:
    """Receive the job's descriptors, join its cgroup, run it; the exit code."""
    try:
        ticket, fds, _, _ = socket.recv_fds(work, 4096, MAX_RUN_FDS)
    except OSError:
        return 0
    if not ticket or len(fds) < len(PIPES):
        return 0  # the zygote closed the socket: the spare is not needed
    try:
        isolate.join_cgroup(fds[len(PIPES):])
    except OSError:
        return protocol.EXIT_JOIN_FAILED
    _adopt(fds[:len(PIPES)])
    return _run(json.loads(ticket)["workdir"], env)


def _adopt(fds: list[int]) -> None:
    """Put the job's pipes on fds 0-3 (`RESULT_FD` last) and close everything else."""
    job, output, result = fds
    os.dup2(job, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.dup2(result, RESULT_FD)
    os.closerange(RESULT_FD + 1, os.sysconf("SC_OPEN_MAX"))


def _run(workdir: str | None, env: dict[str, str]) -> int:
    """Read the job, isolate, make the private working directory, execute.

    `workdir` is None in sandbox mode: the execution's own tmpfs on /tmp is
    its working directory.
    """
    # A forked child starts from the zygote's memory; nothing random may repeat
    # between executions. os.fork reseeds `random` already; this says it here.
    random.seed()
    try:
        job = runner.read_job()
        if workdir is None:
            isolate.enter(job["limits"]["tmp_bytes"], job.get("files"))
            home = isolate.WORKDIR
        else:
            os.mkdir(workdir, 0o700)
            os.chdir(workdir)
            home = workdir
    except Exception:
        traceback.print_exc()
        return protocol.EXIT_BOOT_FAILED
    os.environ.clear()
    os.environ.update(env, HOME=home, TMPDIR=home)
    if workdir is None:
        os.environ["PWD"] = home
    tempfile.tempdir = None  # gettempdir() caches; let it see the new TMPDIR
    return runner.execute(job)
