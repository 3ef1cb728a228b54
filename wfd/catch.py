"""The catch contract (SPEC 2): an HTTP request in, `_request` for the workflow, a response out.

Everything a catch request goes through between the listener and the
dispatcher lives here: the route, the key check, the refusals, turning
headers, query and body into fields, and the reply.
"""

import base64
import hmac
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from wfd import domain, ids, logs
from wfd.admission import Overloaded
from wfd.config import Config
from wfd.dispatch import Dispatcher
from wfd.domain import Kind, Status, Trigger, WorkflowResponse
from wfd.store import Store

ACCEPTED_TYPES = ("application/json", "multipart/form-data", "application/x-www-form-urlencoded")
# Framing is the server's business, not the workflow's: these would corrupt the response.
DROPPED_RESPONSE_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})
EXECUTION_HEADER = "X-Wfd-Execution-Id"
CATCH_ROUTE = r"/teams/{team}/{name}/{runtime:python3\.\d+}/{key}"
# Compared against when a workflow is unknown, so both paths do the same work.
_NO_KEY = ids.catch_key()


class BadRequest(Exception):
    """The body does not parse as its declared content type (HTTP 400)."""


def header_fields(raw_headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Headers under the name the client sent; repeats joined with `, `.

    A header repeated with different capitalisation is one header: it keeps
    the spelling seen first.
    """
    fields: dict[str, str] = {}
    spelling: dict[str, str] = {}
    for raw_name, raw_value in raw_headers:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("utf-8", "replace")
        folded = name.lower()
        if folded in spelling:
            fields[spelling[folded]] += ", " + value
        else:
            spelling[folded] = name
            fields[name] = value
    return fields


def _grouped(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Pairs as a dict; a name sent several times becomes a list of its values."""
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name not in out:
            out[name] = value
        elif isinstance(out[name], list):
            out[name].append(value)
        else:
            out[name] = [out[name], value]
    return out


def json_fields(value: Any) -> dict[str, Any]:
    """A JSON object's keys, or a non-object JSON value under `body`."""
    return value if isinstance(value, dict) else {"body": value}


async def body_fields(request: web.Request, content_type: str) -> dict[str, Any]:
    """The body's fields, read within the app's size limit.

    aiohttp stops reading with HTTPRequestEntityTooLarge as soon as the body
    passes `client_max_size`, so an oversized body is never held whole.
    """
    if content_type == "multipart/form-data":
        try:
            form = await request.post()
        except web.HTTPRequestEntityTooLarge:
            raise
        except Exception as exc:
            raise BadRequest(f"malformed multipart body: {exc}") from None
        return _grouped([(name, _file_field(value) if isinstance(value, web.FileField)
                          else value) for name, value in form.items()])
    body = await request.read()
    if content_type == "application/json":
        try:
            return json_fields(orjson.loads(body))
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"malformed JSON body: {exc}") from None
    try:
        text = body.decode(request.charset or "utf-8")
        return _grouped(parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text)))
    except (UnicodeDecodeError, LookupError, ValueError) as exc:
        raise BadRequest(f"malformed form body: {exc}") from None


def _file_field(field: web.FileField) -> dict[str, Any]:
    content = field.file.read()
    return {"filename": field.filename, "content_type": field.content_type,
            "size": len(content), "content": base64.b64encode(content).decode()}


def status_response(status: Status, execution_id: str) -> WorkflowResponse:
    """The response of a catch execution whose workflow did not write one itself.

    What the caller gets (`reply`) and what `wfd ctl run` shows: the status
    the execution ended with, as JSON, under its HTTP status.
    """
    return {"status_code": domain.http_status(status, None),
            "body": status_body(status, execution_id).decode(),
            "headers": {"Content-Type": "application/json"}}


def status_body(status: str, execution_id: str) -> bytes:
    """The JSON body of every response the workflow did not write itself."""
    return orjson.dumps({"status": status, "execution_id": execution_id})


def json_reply(http_status: int, status: str, execution_id: str,
               headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=http_status, body=status_body(status, execution_id),
                        content_type="application/json",
                        headers={EXECUTION_HEADER: execution_id, **(headers or {})})


def workflow_reply(response: WorkflowResponse, execution_id: str) -> web.Response:
    """Exactly the response the workflow returned (already validated)."""
    headers = {k: v for k, v in response["headers"].items()
               if k.lower() not in DROPPED_RESPONSE_HEADERS}
    if not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "text/plain; charset=utf-8"
    headers[EXECUTION_HEADER] = execution_id
    return web.Response(status=response["status_code"], body=response["body"].encode(),
                        headers=headers)


class CatchHandler:
    """Answers `POST /teams/{team}/{name}/python3.{minor}/{key}`."""

    def __init__(self, store: Store, dispatcher: Dispatcher) -> None:
        self.store = store
        self.dispatcher = dispatcher

    @property
    def config(self) -> Config:
        """The dispatcher's, so that a SIGHUP reload reaches the catch routes too."""
        return self.dispatcher.config

    async def __call__(self, request: web.Request) -> web.Response:
        execution_id = ids.execution_id()
        if request.method != "POST":
            return json_reply(405, "method_not_allowed", execution_id, {"Allow": "POST"})
        info = request.match_info
        workflow = await self.store.workflow(info["name"])
        key_ok = hmac.compare_digest(info["key"].encode(),
                                     (workflow.catch_key if workflow else _NO_KEY).encode())
        if not (key_ok and workflow and workflow.enabled and workflow.kind == Kind.CATCH
                and info["team"] == self.config.team):
            return json_reply(404, "not_found", execution_id)
        content_type = self._content_type(request)
        if content_type not in ACCEPTED_TYPES:
            return json_reply(415, "unsupported_media_type", execution_id)
        if (request.content_length or 0) > self.config.max_body_bytes:
            return json_reply(413, "payload_too_large", execution_id)
        try:
            reservation = self.dispatcher.reserve(workflow)
        except Overloaded:
            logs.event("overloaded", workflow=workflow.name, id=execution_id)
            return json_reply(503, "overloaded", execution_id, {"Retry-After": "1"})
        try:
            fields = header_fields(request.raw_headers)
            fields.update(self._query(request))
            fields.update(await body_fields(request, content_type))
        except web.HTTPRequestEntityTooLarge:
            reservation.cancel()
            return json_reply(413, "payload_too_large", execution_id)
        except BadRequest:
            reservation.cancel()
            return json_reply(400, "bad_request", execution_id)
        except BaseException:
            reservation.cancel()
            raise
        executed = await self.dispatcher.execute(workflow, Trigger.CATCH, fields, reservation,
                                                 execution_id)
        return reply(executed.record.status, executed.response, execution_id)

    @staticmethod
    def _content_type(request: web.Request) -> str:
        declared = request.headers.get("Content-Type", "")
        return declared.split(";", 1)[0].strip().lower()

    @staticmethod
    def _query(request: web.Request) -> dict[str, Any]:
        query = request.query
        return {name: values[0] if len(values) == 1 else values
                for name in query for values in [query.getall(name)]}


def reply(status: Status, response: WorkflowResponse | None, execution_id: str
          ) -> web.Response:
    """The caller's response for a finished catch execution."""
    if response is None:
        response = status_response(status, execution_id)
    return workflow_reply(response, execution_id)
