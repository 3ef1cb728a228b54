"""What an executor is given, what it reports, and the interface it offers.

The child side is the `sandbox` package; sandbox/PROTOCOL.md is the contract.
`Executor` is the one interface the rest of the daemon uses, so the way a
child is started (a fresh interpreter, or a fork of a preloaded zygote) can
change without touching HTTP, the control socket or the scheduler.
"""

import asyncio
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from sandbox import protocol
from wfd.config import MIB, Limits
from wfd.domain import Kind, SettingsChange, Status, WorkflowResponse
from wfd.environments import Environment
from wfd.isolation.network import Policy

CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"


class JobError(Exception):
    """The job cannot be handed to a child; `part` says which part, the message why."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(message)
        self.part = part


@dataclass(frozen=True)
class Job:
    """What one child is asked to do: run (or, at deploy, check) a workflow.

    Encoded once, when it is made: a Job that exists can be handed to a
    child, so nothing (a pipe, a spare, a cgroup) is ever acquired for one
    that cannot. Only the fields that depend on how the child starts
    (`result_fd`, `processes` under RLIMIT_NPROC, the seccomp flag, `env`
    with the workflow's directory as the child sees it, and that directory's
    mount) are added by `payload`, in front of the encoded body.
    """

    execution_id: str
    name: str
    kind: Kind
    version: int
    code: str
    limits: Limits
    settings: dict[str, Any] = field(default_factory=dict)
    # A catch request arrives already serialized (an orjson.Fragment): the
    # daemon keeps one compact copy while it waits (wfd/catch.py).
    request: dict[str, Any] | orjson.Fragment | None = None
    mode: str = "run"
    response_bytes: int = 10 * MIB
    # Where it may connect, under the network layer (an execution gets a namespace of it).
    network: Policy = field(default_factory=Policy)
    json_depth: int = 64
    # The workflow's environment variables: secrets, so out of repr and logs.
    env: dict[str, str] = field(default_factory=dict, repr=False)
    # The workflow's persistent directory on the host (None: it has none yet).
    files: Path | None = None
    # The workflow's environment (None: the default one) and what its zygote preloads.
    environment: Environment | None = None
    preload: tuple[str, ...] = ()
    # The child reports its own stage stamps in its result (wfd/stages.py).
    trace: bool = False
    # The encoded job in pieces, so that a large request is copied once (by
    # its own encoding) and never again to be joined: `feed` writes them in turn.
    body: tuple[bytes, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "body", self._encode())

    def prepared(self, files: Path | None, environment: Environment | None) -> "Job":
        """This job once its workflow's directory and environment are ready.

        Neither is in the encoded body (an executor turns them into mounts,
        an interpreter and `env` at `payload`), so the copy shares the body:
        `replace` would encode a large request a second time.
        """
        job = copy.copy(self)
        object.__setattr__(job, "files", files)
        object.__setattr__(job, "environment", environment)
        return job

    def _encode(self) -> tuple[bytes, ...]:
        job: dict[str, Any] = {
            "protocol": protocol.VERSION,
            "mode": self.mode,
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "code": self.code,
        }
        parts = [_encoded("code", job)[:-1]]
        for key, value in (("settings", self.settings), ("request", self.request)):
            if value is not None:
                parts += [b',"%s":' % key.encode(), _encoded(key, value)]
        return (*parts, b"}")

    def payload(self, result_fd: int, rlimit_nproc: bool = True, sandboxed: bool = False,
                variables: dict[str, str] | None = None,
                files_mount: dict[str, str | None] | None = None) -> list[bytes]:
        """The JSON document the child reads on stdin, in pieces: `body` with the start-up fields.

        Without `rlimit_nproc` the child leaves RLIMIT_NPROC alone: a pids
        cgroup bounds the execution instead, and RLIMIT_NPROC would count
        every execution's processes together (they share one sandbox uid).
        `sandboxed` has the child forbid itself new namespaces (sandbox/seccomp.py).
        `variables` are the daemon's own (`WFD_WORKFLOW_DIR`), added to the
        workflow's environment; they travel in the job, never on a command line.
        `files_mount` tells a zygote's child which directory to mount where.
        """
        limits = self.limits
        start: dict[str, Any] = {
            "result_fd": result_fd,
            "forbid_namespaces": sandboxed,
            "env": {**self.env, **(variables or {})},
            **({"trace": True} if self.trace else {}),
            "limits": {
                "memory_bytes": limits.memory_mb * MIB,
                "cpu_s": int(limits.cpu_s),
                "processes": limits.processes if rlimit_nproc else None,
                "open_files": limits.open_files,
                "file_size_bytes": limits.file_size_mb * MIB,
                "tmp_bytes": limits.tmp_mb * MIB,
                "response_bytes": self.response_bytes,
                "json_depth": self.json_depth,
            },
        }
        if files_mount is not None:
            start["files"] = files_mount
        head = orjson.dumps(start)
        first, *rest = self.body
        return [head[:-1] + b"," + first[1:], *rest]


def _encoded(what: str, value: Any) -> bytes:
    try:
        return protocol.dumps(value)
    except protocol.CodecError as exc:
        raise JobError(what, f"the {what} cannot be handed to the child: {exc}") from None


@dataclass
class Outcome:
    """How an execution ended, in the daemon's terms (SPEC 5 statuses)."""

    status: Status
    duration_ms: float
    response: WorkflowResponse | None = None
    settings_change: SettingsChange | None = None
    error: str | None = None
    traceback: str | None = None
    output: str = ""
    output_truncated: bool = False
    # Set when the outcome was known before the execution was over: it ends
    # once every process of it is gone and what it held is released
    # (`settled`). Until then its concurrency slot is not free.
    cleanup: "asyncio.Future[Any] | None" = field(default=None, repr=False, compare=False)


async def settled(outcome: Outcome) -> None:
    """Wait until nothing of the execution is left: no process, no cgroup, no pipe.

    A failure of the clean-up itself is the caller's to log; the outcome
    stands (it was complete before the clean-up began).
    """
    if outcome.cleanup is not None:
        await outcome.cleanup


class Executor(Protocol):
    """Anything that can run a job in isolation and say how it ended.

    `run` may be cancelled (the daemon interrupts executions still running
    at the end of its shutdown grace period): before re-raising the
    CancelledError it must have killed every process the job started.

    It may return as soon as the outcome is final, while the execution's
    processes are still being killed and reaped: the Outcome's `cleanup`
    then says when they are gone, and whoever gave the execution its slot
    keeps it until then, so no process of an execution outlives its slot.
    """

    async def start(self) -> None: ...

    async def run(self, job: Job) -> Outcome: ...

    def status(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class ChildLost(Exception):
    """The child's end is unknown: whatever started it is gone. The message says why."""


