"""The daemon's vocabulary: what an execution can be, and the shapes it carries.

Statuses, kinds and triggers are `StrEnum`s: they are stored, logged and
sent as their plain string values, and compare equal to them. Whatever
needs to know what a status means for a catch caller asks here, so the
answer is written once. Standard library only.
"""

from enum import StrEnum
from typing import Any, TypedDict


class Kind(StrEnum):
    """What starts a workflow: an HTTP request (catch) or its schedule (pull)."""

    CATCH = "catch"
    PULL = "pull"


class Trigger(StrEnum):
    """What started one execution: `manual` is `wfd ctl run`, `replay` `wfd ctl replay`."""

    CATCH = "catch"
    PULL = "pull"
    MANUAL = "manual"
    REPLAY = "replay"


class Status(StrEnum):
    """How an execution ended (SPEC 5); `skipped` records ticks a long run swallowed."""

    SUCCESS = "success"
    ERROR = "error"
    MEMORY = "memory"
    CPU = "cpu"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"
    SKIPPED = "skipped"


class WorkflowResponse(TypedDict):
    """The HTTP response a catch execution answers with, validated (SPEC 2)."""

    status_code: int
    body: str
    headers: dict[str, str]


# The top-level settings keys an execution or an operator added or changed
# (`set`) and removed (`unset`), merged key by key into what is stored. The
# functional form because `set` names a builtin.
class SettingsChange(TypedDict):
    set: dict[str, Any]
    unset: list[str]


# The HTTP status a catch caller gets when the function did not decide it
# (SPEC 2): an uncaught exception or a broken limit 500, a timeout 504, an
# execution cut short by the daemon's stop 503.
FAILURE_HTTP_STATUS = {Status.ERROR: 500, Status.MEMORY: 500, Status.CPU: 500,
                       Status.TIMEOUT: 504, Status.INTERRUPTED: 503}


def http_status(status: Status, response: WorkflowResponse | None) -> int:
    """The HTTP status a catch execution answers with, given how it ended.

    A success answers with the workflow's own response, or 200 for the
    default one; any other status with its failure status.
    """
    if status == Status.SUCCESS:
        return response["status_code"] if response else 200
    return FAILURE_HTTP_STATUS.get(status, 500)
