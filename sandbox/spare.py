"""A child forked by the zygote: waits as a warm spare, then runs exactly one job.

Everything here runs after the fork, in the child; the zygote's side of the
fork is in zygote.py. Nothing returns: the child ends with `os._exit`, so
no zygote code (its loop, its `finally` blocks) ever runs in it.
"""

import os
import random
import signal
import socket
import tempfile
import traceback

import orjson

from sandbox import isolate, limits, runner

# Where the job's pipes land in the child: the job on stdin, the output on
# stdout and stderr, the result on fd 3 (the `result_fd` the daemon names).
RESULT_FD = 3
PIPES = 3


def serve(work: socket.socket, zygote: int, env: dict[str, str]) -> None:
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
    try:
        ticket, fds, _, _ = socket.recv_fds(work, 4096, PIPES)
    except OSError:
        os._exit(0)
    if not ticket or len(fds) != PIPES:
        os._exit(0)  # the zygote closed the socket: the spare is not needed
    _adopt(fds)
    os._exit(_run(orjson.loads(ticket)["workdir"], env))


def _adopt(fds: list[int]) -> None:
    """Put the job's pipes on fds 0-3 and close everything else."""
    job, output, result = fds
    os.dup2(job, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.dup2(result, RESULT_FD)
    os.closerange(RESULT_FD + 1, os.sysconf("SC_OPEN_MAX"))


def _run(workdir: str, env: dict[str, str]) -> int:
    """Read the job, isolate, make the private working directory, execute."""
    # A forked child starts from the zygote's memory; nothing random may repeat
    # between executions. os.fork reseeds `random` already; this says it here.
    random.seed()
    try:
        job = runner.read_job()
        isolate.enter(job)
        os.mkdir(workdir, 0o700)
        os.chdir(workdir)
    except Exception:
        traceback.print_exc()
        return runner.EXIT_BOOT_FAILED
    os.environ.clear()
    os.environ.update(env, HOME=workdir, TMPDIR=workdir)
    tempfile.tempdir = None  # gettempdir() caches; let it see the new TMPDIR
    return runner.execute(job)
