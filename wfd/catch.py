"""The catch contract (SPEC 2): an HTTP request in, `_request` for the workflow, a response out.

Everything a catch request goes through between the listener and the
dispatcher lives here: the route, the key check, the refusals, turning
headers, query and body into fields, and the reply.
"""

import asyncio
import base64
import functools
import hmac
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import BodyPartReader, MultipartReader, StreamReader, web
from multidict import CIMultiDictProxy, MultiDictProxy

from sandbox import protocol
from wfd import domain, idempotency, ids, logs, signatures, stages
from wfd.admission import BodyHold, Overloaded, Reservation
from wfd.config import Config
from wfd.delivery import Deliveries
from wfd.dispatch import Dispatcher, Executed
from wfd.domain import Kind, Status, Trigger, WorkflowResponse
from wfd.executor import JobError
from wfd.idempotency import Idempotency
from wfd.metrics import Metrics
from wfd.store import DeliveryPolicy, RequestFields, Store, Workflow

ACCEPTED_TYPES = ("application/json", "multipart/form-data", "application/x-www-form-urlencoded")
# Framing is the server's business, not the workflow's: these would corrupt the response.
DROPPED_RESPONSE_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})
EXECUTION_HEADER = "X-Wfd-Execution-Id"
# The status of a catch execution whose record the store could not write.
STORE_UNAVAILABLE = "store_unavailable"
CATCH_ROUTE = r"/teams/{team}/{name}/{runtime:python3\.\d+}/{key}"
# Bodies from this size on are parsed in a thread, so the event loop keeps
# answering other requests: 10 MiB of urlencoded form takes ~2 s to parse.
PARSE_IN_THREAD_BYTES = 256 * 1024
# Large bodies parsed at once. As Python objects a body costs 5x (JSON) to 20x
# (a form of tiny fields) its size, so this bounds that memory; and the
# event loop keeps most of the GIL against one busy thread.
PARSE_THREADS = 1
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


class PayloadTooLarge(Exception):
    """The body passed `max_body_mb` while being read (HTTP 413)."""


async def read_body(request: web.Request, content_type: str, limit: int,
                    whole: bool) -> bytearray | MultiDictProxy[Any]:
    """The raw body (a parsed form for multipart), read no further than `limit` bytes.

    Read chunk by chunk rather than with `request.read()`, which would keep a
    second copy of the body alive for as long as the request lives. `whole`:
    the raw bytes even of a multipart body (a signature covers them).
    """
    if content_type == "multipart/form-data" and not whole:
        try:
            return await request.post()  # streams files to temporary files
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge from None
        except (ValueError, AssertionError, UnicodeDecodeError) as exc:
            raise BadRequest(f"malformed multipart body: {exc}") from None
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge
    return body


def request_json(fields: dict[str, Any], content_type: str,
                 body: bytearray | MultiDictProxy[Any] | dict[str, Any],
                 charset: str | None, max_depth: int) -> bytes:
    """`_request` as the JSON the child reads: `fields`, then the body's.

    Serialized as soon as it is parsed so that what waits for a slot is one
    compact copy, not Python objects 5 to 20 times the body's size (nothing
    may keep a reference to them). CPU-bound: the caller runs it in a thread
    for a large body. `body` may be fields parsed already (signed multipart).
    """
    parsed = (body if isinstance(body, dict)
              else parse_body(content_type, body, charset, max_depth))
    request = {**fields, **parsed}
    try:
        return protocol.dumps(request)
    except protocol.CodecError as exc:
        raise BadRequest(f"body cannot be handed to the workflow: {exc}") from None


def parse_body(content_type: str, body: bytearray | MultiDictProxy[Any],
               charset: str | None, max_depth: int) -> dict[str, Any]:
    """The body's fields (SPEC 2): a JSON object's keys, form fields, files.

    JSON nested deeper than `max_depth` is refused; integers keep their exact
    value whatever their size (sandbox/protocol.py).
    """
    if isinstance(body, MultiDictProxy):
        return _grouped([(name, _file_field(value) if isinstance(value, web.FileField)
                          else value) for name, value in body.items()])
    if content_type == "application/json":
        try:
            return json_fields(protocol.loads(body, max_depth))
        except protocol.CodecError as exc:
            raise BadRequest(f"malformed JSON body: {exc}") from None
    try:
        text = body.decode(charset or "utf-8")
        return _grouped(parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text),
                                  errors="strict"))
    except (UnicodeDecodeError, LookupError, ValueError) as exc:
        raise BadRequest(f"malformed form body: {exc}") from None


async def _multipart_from_bytes(request: web.Request, raw: bytes) -> dict[str, Any]:
    """The fields of a multipart body read earlier, as `request.post()` would give them."""
    stream = StreamReader(request.protocol, limit=len(raw) + 1, loop=asyncio.get_running_loop())
    stream.feed_data(raw)
    stream.feed_eof()
    pairs: list[tuple[str, Any]] = []
    async for part in MultipartReader(request.headers, stream):
        if not isinstance(part, BodyPartReader) or part.name is None:
            raise ValueError("nested or unnamed multipart part")
        content = bytes(await part.read(decode=True))
        if part.filename:
            pairs.append((part.name, {
                "filename": part.filename,
                "content_type": part.headers.get("Content-Type", "application/octet-stream"),
                "size": len(content), "content": base64.b64encode(content).decode()}))
        else:
            pairs.append((part.name, content.decode(part.get_charset(default="utf-8"))))
    return _grouped(pairs)


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
    """Answers `POST /teams/{team}/{name}/python3.{minor}/{key}`.

    After the cheap refusals (405, 404, 415, 413 by Content-Length), the
    body's declared size is held against the pending-bytes budget (503 past
    it) and the body is read within `body_timeout_s` (408 and close past
    it), holding no execution slot. It is then parsed, in a thread when
    large, and only then does the execution queue for a slot.
    """

    def __init__(self, store: Store, dispatcher: Dispatcher, metrics: Metrics,
                 deliveries: Deliveries) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.deliveries = deliveries
        self.idempotency = Idempotency(store)
        self._parsers = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="wfd-parse")

    @property
    def config(self) -> Config:
        """The dispatcher's, so that a SIGHUP reload reaches the catch routes too."""
        return self.dispatcher.config

    def close(self) -> None:
        """Stop the parsing threads (the listener is closed)."""
        self._parsers.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        execution_id = ids.execution_id()
        with stages.traced(execution_id, self.config.trace_stages) as trace:
            response = await self._handle(request, execution_id)
            if trace is not None and not response.prepared:  # sent here, to be timed
                await response.prepare(request)
                await response.write_eof()
                stages.stamp("sent")
            return response

    async def _handle(self, request: web.Request, execution_id: str) -> web.StreamResponse:
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
        limit = self.config.max_body_bytes
        declared = request.content_length
        # Refused before the body is read: closing then spares the daemon
        # reading and discarding what is left of it (aiohttp's lingering).
        if (declared or 0) > limit:
            return await send_and_close(request, json_reply(413, "payload_too_large",
                                                            execution_id))
        try:
            # A body without Content-Length (chunked) may be as large as the limit.
            hold = self.dispatcher.hold_body(limit if declared is None else declared)
        except Overloaded as exc:
            return await send_and_close(request, self._overloaded(workflow, execution_id, exc))
        try:
            return await self._admit(request, workflow, content_type, hold, execution_id)
        finally:
            hold.release()

    async def _admit(self, request: web.Request, workflow: Workflow, content_type: str,
                     hold: BodyHold, execution_id: str) -> web.StreamResponse:
        """Read, check and parse the body, then queue for a slot and deliver."""
        policy = await self.store.delivery_policy(workflow.name)
        whole = policy.scheme in signatures.SIGNS_BODY
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                body: bytearray | MultiDictProxy[Any] | dict[str, Any] = await read_body(
                    request, content_type, self.config.max_body_bytes, whole)
            raw = bytes(body) if whole and isinstance(body, bytearray) else None
            if policy.scheme and not self._signed(workflow, policy.scheme, policy.secret,
                                                  request, raw, execution_id):
                return json_reply(401, "invalid_signature", execution_id)
            key = idempotency.request_key(request.headers, policy.scheme)
            if content_type == "multipart/form-data" and raw is not None:
                try:
                    body = await _multipart_from_bytes(request, raw)
                except Exception as exc:
                    raise BadRequest(f"malformed multipart body: {exc}") from None
            del raw
            fields = header_fields(request.raw_headers)
            fields.update(self._query(request))
            work = functools.partial(request_json, fields, content_type, body, request.charset,
                                     self.config.max_json_depth)
            if (request.content_length or PARSE_IN_THREAD_BYTES) >= PARSE_IN_THREAD_BYTES:
                serialized = await asyncio.get_running_loop().run_in_executor(
                    self._parsers, work)
            else:
                serialized = work()
        except TimeoutError:
            self.metrics.client_timeout("body")
            return await send_and_close(request, json_reply(408, "request_timeout",
                                                            execution_id))
        except PayloadTooLarge:
            return await send_and_close(request, json_reply(413, "payload_too_large",
                                                            execution_id))
        except (BadRequest, idempotency.BadKey):
            return json_reply(400, "bad_request", execution_id)
        except ConnectionError:  # the client went away mid-body: nobody to answer
            return json_reply(400, "bad_request", execution_id)
        del work, body  # only the serialized copy waits
        stages.stamp("parsed")
        hold.resize(len(serialized))
        request_fields = orjson.Fragment(serialized)
        try:
            reservation = self.dispatcher.reserve(workflow, body=hold)
        except Overloaded as exc:
            return self._overloaded(workflow, execution_id, exc)
        run_async = policy.async_ or prefers_async(request.headers)
        if key is not None:
            return await self._once(key, workflow, policy, request_fields, reservation,
                                    execution_id, run_async)
        return (await self._deliver(workflow, policy, request_fields, reservation,
                                    execution_id, run_async))[0]

    @staticmethod
    def _overloaded(workflow: Workflow, execution_id: str, exc: Overloaded) -> web.Response:
        logs.event("overloaded", workflow=workflow.name, id=execution_id, reason=str(exc))
        return json_reply(503, "overloaded", execution_id, {"Retry-After": "1"})

    async def _once(self, key: str, workflow: Workflow, policy: DeliveryPolicy,
                    fields: RequestFields, reservation: Reservation, execution_id: str,
                    run_async: bool) -> web.Response:
        """A request with an idempotency key: the first response again, or deliver it."""
        async with self.idempotency.hold(workflow.name, key, execution_id) as slot:
            if slot.first is not None:
                reservation.cancel()
                return idempotency.replayed(slot.first)
            response, status = await self._deliver(workflow, policy, fields, reservation,
                                                   execution_id, run_async, key)
            if status not in ("accepted", "interrupted", STORE_UNAVAILABLE, "bad_request"):
                slot.answer = idempotency.stored(response)
            return response

    async def _deliver(self, workflow: Workflow, policy: DeliveryPolicy, fields: RequestFields,
                       reservation: Reservation, execution_id: str, run_async: bool,
                       key: str | None = None) -> tuple[web.Response, str]:
        """Run the request now, or queue it durably and answer 202; the reply and a status.

        The 202 of an async request with an idempotency key is stored with
        the delivery, in the commit that makes the delivery durable.
        """
        if run_async:
            reservation.cancel()
            response = json_reply(202, "accepted", execution_id,
                                  {"Preference-Applied": "respond-async"})
            await self.deliveries.accept(workflow, fields, execution_id, key,
                                         idempotency.stored(response) if key else None)
            return response, "accepted"
        try:
            executed = await self.deliveries.run(workflow, policy, Trigger.CATCH, fields,
                                                 reservation, execution_id)
        except JobError:  # not valid UTF-8, say: nothing was started
            return json_reply(400, "bad_request", execution_id), "bad_request"
        if not executed.recorded:
            return executed_reply(executed), STORE_UNAVAILABLE
        return executed_reply(executed), executed.record.status

    def _signed(self, workflow: Workflow, scheme: str, secret: str | None,
                request: web.Request, raw: bytes | None, execution_id: str) -> bool:
        """Whether the request passes the workflow's signature check; counts and logs if not.

        A scheme without a secret (imported without `--with-secrets`) refuses
        everything until `wfd ctl verify` gives it one.
        """
        try:
            if not secret:
                raise signatures.InvalidSignature("no secret is set: run wfd ctl verify")
            signatures.verify(scheme, secret, request.headers, raw or b"", time.time())
        except signatures.InvalidSignature as exc:
            self.metrics.signature_rejected(workflow.name, scheme)
            logs.event("invalid-signature", workflow=workflow.name, scheme=scheme,
                       id=execution_id, reason=str(exc))
            return False
        return True

    @staticmethod
    def _content_type(request: web.Request) -> str:
        declared = request.headers.get("Content-Type", "")
        return declared.split(";", 1)[0].strip().lower()

    @staticmethod
    def _query(request: web.Request) -> dict[str, Any]:
        """Query parameters; percent-escapes that are not UTF-8 are refused, not replaced."""
        try:
            return _grouped(parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True,
                                      errors="strict"))
        except UnicodeDecodeError as exc:
            raise BadRequest(f"query string is not UTF-8: {exc}") from None


def executed_reply(executed: Executed) -> web.Response:
    """The caller's response for a catch execution that ran.

    One whose record the store could not write answers 503: whatever the
    workflow did, nothing of it (record, settings) was kept, so the caller
    should send it again once the daemon is healthy.
    """
    record = executed.record
    if not executed.recorded:
        return json_reply(503, STORE_UNAVAILABLE, record.id, {"Retry-After": "5"})
    return reply(record.status, executed.response, record.id)


async def send_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send `response`, then close the connection: the rest of the body is not awaited.

    aiohttp would otherwise keep reading what is left of the body, up to its
    lingering time (10 s), before closing: under a flood of refused 10 MiB
    bodies that reading costs more than everything else. A client that reads
    the answer while it sends (curl, aiohttp) sees it; one that only reads
    once its body is sent may see the connection reset instead, which means
    the same: try again later.
    """
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()
    return response


def prefers_async(headers: CIMultiDictProxy[str]) -> bool:
    """`Prefer: respond-async` (RFC 7240), among other preferences or not."""
    return any(token.split(";", 1)[0].strip().lower() == "respond-async"
               for value in headers.getall("Prefer", []) for token in value.split(","))


def reply(status: Status, response: WorkflowResponse | None, execution_id: str
          ) -> web.Response:
    """The caller's response for a finished catch execution."""
    if response is None:
        response = status_response(status, execution_id)
    return workflow_reply(response, execution_id)
