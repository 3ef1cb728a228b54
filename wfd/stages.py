"""Where a catch execution's time goes: timestamps along its path, for bench/bench_stages.py.

With `trace_stages = true` each catch request carries a Trace in a context
variable from the moment the handler sees it until its response is sent;
the daemon stamps its stages there, the child stamps its own (the job asks
it to, and its result carries them back), and one `stages` log line per
execution gives every stage in milliseconds since the request arrived.
Every stamp is `time.monotonic()`, CLOCK_MONOTONIC, which is one clock for
every process on the host: a child's stamps compare with the daemon's.

Off (the default) the only cost is one context-variable lookup per stamp.
The child's stamps are its own word, like the rest of its result: they are
only logged, never acted on, and only known names with numbers are kept.
"""

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from wfd import logs

# The stages in the order an execution passes them; the child's are marked.
STAGES = (
    "received",   # the handler has the request (before the workflow lookup)
    "parsed",     # body read, checked and serialized for the child
    "admitted",   # the execution holds its slot
    "handed",     # the job went to a spare (zygote) or a fresh process started (spawn)
    "isolated",   # child: limits and seccomp applied, about to load the workflow
    "compiled",   # child: the workflow's module compiled and executed
    "returned",   # child: the workflow function returned
    "result",     # the daemon has the complete result
    "cleaned",    # off the request's path: killed, reaped, cgroup removed (or, for a
                  # success answered early, clean-up started and left to finish after)
    "committed",  # the record (and settings change) committed
    "sent",       # the response written to the connection
)
CHILD_STAGES = frozenset({"isolated", "compiled", "returned"})


class Trace:
    """One execution's stamps, by stage name."""

    def __init__(self, execution_id: str) -> None:
        self.execution_id = execution_id
        self.stamps: dict[str, float] = {"received": time.monotonic()}

    def offsets_ms(self) -> dict[str, float]:
        """Each stage in milliseconds since `received`, in path order."""
        start = self.stamps["received"]
        return {name: round((self.stamps[name] - start) * 1000, 3)
                for name in STAGES if name in self.stamps}


_current: ContextVar[Trace | None] = ContextVar("wfd_stage_trace", default=None)


@contextlib.contextmanager
def traced(execution_id: str, enabled: bool) -> Iterator[Trace | None]:
    """Trace the request handled inside (when `enabled`), and log its stages at the end."""
    if not enabled:
        yield None
        return
    trace = Trace(execution_id)
    token = _current.set(trace)
    try:
        yield trace
    finally:
        _current.reset(token)
        fields: dict[str, Any] = {"id": execution_id, "received_at": trace.stamps["received"],
                                  **trace.offsets_ms()}
        logs.event("stages", **fields)


def active() -> bool:
    """Whether the execution being handled is traced (its job then asks the child for stamps)."""
    return _current.get() is not None


def stamp(stage: str) -> None:
    """Note that the traced execution (if any) reached `stage` now."""
    trace = _current.get()
    if trace is not None:
        trace.stamps[stage] = time.monotonic()


def child(stamps: Any) -> None:
    """Keep the child's own stamps from its result: known names with numbers only."""
    trace = _current.get()
    if trace is None or not isinstance(stamps, dict):
        return
    for name, value in stamps.items():
        if name in CHILD_STAGES and type(value) is float:
            trace.stamps[name] = value
