"""HrFlow's own documented examples run unchanged (but for `api_url`) against stand-ins."""

import json
import re

import requests

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

PDF = b"%PDF-1.4 a resume \x00\x01\x02"


def test_seed_catch_example(daemon, name, standin):
    files, hrflow, other = standin(), standin(), standin()
    files.routes[("GET", "/file/profile_1.doc")] = (200, {"Content-Type": "application/pdf"}, PDF)
    hrflow.routes[("POST", "/v1/profile/parsing/file")] = (
        201, {}, {"code": 201, "message": "profile parsed", "data": {}})
    other.routes[("POST", "/notify")] = (200, {}, {"id": "evt-42"})

    url = daemon.deploy(name, SEED_CATCH)
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
