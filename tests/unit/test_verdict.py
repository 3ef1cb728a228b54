"""The verdict: how a child's exit and result become an execution's status and message."""

import signal

import orjson
import pytest

from sandbox.protocol import EXIT_JOIN_FAILED as JOIN_FAILED_EXIT
from wfd.config import Limits
from wfd.executor.base import Job
from wfd.executor.pipes import Captured
from wfd.executor.supervise import _Ended, _judge, _signal_of

JOB = Job(execution_id="x", name="w", kind="catch", version=1, code="",
          limits=Limits(timeout_s=1.5, memory_mb=256, cpu_s=7))
NO_CHANGE = {"set": {}, "unset": []}


def ended(signal: int | None = None, returncode: int | None = 0, timed_out: bool = False,
          oom_killed: bool = False, join_failed: bool = False) -> _Ended:
    return _Ended(signal, returncode, timed_out, oom_killed, join_failed)


def result(value: object = None, raw: bytes | None = None, cap: int = 1 << 20) -> Captured:
    captured = Captured(cap)
    data = raw if raw is not None else (orjson.dumps(value) if value is not None else b"")
    if data:
        captured.add(data)
    return captured


SUCCESS = {"outcome": "success", "response": None, "settings": {"set": {"k": 1}, "unset": []}}
FAILED = {"outcome": "error", "error": "ValueError: no", "traceback": "Traceback..."}
OOM = "the memory limit of 256 MiB was reached: the kernel killed a process of the execution"

VERDICTS = [
    # (how it ended, result, status, error)
    (ended(timed_out=True), result(SUCCESS), "timeout", "timed out after 1.5 s"),
    (ended(), result(raw=b"x" * 11, cap=10), "error", "the result was too large"),
    (ended(), result(SUCCESS), "success", None),
    (ended(oom_killed=True), result(SUCCESS), "success", None),  # it did finish
    (ended(), result(FAILED), "error", "ValueError: no"),
    (ended(oom_killed=True), result(FAILED), "memory", f"{OOM}; then: ValueError: no"),
    (ended(oom_killed=True, signal=signal.SIGKILL, returncode=-9), result(), "memory", OOM),
    (ended(signal=signal.SIGXCPU, returncode=-24), result(), "cpu",
     "CPU time limit of 7 s exceeded"),
    (ended(signal=signal.SIGKILL, returncode=-9), result(), "cpu",
     "CPU time limit of 7 s exceeded"),
    (ended(signal=signal.SIGSEGV, returncode=-11), result(), "error",
     "the process was killed by SIGSEGV"),
    (ended(returncode=JOIN_FAILED_EXIT, join_failed=True), result(), "error",
     f"boot failed: the process could not join its cgroup (exit {JOIN_FAILED_EXIT})"),
    (ended(returncode=0), result(), "error",
     "the process exited with code 0 without reporting a result"),
    (ended(returncode=3), result(), "error",
     "the process exited with code 3 without reporting a result"),
]


@pytest.mark.parametrize(("how", "captured", "status", "error"), VERDICTS)
def test_judge(how: _Ended, captured: Captured, status: str, error: str | None) -> None:
    outcome = _judge(JOB, how, captured, 12.5)
    assert (outcome.status, outcome.error) == (status, error)
    assert outcome.duration_ms == 12.5


def test_a_success_carries_its_response_and_settings_change() -> None:
    response = {"status_code": 201, "body": "made", "headers": {"X-Id": "7"}}
    outcome = _judge(JOB, ended(), result({**SUCCESS, "response": response}), 1.0)
    assert outcome.response == response
    assert outcome.settings_change == {"set": {"k": 1}, "unset": []}


def test_a_success_without_settings_changes_nothing() -> None:
    outcome = _judge(JOB, ended(), result({"outcome": "success"}), 1.0)
    assert (outcome.status, outcome.settings_change) == ("success", NO_CHANGE)


def test_a_failure_keeps_its_traceback_and_no_settings() -> None:
    outcome = _judge(JOB, ended(), result(FAILED), 1.0)
    assert outcome.traceback == "Traceback..."
    assert outcome.settings_change is None


def test_a_memory_error_the_child_reported_is_memory() -> None:
    reported = {"outcome": "memory", "error": "MemoryError", "traceback": ""}
    assert _judge(JOB, ended(), result(reported), 1.0).status == "memory"


MALFORMED = [
    b"not json",
    b"[1, 2]",
    orjson.dumps({"no": "outcome"}),
    orjson.dumps({"outcome": "sucess"}),
    orjson.dumps({"outcome": "timeout", "error": "the child cannot claim this"}),
    orjson.dumps({**SUCCESS, "settings": {"set": [], "unset": []}}),
    orjson.dumps({**SUCCESS, "settings": {"set": {}, "unset": "k"}}),
    orjson.dumps({**SUCCESS, "settings": {"set": {}}}),
    orjson.dumps({**SUCCESS, "settings": ["k"]}),
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_a_malformed_result_is_an_error_whatever_it_claims(raw: bytes) -> None:
    outcome = _judge(JOB, ended(), result(raw=raw), 1.0)
    assert outcome.status == "error"
    # records: the message says what was malformed, after the common prefix.
    assert (outcome.error or "").startswith("the process reported a malformed result: ")
    assert (outcome.response, outcome.settings_change) == (None, None)


UNSENDABLE = [
    {"status_code": "200", "body": "", "headers": {}},
    {"status_code": True, "body": "", "headers": {}},
    {"status_code": 600, "body": "", "headers": {}},
    {"status_code": 200, "body": 5, "headers": {}},
    {"status_code": 200, "body": ""},
    {"status_code": 200, "body": "", "headers": {"a": 1}},
    "ok",
]


@pytest.mark.parametrize("response", UNSENDABLE)
def test_a_success_with_a_response_that_cannot_be_sent_is_an_error(response: object) -> None:
    # A workflow can write its own result, past the child's rules: the daemon checks again.
    outcome = _judge(JOB, ended(), result({**SUCCESS, "response": response}), 1.0)
    assert outcome.status == "error"
    assert (outcome.response, outcome.settings_change) == (None, None)


@pytest.mark.parametrize(("returncode", "bwrap", "expected"), [
    (None, False, None),
    (0, False, None),
    (-9, False, 9),
    (-24, True, 24),
    (137, True, 9),  # bwrap: 128 + SIGKILL
    (137, False, None),  # a plain child exiting 137 was not signalled
    (128, True, None),
    (128 + signal.NSIG, True, None),
    (1, True, None),
])
def test_signal_of(returncode: int | None, bwrap: bool, expected: int | None) -> None:
    assert _signal_of(returncode, bwrap) == expected
