"""The catch contract's pure parts (wfd/catch.py): fields, body parsing and replies.

Body parsing runs on aiohttp's in-process test server: a real request over
loopback, with the app's body limit, and no daemon or child behind it.
"""

import asyncio
from collections.abc import Coroutine
from typing import Any

import orjson
import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient, TestServer

from wfd.catch import (
    EXECUTION_HEADER,
    BadRequest,
    CatchHandler,
    PayloadTooLarge,
    header_fields,
    json_fields,
    parse_body,
    read_body,
    reply,
    status_body,
    workflow_reply,
)
from wfd.domain import Status


def test_headers_keep_the_clients_spelling_and_join_repeats() -> None:
    raw = [(b"HTTP-HRFLOW-SIGNATURE", b"sig"), (b"x-tag", b"a"), (b"X-Tag", b"b"),
           (b"Accept", b"*/*"), (b"x-bytes", "caf\u00e9".encode())]
    assert header_fields(raw) == {"HTTP-HRFLOW-SIGNATURE": "sig", "x-tag": "a, b",
                                  "Accept": "*/*", "x-bytes": "caf\u00e9"}


def test_a_header_value_that_is_not_utf8_is_replaced_not_refused() -> None:
    assert header_fields([(b"X-Raw", b"\xff")]) == {"X-Raw": "\ufffd"}


@pytest.mark.parametrize(("value", "fields"), [
    ({"a": 1, "body": "mine"}, {"a": 1, "body": "mine"}),
    ([1, 2], {"body": [1, 2]}),
    (7, {"body": 7}),
    (None, {"body": None}),
    ("text", {"body": "text"}),
])  # fmt: skip
def test_a_json_object_gives_its_keys_anything_else_arrives_as_body(value: Any,
                                                                     fields: dict) -> None:
    assert json_fields(value) == fields


def parsed(content_type: str, data: Any, max_size: int = 1 << 20) -> Any:
    """What read_body and parse_body make of `data` sent with `content_type`, or the
    exception's name."""

    async def handler(request: web.Request) -> web.Response:
        try:
            body = await read_body(request, content_type, max_size, whole=False)
            return web.json_response(parse_body(content_type, body, request.charset, 64))
        except (BadRequest, PayloadTooLarge) as exc:
            return web.json_response(type(exc).__name__)

    async def main() -> Any:
        app = web.Application(client_max_size=max_size)
        app.router.add_post("/", handler)
        async with TestClient(TestServer(app)) as client:
            headers = {} if isinstance(data, FormData) else {"Content-Type": content_type}
            response = await client.post("/", data=data, headers=headers)
            return await response.json()

    return run(main())


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_json_bodies() -> None:
    assert parsed("application/json", b'{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}
    assert parsed("application/json", b"[1]") == {"body": [1]}
    assert parsed("application/json", b"{oops") == "BadRequest"
    assert parsed("application/json", b"") == "BadRequest"


def test_urlencoded_bodies_repeat_fields_as_lists() -> None:
    form = "application/x-www-form-urlencoded"
    assert parsed(form, b"a=1&tag=x&tag=y&empty=") == {"a": "1", "tag": ["x", "y"], "empty": ""}
    assert parsed(form, b"") == {}
    assert parsed(form, b"\xff=1") == "BadRequest"
    assert parsed(form, b"no-equals-sign") == "BadRequest"


def test_multipart_files_arrive_in_base64_with_their_size() -> None:
    form = FormData()
    form.add_field("name", "Ada")
    form.add_field("tag", "x")
    form.add_field("tag", "y")
    form.add_field("cv", b"%PDF\x00\xff", filename="cv.pdf", content_type="application/pdf")
    assert parsed("multipart/form-data", form) == {
        "name": "Ada", "tag": ["x", "y"],
        "cv": {"filename": "cv.pdf", "content_type": "application/pdf", "size": 6,
               "content": "JVBERgD/"}}


def test_a_malformed_multipart_body_is_a_bad_request() -> None:
    assert parsed("multipart/form-data; boundary=xyz", b"--nope\r\n") == "BadRequest"


def test_a_body_over_the_limit_stops_being_read() -> None:
    assert parsed("application/json", b'"' + b"x" * 98 + b'"', max_size=100) == {
        "body": "x" * 98}
    assert parsed("application/json", b'"' + b"x" * 99 + b'"', max_size=100) == (
        "PayloadTooLarge")


def seen(path: str, headers: dict[str, str]) -> Any:
    """The content type and query fields CatchHandler reads from a real request."""

    async def handler(request: web.Request) -> web.Response:
        return web.json_response([CatchHandler._content_type(request),
                                  CatchHandler._query(request)])

    async def main() -> Any:
        app = web.Application()
        app.router.add_post("/", handler)
        async with TestClient(TestServer(app)) as client:
            return await (await client.post(path, headers=headers)).json()

    return run(main())


@pytest.mark.parametrize(("declared", "content_type"), [
    ("application/json", "application/json"),
    ("Application/JSON; charset=utf-8", "application/json"),
    (" multipart/form-data ; boundary=x", "multipart/form-data"),
    ("", ""),
])  # fmt: skip
def test_the_content_type_is_compared_without_parameters_or_case(declared: str,
                                                                content_type: str) -> None:
    assert seen("/", {"Content-Type": declared})[0] == content_type


def test_query_fields_repeat_as_lists() -> None:
    assert seen("/?page=2&tag=a&tag=b&empty=&q=a%20b", {})[1] == {
        "page": "2", "tag": ["a", "b"], "empty": "", "q": "a b"}


def test_status_bodies_are_json_with_the_execution_id() -> None:
    assert orjson.loads(status_body("timeout", "01abc")) == {"status": "timeout",
                                                             "execution_id": "01abc"}


def test_the_workflows_response_is_sent_as_it_asked_without_framing_headers() -> None:
    sent = workflow_reply({"status_code": 201, "body": "caf\u00e9", "headers": {
        "X-Id": "7", "Content-Length": "999", "transfer-encoding": "chunked",
        "Connection": "close"}}, "01abc")
    assert sent.status == 201
    assert sent.body == "caf\u00e9".encode()
    assert dict(sent.headers) == {"X-Id": "7", "Content-Type": "text/plain; charset=utf-8",
                                  EXECUTION_HEADER: "01abc"}


def test_the_workflows_own_content_type_is_kept() -> None:
    sent = workflow_reply({"status_code": 200, "body": "{}", "headers": {
        "content-type": "application/json"}}, "01abc")
    assert sent.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(("status", "code"), [
    (Status.SUCCESS, 200),
    (Status.ERROR, 500),
    (Status.TIMEOUT, 504),
    (Status.MEMORY, 500),
    (Status.CPU, 500),
    (Status.INTERRUPTED, 503),
    (Status.SKIPPED, 500),
])  # fmt: skip
def test_a_failure_answers_its_status_and_nothing_else(status: Status, code: int) -> None:
    sent = reply(status, None, "01abc")
    assert sent.status == code
    assert sent.content_type == "application/json"
    assert orjson.loads(sent.body) == {"status": status, "execution_id": "01abc"}
    assert sent.headers[EXECUTION_HEADER] == "01abc"


def test_a_finished_execution_with_a_response_answers_that_response() -> None:
    sent = reply(Status.SUCCESS, {"status_code": 418, "body": "teapot", "headers": {}}, "01")
    assert (sent.status, sent.body) == (418, b"teapot")
