"""The catch HTTP contract (SPEC 2): what reaches `_request`, and every refusal."""

import base64
import http.client
import json
import re
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import requests

ECHO = """
import json
def workflow(_request, settings):
    return {"status_code": 200, "body": json.dumps(_request),
            "headers": {"Content-Type": "application/json"}}
"""

LOOKUP = """
def workflow(_request, settings):
    return {"status_code": 200, "body": "|".join([
        str(_request["content-type"]), str(_request.get("X-CUSTOM")),
        str("x-custom" in _request), str(isinstance(_request, dict))])}
"""


@pytest.fixture
def echo(daemon, name):
    return daemon.deploy(name, ECHO)


def test_json_body_fields_headers_and_query_are_merged_in_order(echo):
    response = requests.post(f"{echo}?page=2&tag=a&tag=b&who=query",
                             json={"file_url": "https://x/y.pdf", "who": "body"},
                             headers={"HTTP-HRFLOW-SIGNATURE": "sig", "who": "header"})
    assert response.status_code == 200
    seen = response.json()
    assert seen["file_url"] == "https://x/y.pdf"
    assert seen["HTTP-HRFLOW-SIGNATURE"] == "sig"
    assert seen["page"] == "2"
    assert seen["tag"] == ["a", "b"]
    assert seen["who"] == "body"  # body beats query beats header
    assert seen["Content-Type"] == "application/json"


def test_non_object_json_body_is_passed_as_body(echo):
    assert requests.post(echo, json=[1, 2, 3]).json()["body"] == [1, 2, 3]
    assert requests.post(echo, json=42).json()["body"] == 42


def test_urlencoded_repeated_fields_become_lists(echo):
    response = requests.post(echo, data=[("a", "1"), ("b", "x"), ("b", "y"), ("e", "")])
    seen = response.json()
    assert response.status_code == 200
    assert (seen["a"], seen["b"], seen["e"]) == ("1", ["x", "y"], "")
    assert seen["Content-Type"] == "application/x-www-form-urlencoded"


def test_multipart_fields_and_files(echo):
    pdf = b"%PDF-1.4 \x00\xff binary"
    response = requests.post(echo, data={"reference": "r1", "tag": ["a", "b"]},
                             files={"resume": ("cv.pdf", pdf, "application/pdf")})
    seen = response.json()
    assert response.status_code == 200
    assert seen["reference"] == "r1"
    assert seen["tag"] == ["a", "b"]
    resume = seen["resume"]
    assert resume["filename"] == "cv.pdf"
    assert resume["content_type"] == "application/pdf"
    assert resume["size"] == len(pdf)
    assert base64.b64decode(resume["content"]) == pdf


def test_content_type_parameters_are_allowed(echo):
    response = requests.post(echo, data=b'{"a": 1}',
                             headers={"Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 200
    assert response.json()["a"] == 1


def test_headers_keep_their_spelling_and_repeats_are_joined(echo):
    parts = urlsplit(echo)
    connection = http.client.HTTPConnection(parts.hostname, parts.port)
    connection.putrequest("POST", parts.path)
    for header, value in [("content-type", "application/json"), ("X-Trace", "one"),
                          ("x-trace", "two"), ("content-length", "2")]:
        connection.putheader(header, value)
    connection.endheaders(b"{}")
    response = connection.getresponse()
    seen = json.loads(response.read())
    assert response.status == 200
    assert seen["content-type"] == "application/json"
    assert "Content-Type" not in seen  # a real dict with the name as sent
    assert seen["X-Trace"] == "one, two"


def test_header_lookup_ignores_case_on_a_real_dict(daemon, name):
    url = daemon.deploy(name, LOOKUP)
    response = requests.post(url, json={}, headers={"x-custom": "v"})
    assert response.text == "application/json|v|True|True"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_methods_other_than_post_get_405(echo, method):
    response = requests.request(method, echo, json={})
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert response.headers["X-Wfd-Execution-Id"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/xml",
                                          "application/jsonx"])
def test_other_content_types_get_415(echo, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = requests.post(echo, data=b"{}", headers=headers)
    assert response.status_code == 415
    assert response.json()["status"] == "unsupported_media_type"


@pytest.mark.parametrize("content_type, body", [
    ("application/json", b"{not json"),
    ("application/json", b""),
    ("multipart/form-data", b"garbage"),
    ("multipart/form-data; boundary=xyz", b"--nope\r\n"),
    ("application/x-www-form-urlencoded", b"\xff\xfe=\xff"),
])
def test_bodies_that_do_not_parse_get_400(daemon, echo, name, content_type, body):
    response = requests.post(echo, data=body, headers={"Content-Type": content_type})
    assert response.status_code == 400
    assert response.json()["status"] == "bad_request"
    assert daemon.executions(name) == []  # nothing ran


SIZE = """
def workflow(_request, settings):
    return {"status_code": 200, "body": str(len(_request["pad"]))}
"""


def test_the_body_limit_is_exact_with_and_without_length(make_daemon, name):
    daemon = make_daemon("max_body_mb = 0.25\n")
    url = daemon.deploy(name, SIZE)
    limit = 256 * 1024
    json_type = {"Content-Type": "application/json"}

    def body(size: int) -> bytes:
        return b'{"pad": "' + b"x" * (size - 11) + b'"}'

    def chunked(size: int) -> Iterator[bytes]:
        data = body(size)
        for start in range(0, size, 10_000):  # no Content-Length: sent chunked
            yield data[start:start + 10_000]

    assert len(body(limit)) == limit
    for size in (limit, limit + 1):
        with_length = requests.post(url, data=body(size), headers=json_type)
        without = requests.post(url, data=chunked(size), headers=json_type)
        assert "Content-Length" not in without.request.headers
        if size == limit:  # exactly max_body_mb is accepted, and read whole
            assert [r.status_code for r in (with_length, without)] == [200, 200]
            assert with_length.text == without.text == str(limit - 11)
        else:
            assert [r.status_code for r in (with_length, without)] == [413, 413]
            assert {r.json()["status"] for r in (with_length, without)} == {"payload_too_large"}
    assert [e["http_status"] for e in daemon.executions(name)] == [200, 200]


def test_wrong_key_unknown_and_disabled_are_the_same_404(daemon, echo, name):
    good = requests.post(echo, json={})
    assert good.status_code == 200
    base, key = echo.rsplit("/", 1)
    wrong = key[:-1] + ("y" if key.endswith("x") else "x")  # always a different key
    wrong_key = requests.post(f"{base}/{wrong}", json={})
    unknown = requests.post(echo.replace(f"/{name}/", "/no-such-workflow/"), json={})
    wrong_team = requests.post(echo.replace("/teams/default/", "/teams/other/"), json={})
    daemon.ctl("disable", name)
    disabled = requests.post(echo, json={})
    answers = [wrong_key, unknown, wrong_team, disabled]
    assert [r.status_code for r in answers] == [404] * 4
    assert len({r.json()["status"] for r in answers}) == 1
    assert len({tuple(sorted(set(r.headers) - {"Date", "X-Wfd-Execution-Id"}))
                for r in answers}) == 1
    daemon.ctl("enable", name)
    assert requests.post(echo, json={}).status_code == 200


@pytest.mark.parametrize("runtime, status", [("python3.6", 200), ("python3.13", 200),
                                             ("python2.7", 404), ("python3", 404)])
def test_any_python3_minor_in_the_url_works(echo, runtime, status):
    url = re.sub(r"/python3\.\d+/", f"/{runtime}/", echo)
    assert url != echo or runtime == "python3.11"
    assert requests.post(url, json={}).status_code == status


def test_every_catch_response_carries_the_execution_id(daemon, echo, name):
    response = requests.post(echo, json={})
    execution_id = response.headers["X-Wfd-Execution-Id"]
    assert [e["id"] for e in daemon.executions(name)] == [execution_id]
    assert len(execution_id) == 26
