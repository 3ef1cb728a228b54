"""`trace_stages`: one `stages` log line per catch execution, its stages in path order.

bench/bench_stages.py reads these lines; what it relies on is checked here
on both executors: every stage present, the child's own stamps among them,
each no earlier than the one before, and nothing logged when the key is off.
"""

import json

import pytest
import requests
from conftest import wait_for

from wfd.stages import STAGES

WORKFLOW = """
def workflow(_request, settings):
    return {"status_code": 201, "body": "traced"}
"""


def stage_lines(log: str) -> dict[str, dict]:
    lines = (json.loads(line) for line in log.splitlines() if line.startswith("{"))
    return {line["id"]: line for line in lines if line["event"] == "stages"}


@pytest.mark.parametrize("executor", ["zygote", "spawn"])
def test_every_stage_is_stamped_in_path_order(make_daemon, name, executor):
    daemon = make_daemon(f'executor = "{executor}"\nlog_format = "json"\ntrace_stages = true\n')
    url = daemon.deploy(name, WORKFLOW)
    response = requests.post(url, json={"a": 1}, timeout=30)
    assert (response.status_code, response.text) == (201, "traced")
    execution_id = response.headers["X-Wfd-Execution-Id"]
    line = wait_for(lambda: stage_lines(daemon.log()).get(execution_id), what="stages line")
    offsets = [line[stage] for stage in STAGES]  # KeyError names a missing stage
    assert offsets[0] == 0.0
    assert offsets == sorted(offsets), dict(zip(STAGES, offsets, strict=True))
    assert offsets[-1] < 30_000  # milliseconds, not seconds or nanoseconds
    assert isinstance(line["received_at"], float)


def test_nothing_is_traced_by_default(daemon, name):
    url = daemon.deploy(name, WORKFLOW)
    with requests.Session() as session:
        first = session.post(url, json={}, timeout=30)
        # Same connection: the first request's handler has finished by now.
        assert session.post(url, json={}, timeout=30).status_code == 201
    execution_id = first.headers["X-Wfd-Execution-Id"]
    assert execution_id in daemon.log()  # its `execution` line
    assert " stages " not in daemon.log()
