"""HrFlow's own documented examples run unchanged (but for `api_url`) against stand-ins."""

import json
import re

import requests
from conftest import wait_for

# The catch example from HrFlow's Workflows documentation; the only change is
# `api_url=settings["API_URL"]`, which points the SDK at a local stand-in.
SEED_CATCH = '''
import json
import requests

from hrflow import Hrflow

def workflow(_request, settings):
    client = Hrflow(api_secret=settings["API_KEY"], api_user=settings["USER_EMAIL"], api_url=settings["API_URL"])

    file_url = _request["file_url"]
    file_content = requests.get(file_url, allow_redirects=True).content

    client.profile.parsing.add_file(
        source_key=settings["SOURCE_KEY"],
        profile_file=file_content,
        profile_content_type="application/pdf",
        reference="profile_reference"
    )

    id = requests.post(settings["OTHER_SERVICE_URL"], data={"key": "value"}).json()["id"]

    return dict(
        status_code=201,
        headers={"Content-Type": "application/json"},
        body=json.dumps({"id": id})
    )
'''

# HrFlow's documented pull example, unchanged but for `api_url` and the endpoint.
SEED_PULL = '''
import requests

from hrflow import Hrflow

INTERNAL_ENDPOINT = "{endpoint}"

def workflow(settings):
    client = Hrflow(api_secret=settings["API_KEY"], api_user=settings["USER_EMAIL"], api_url=settings["API_URL"])

    last_uid = settings["LAST_UID"]
    data = requests.get("{{}}?last_uid={{}}".format(INTERNAL_ENDPOINT, last_uid)).json()
    for file_url in data["files"]:
        file_content = requests.get(file_url, allow_redirects=True).content

        client.profile.parsing.add_file(
            source_key=settings["SOURCE_KEY"],
            profile_file=file_content,
            profile_content_type="application/pdf",
            reference="profile_reference"
        )

    # Update LAST_UID
    settings["LAST_UID"] = data["last_uid"]
'''

PDF = b"%PDF-1.4 a resume \x00\x01\x02"


def test_seed_catch_example(daemon, name, standin):
    files, hrflow, other = standin(), standin(), standin()
    files.routes[("GET", "/file/profile_1.doc")] = (200, {"Content-Type": "application/pdf"}, PDF)
    hrflow.routes[("POST", "/v1/profile/parsing/file")] = (
        201, {}, {"code": 201, "message": "profile parsed", "data": {}})
    other.routes[("POST", "/notify")] = (200, {}, {"id": "evt-42"})

    url = daemon.deploy(name, SEED_CATCH, *files.allow_net, *hrflow.allow_net, *other.allow_net)
    daemon.ctl("settings", name, "set", "API_KEY=ask_secret", "USER_EMAIL=ops@example.com",
               f"API_URL={hrflow.url}/v1/", "SOURCE_KEY=src_123",
               f"OTHER_SERVICE_URL={other.url}/notify")
    response = requests.post(url, json={"file_url": f"{files.url}/file/profile_1.doc"})

    assert response.status_code == 201, daemon.logs(response.headers["X-Wfd-Execution-Id"])
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"id": "evt-42"}
    [upload] = hrflow.requests
    assert upload["headers"]["X-API-KEY"] == "ask_secret"
    assert upload["headers"]["X-USER-EMAIL"] == "ops@example.com"
    body = upload["body"]
    assert PDF in body
    assert re.search(rb'name="source_key"\r\n\r\nsrc_123\r\n', body)
    assert re.search(rb'name="reference"\r\n\r\nprofile_reference\r\n', body)
    [notification] = other.requests
    assert notification["body"] == b"key=value"
    assert "ask_secret" not in json.dumps(daemon.executions(name))


def test_seed_pull_example_advances_its_cursor(daemon, name, standin):
    storage, hrflow = standin(), standin()
    batches = {"u0": (["a", "b"], "u1"), "u1": (["c"], "u2"), "u2": ([], "u2")}

    def records(request):
        files, last = batches[request["query"].removeprefix("last_uid=")]
        return 200, {}, {"files": [f"{storage.url}/files/{f}.pdf" for f in files],
                         "last_uid": last}

    storage.routes[("GET", "/records")] = records
    for letter in "abc":
        storage.routes[("GET", f"/files/{letter}.pdf")] = (200, {}, f"%PDF {letter}".encode())
    hrflow.routes[("POST", "/v1/profile/parsing/file")] = (201, {}, {"code": 201})

    code = SEED_PULL.format(endpoint=f"{storage.url}/records")
    allow = (*storage.allow_net, *hrflow.allow_net)
    daemon.deploy(name, code, "--every", "1h", *allow, kind="--pull")  # settings, then timer
    daemon.ctl("settings", name, "set", "API_KEY=k", "USER_EMAIL=u@example.com",
               f"API_URL={hrflow.url}/v1/", "SOURCE_KEY=src", "LAST_UID=u0")
    daemon.deploy(name, code, "--every", "1s", kind="--pull")  # keeps its allowances
    wait_for(lambda: daemon.ctl_json("settings", name)["LAST_UID"] == "u2", timeout=20,
             what="the cursor to reach u2")
    uploads = [r["body"] for r in hrflow.requests]
    assert len(uploads) == 3
    assert sorted(c for body in uploads for c in "abc" if f"%PDF {c}".encode() in body) == [
        "a", "b", "c"]
    assert [r["query"] for r in storage.requests if r["path"] == "/records"][:2] == [
        "last_uid=u0", "last_uid=u1"]
    # Every run succeeded; a tick that came while a slow (cold spawn, loaded
    # machine) run was still going is recorded as skipped: no overlap.
    runs = [r["status"] for r in daemon.executions(name)]
    assert set(runs) <= {"success", "skipped"} and "success" in runs, runs
