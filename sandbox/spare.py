"""A child forked by the zygote: waits as a warm spare, then runs exactly one job.

Everything here runs after the fork, in the child; the zygote's side of the
fork is in zygote.py. Nothing returns: each process ends with `os._exit`,
so no zygote code (its loop, its `finally` blocks) ever runs in it.

A spare is one process, and it is the execution: it takes one job and runs
it. In sandbox mode (the zygote under bubblewrap) the zygote forks it into
namespaces of its own (isolate.fork_isolated), and everything that does not
depend on the job is done before the job arrives (isolate.prepare, then
no_new_privs and the namespace filter), so none of that work is on the
request's path:

    zygote (uid 65534, no capabilities)
    └─ spare = execution: PID 1 of its own PID namespace, in its own user,
                mount and IPC namespaces; its /proc, /tmp and /dev/shm made
                while it waits; once the job is here, the job's tmpfs size,
                its workflow's directory, no capabilities, the workflow

Being PID 1, it takes everything it started with it when it ends: the
kernel kills whatever is left in the namespace, `setsid` escapees too, and
the zygote's `kill` (SIGKILL from outside) ends it at a timeout. A PID 1
ignores the signals it has no handler for when they come from inside its
namespace; limits.py gives it the one whose default the verdicts rely on
(SIGXCPU).
"""

import json
import os
import random
import signal
import socket
import tempfile
import traceback

from sandbox import isolate, limits, protocol, runner, seccomp
from sandbox.protocol import MAX_RUN_FDS, PIPES, RESULT_FD


def serve(work: socket.socket, zygote: int, env: dict[str, str], sandboxed: bool,
          join: list[int], ids: tuple[int, int]) -> None:
    """Wait on `work` for one job's pipes, then run it. Never returns.

    With `join` (a blank cgroup's `cgroup.procs` files) the spare enters
    that group first, so no cgroup move is left for when the job arrives.
    `ids` are the zygote's uid and gid, for the sandboxed spare's user
    namespace to map.
    """
    os.setsid()  # its own process group, so one killpg ends all it starts
    # Inside its own PID namespace the zygote is not visible (ppid 0): if it
    # died before this, the work socket's EOF ends the spare instead.
    if not limits.die_with_parent(0 if sandboxed else zygote):
        os._exit(0)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if join:
        try:
            isolate.join_cgroup(join)
        except OSError:
            os._exit(protocol.EXIT_JOIN_FAILED)
    keep = work.fileno()
    # Until a job arrives, hold nothing but the work socket: no other spare's
    # socket, no daemon channel.
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    if sandboxed:
        try:
            isolate.prepare(*ids)
            limits.forbid_new_privileges()
            seccomp.forbid_namespaces()
        except OSError:
            traceback.print_exc()
            os._exit(protocol.EXIT_BOOT_FAILED)
        _environ(env, isolate.WORKDIR, sandboxed)
    os._exit(_take_job(work, env, sandboxed))


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
    """Read the job, isolate for it or make its private working directory, execute.

    `workdir` is None in sandbox mode: the execution's own tmpfs on /tmp,
    mounted while it waited, is its working directory.
    """
    # A forked child starts from the zygote's memory; nothing random may repeat
    # between executions. os.fork reseeds `random` already; this says it here.
    random.seed()
    try:
        job = runner.read_job()
        if workdir is None:
            isolate.enter(job["limits"]["tmp_bytes"], job.get("files"))
        else:
            os.mkdir(workdir, 0o700)
            os.chdir(workdir)
            _environ(env, workdir, sandboxed=False)
    except Exception:
        traceback.print_exc()
        return protocol.EXIT_BOOT_FAILED
    return runner.execute(job)


def _environ(env: dict[str, str], home: str, sandboxed: bool) -> None:
    """Only the zygote's PATH and LANG, with the working directory as home and temp."""
    os.environ.clear()
    os.environ.update(env, HOME=home, TMPDIR=home)
    if sandboxed:
        os.environ["PWD"] = home
    tempfile.tempdir = None  # gettempdir() caches; let it see the new TMPDIR
