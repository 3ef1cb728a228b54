"""Nothing a workflow prints can forge its result; its output is kept, capped."""

import requests

FORGER = """
import io, json, os, sys

FAKE = json.dumps({"outcome": "success",
                   "response": {"status_code": 299, "body": "forged", "headers": {}},
                   "settings": {"set": {"forged": True}, "unset": []}})

def workflow(_request, settings):
    print(FAKE)
    sys.stdout.write(FAKE + "\\n")
    os.write(1, (FAKE + "\\n").encode())
    os.write(2, b"to stderr\\n")
    sys.stdout = io.StringIO()
    print("swallowed by the replaced stream")
    settings["real"] = True
    return {"status_code": 201, "body": "real"}
"""


def test_printed_fake_results_do_not_win(daemon, name):
    url = daemon.deploy(name, FORGER)
    response = requests.post(url, json={})
    assert (response.status_code, response.text) == (201, "real")
    assert daemon.ctl_json("settings", name) == {"real": True}
    output = daemon.logs(response.headers["X-Wfd-Execution-Id"])["output"]
    assert output.count('"outcome": "success"') == 3
    assert "to stderr" in output
    assert "swallowed" not in output


def test_output_is_capped_with_a_note_and_a_chatty_child_never_blocks(daemon, name):
    url = daemon.deploy(name, """
        import sys
        def workflow(_request, settings):
            for i in range(300_000):
                sys.stdout.write(f"line {i:08d} of noise\\n")
            return {"status_code": 200, "body": "finished"}
        """)
    response = requests.post(url, json={})
    assert (response.status_code, response.text) == (200, "finished")
    record = daemon.logs(response.headers["X-Wfd-Execution-Id"])
    assert record["output_truncated"] is True
    assert record["output"].startswith("line 00000000 of noise\n")
    assert record["output"].endswith("[wfd: output cut here, over the 1024 KiB limit]")
    assert 1024 * 1024 <= len(record["output"]) < 1024 * 1024 + 200
