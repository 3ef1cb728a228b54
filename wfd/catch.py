"""The catch contract (SPEC 2): an HTTP request in, `_request` for the workflow, a response out."""

import base64
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

ACCEPTED_TYPES = ("application/json", "multipart/form-data", "application/x-www-form-urlencoded")
# Framing is the server's business, not the workflow's: these would corrupt the response.
DROPPED_RESPONSE_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})
EXECUTION_HEADER = "X-Wfd-Execution-Id"


class BadRequest(Exception):
    """The body does not parse as its declared content type (HTTP 400)."""


def header_fields(raw_headers: list[tuple[bytes, bytes]] | tuple) -> dict[str, str]:
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


def status_body(status: str, execution_id: str) -> bytes:
    """The JSON body of every response the workflow did not write itself."""
    return orjson.dumps({"status": status, "execution_id": execution_id})


def json_reply(http_status: int, status: str, execution_id: str,
               headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=http_status, body=status_body(status, execution_id),
                        content_type="application/json",
                        headers={EXECUTION_HEADER: execution_id, **(headers or {})})


def workflow_reply(response: dict[str, Any], execution_id: str) -> web.Response:
    """Exactly the response the workflow returned (already validated)."""
    headers = {k: v for k, v in response["headers"].items()
               if k.lower() not in DROPPED_RESPONSE_HEADERS}
    if not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "text/plain; charset=utf-8"
    headers[EXECUTION_HEADER] = execution_id
    return web.Response(status=response["status_code"], body=response["body"].encode(),
                        headers=headers)
