"""The daemon's vocabulary, and the rules that follow from it alone.

Whatever needs to know what a status means for a catch caller asks here,
so the answer is written once.
"""

from typing import Any

# The HTTP status a catch caller gets when the function did not decide it
# (SPEC 2): an uncaught exception or a broken limit 500, a timeout 504, an
# execution cut short by the daemon's stop 503.
FAILURE_HTTP_STATUS = {"error": 500, "memory": 500, "cpu": 500, "timeout": 504,
                       "interrupted": 503}


def http_status(status: str, response: dict[str, Any] | None) -> int:
    """The HTTP status a catch execution answers with, given how it ended.

    A success answers with the workflow's own response, or 200 for the
    default one; any other status with its failure status.
    """
    if status == "success":
        return response["status_code"] if response else 200
    return FAILURE_HTTP_STATUS.get(status, 500)
