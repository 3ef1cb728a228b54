"""`wfd ctl logs NAME --follow`: a workflow's executions streamed as they end."""

import asyncio
import json
import signal
import subprocess
import sys

import pytest
import requests

from wfd.control.follow import FOLLOW_BUFFER_BYTES, Follower
from wfd.control.protocol import CommandError
from wfd.store import ExecutionRecord

PRINTS = "def workflow(_request, settings):\n    print('seen', _request.get('n'))\n"


def follow(daemon, name: str, *flags: str) -> subprocess.Popen:
    """Start a follower and return once the daemon says the stream is in place."""
    process = subprocess.Popen(
        [sys.executable, "-m", "wfd", "ctl", "--socket", daemon.socket, "logs", name,
         "--follow", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stderr.readline() == f"following {name}; Ctrl-C to stop\n"
    return process


def test_follow_streams_each_execution_of_that_workflow_as_it_ends(daemon, name):
    url = daemon.deploy(name, PRINTS)
    other = daemon.deploy(f"{name}-other", PRINTS)
    follower = follow(daemon, name, "--json")
    try:
        ids = []
        for n in range(3):
            ids.append(requests.post(url, json={"n": n}).headers["X-Wfd-Execution-Id"])
            requests.post(other, json={"n": n})
        records = [json.loads(follower.stdout.readline()) for _ in ids]
        assert [r["id"] for r in records] == ids
        assert [r["output"] for r in records] == [f"seen {n}\n" for n in range(3)]
        assert {(r["workflow"], r["status"], r["trigger"]) for r in records} == {
            (name, "success", "catch")}
        # A plain `logs EXECUTION_ID` still answers, alongside the stream.
        assert daemon.logs(ids[0])["output"] == "seen 0\n"
    finally:
        follower.send_signal(signal.SIGINT)
    assert follower.wait(10) == 0


def test_follow_in_text_and_its_end_when_the_daemon_stops(make_daemon, name):
    daemon = make_daemon()
    daemon.deploy(name, PRINTS)
    follower = follow(daemon, name)
    daemon.ctl("run", name, "--data", '{"n": 7}')
    lines = [follower.stdout.readline() for _ in range(6)]
    assert lines[0].startswith("id: ") and "status: success\n" in lines
    assert daemon.stop() == 0
    assert follower.wait(10) == 1
    out, err = follower.stdout.read(), follower.stderr.read()
    assert "--- output ---\nseen 7\n\n" in "".join(lines) + out
    assert err == "wfd ctl: the daemon is stopping\n"


def test_following_an_unknown_workflow_is_refused(daemon):
    result = daemon.ctl("logs", "no-such-workflow", "--follow", check=False)
    assert (result.returncode, result.stderr) == (1, "wfd ctl: no workflow named "
                                                     "no-such-workflow\n")


def test_followers_that_hang_up_do_not_hurt_the_daemon(daemon, name):
    url = daemon.deploy(name, PRINTS)
    for _ in range(3):
        follower = follow(daemon, name)
        follower.kill()
        follower.wait(10)
    assert requests.post(url, json={}).status_code == 200
    assert daemon.ctl_json("status")["state"] == "serving"


def test_a_follower_that_falls_behind_is_cut_off_with_a_reason():
    """In-process: the daemon's memory is bounded whatever a client does."""
    follower = Follower()
    chunk = "o" * (1024 * 1024)
    records = [ExecutionRecord(id=str(i), workflow="w", version=1, trigger="catch",
                               status="success", started_at="", duration_ms=1.0, output=chunk)
               for i in range(FOLLOW_BUFFER_BYTES // len(chunk) + 1)]

    async def main() -> list[str]:
        for record in records[:-1]:
            follower.push(record)
        sent = [r.id for r in await follower.next_batch()]  # the client reads: room again
        for record in records:
            follower.push(record)
        with pytest.raises(CommandError, match="fell behind"):
            await follower.next_batch()
        return sent

    assert asyncio.run(main()) == [r.id for r in records[:-1]]
