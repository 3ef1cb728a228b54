"""All persistent state, in one SQLite file in WAL mode, and all of wfd's SQL.

Keeping every statement here is what lets a later store speak PostgreSQL
without touching the rest of the daemon. Each public method is one
transaction; the methods that must be atomic together (a settings merge and
the execution record that acknowledges it) are one method.

Durability: WAL with `synchronous=NORMAL` makes every committed transaction
survive a crash of the daemon (`kill -9`); only an operating-system crash or
power loss can take back the last few commits.

The request path reads no SQL when it can help it: workflows and their
delivery policies are kept in memory once read (`Store.workflow`,
`Store.delivery_policy`), and every method that writes them forgets them
(`Store._forget`), in the write's own locked section. That is sound
because the daemon is the only writer of its database (the data directory
is its own, 0700; `wfd ctl` goes through it).
An execution's whole transaction (settings merge, record, stored request)
runs in the connection's thread in one hop, committed together with those
of the other executions that finished meanwhile (`Store._group_commit`).
"""

import asyncio
import contextlib
import functools
import sqlite3
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import orjson

from sandbox import protocol
from wfd.domain import Kind, SettingsChange, Status, Trigger

MIGRATIONS = [
    """
    CREATE TABLE workflows (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('catch', 'pull')),
        enabled INTEGER NOT NULL DEFAULT 1,
        version INTEGER NOT NULL,
        catch_key TEXT NOT NULL,
        settings TEXT NOT NULL DEFAULT '{}',
        limits TEXT NOT NULL DEFAULT '{}',
        schedule TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE versions (
        workflow TEXT NOT NULL REFERENCES workflows (name) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        code TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (workflow, version)
    );
    CREATE TABLE executions (
        id TEXT PRIMARY KEY,
        workflow TEXT NOT NULL,
        version INTEGER NOT NULL,
        trigger TEXT NOT NULL,
        status TEXT NOT NULL,
        started_at TEXT NOT NULL,
        duration_ms REAL NOT NULL,
        http_status INTEGER,
        error TEXT,
        traceback TEXT,
        output TEXT NOT NULL DEFAULT '',
        output_truncated INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX executions_by_workflow ON executions (workflow, id);
    """,
    # 2: pull timers. next_due survives restarts; skipped counts ticks that
    # came while a run was still going.
    """
    ALTER TABLE workflows ADD COLUMN next_due TEXT;
    ALTER TABLE workflows ADD COLUMN skipped INTEGER NOT NULL DEFAULT 0;
    """,
    # 3: retention by age deletes the oldest records first without a table scan.
    """
    CREATE INDEX executions_by_started ON executions (started_at);
    """,
    # delivery (SPEC 11): signatures, the durable queue of async deliveries,
    # stored requests for replay, idempotency keys, and each record's lineage.
    """
    CREATE TABLE delivery_policies (
        workflow TEXT PRIMARY KEY REFERENCES workflows (name) ON DELETE CASCADE,
        policy TEXT NOT NULL DEFAULT '{}',
        scheme TEXT,
        secret TEXT
    );
    CREATE TABLE requests (
        id TEXT PRIMARY KEY,
        workflow TEXT NOT NULL,
        body BLOB NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX requests_by_created ON requests (created_at);
    CREATE TABLE deliveries (
        id TEXT PRIMARY KEY,
        workflow TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'dead')),
        attempt INTEGER NOT NULL,
        attempt_id TEXT NOT NULL,
        due_at TEXT NOT NULL,
        accepted_at TEXT NOT NULL,
        last_status TEXT
    );
    CREATE INDEX deliveries_by_state ON deliveries (state, workflow);
    CREATE TABLE idempotency (
        workflow TEXT NOT NULL,
        key TEXT NOT NULL,
        execution_id TEXT NOT NULL,
        created_at TEXT NOT NULL,
        status INTEGER,
        headers TEXT,
        body BLOB,
        PRIMARY KEY (workflow, key)
    );
    CREATE INDEX idempotency_by_created ON idempotency (created_at);
    ALTER TABLE executions ADD COLUMN attempt INTEGER;
    ALTER TABLE executions ADD COLUMN first_attempt_id TEXT;
    ALTER TABLE executions ADD COLUMN replay_of TEXT;
    ALTER TABLE executions ADD COLUMN request_id TEXT;
    CREATE INDEX executions_by_request ON executions (request_id);
    CREATE INDEX executions_by_first_attempt ON executions (first_attempt_id);
    """,
    # network: the workflow's own egress allowances (CIDR[:PORT] strings, JSON list).
    """
    ALTER TABLE workflows ADD COLUMN allow_net TEXT NOT NULL DEFAULT '[]';
    """,
    # records: one row the store-health probe rewrites to learn whether the
    # store can write again (after a full disk or a long lock).
    """
    CREATE TABLE store_probe (id INTEGER PRIMARY KEY CHECK (id = 1), at TEXT NOT NULL);
    INSERT INTO store_probe (id, at) VALUES (1, '');
    """,
    # environments (SPEC 10): a workflow's environment variables, kept apart
    # from its settings because they are secrets: never shown, never exported
    # unless asked.
    """
    CREATE TABLE workflow_env (
        workflow TEXT NOT NULL REFERENCES workflows (name) ON DELETE CASCADE,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (workflow, key)
    );
    """,
    # environments (SPEC 10): the packages a version declared, and the
    # environment they resolved to ({"hash", "python", "pins"}), both JSON.
    """
    ALTER TABLE versions ADD COLUMN requirements TEXT;
    ALTER TABLE versions ADD COLUMN environment TEXT;
    """,
]


WAL_LIMIT_BYTES = 64 * 1024 * 1024
# How long a write waits for another process's lock before it fails.
BUSY_TIMEOUT_MS = 5000
# Pages after which a commit checkpoints the WAL back into the database
# (SQLite's default, stated so that it is a decision).
WAL_AUTOCHECKPOINT_PAGES = 1000


class StoreError(Exception):
    """An operation the stored state does not allow; the message says why."""


# What a failed write raises: sqlite3's errors ("database is locked",
# "database or disk is full", "disk I/O error"), as opposed to StoreError.
WriteFailed = sqlite3.Error


def _degrades(exc: BaseException) -> bool:
    """A failure of the store itself rather than of one statement's data."""
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(
        exc, sqlite3.IntegrityError | sqlite3.ProgrammingError)


def utc_iso(moment: datetime | None = None) -> str:
    """ISO 8601 in UTC with milliseconds and a `Z`, the one timestamp format stored."""
    moment = moment or datetime.now(UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# A request's fields: a dict, or the JSON the catch handler serialized once
# (an orjson.Fragment, wfd/catch.py) so a waiting request is one compact copy.
RequestFields = dict[str, Any] | orjson.Fragment
_T = TypeVar("_T")


@dataclass(frozen=True)
class Workflow:
    """A workflow as stored, with its current version's code."""

    name: str
    kind: Kind
    enabled: bool
    version: int
    catch_key: str
    settings: dict[str, Any]
    limits: dict[str, Any]
    schedule: dict[str, Any] | None
    created_at: str
    updated_at: str
    code: str
    next_due: str | None = None
    skipped: int = 0
    allow_net: list[str] = field(default_factory=list)
    # Environment variables: secrets, so out of repr (and of public()).
    env: dict[str, str] = field(default_factory=dict, repr=False)
    # The current version's declared packages and resolved environment (None:
    # the default environment).
    requirements: dict[str, Any] | None = None
    environment: dict[str, Any] | None = None

    def public(self) -> dict[str, Any]:
        """What `wfd ctl` may show: everything but the code and the secret key."""
        return {
            "name": self.name,
            "kind": self.kind,
            "enabled": self.enabled,
            "version": self.version,
            "schedule": self.schedule,
            "limits": self.limits,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "next_due": self.next_due,
            "skipped": self.skipped,
            "allow_net": self.allow_net,
            "requirements": self.requirements,
            "environment": self.environment and self.environment["hash"],
        }


@dataclass
class ExecutionRecord:
    """One finished execution, as `wfd ctl executions` and `logs` show it."""

    id: str
    workflow: str
    version: int
    trigger: Trigger
    status: Status
    started_at: str
    duration_ms: float
    http_status: int | None = None
    error: str | None = None
    traceback: str | None = None
    output: str = ""
    output_truncated: bool = False
    # Delivery lineage (SPEC 11): the attempt of an async delivery and its
    # first attempt's id, the execution a replay re-ran, the stored request.
    attempt: int | None = None
    first_attempt_id: str | None = None
    replay_of: str | None = None
    request_id: str | None = None
    # Read, never written: the state of the delivery this attempt belongs to.
    delivery: str | None = None

    def summary(self) -> dict[str, Any]:
        """The record without its (possibly large) output and traceback."""
        return {
            "id": self.id,
            "workflow": self.workflow,
            "version": self.version,
            "trigger": self.trigger,
            "status": self.status,
            "started_at": self.started_at,
            "duration_ms": round(self.duration_ms, 3),
            "http_status": self.http_status,
            "error": self.error,
            "attempt": self.attempt,
            "first_attempt_id": self.first_attempt_id,
            "replay_of": self.replay_of,
            "delivery": self.delivery,
        }


@dataclass(frozen=True)
class DeliveryPolicy:
    """How a catch workflow takes deliveries (SPEC 11); defaults until deployed with flags.

    The secret never leaves the daemon except in `export --with-secrets`.
    """

    async_: bool = False
    retries: int = 3
    retry_backoff_s: float = 10.0
    store_requests: bool = True
    scheme: str | None = None
    secret: str | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        """What `wfd ctl show` gives: everything but the secret."""
        return {"async": self.async_, "retries": self.retries,
                "retry_backoff_s": self.retry_backoff_s,
                "store_requests": self.store_requests, "verify": self.scheme or "off"}


POLICY_KEYS = {"async": "async_", "retries": "retries", "retry_backoff_s": "retry_backoff_s",
               "store_requests": "store_requests"}


def _policy(row: Any) -> DeliveryPolicy:
    if row is None:
        return DeliveryPolicy()
    stored = orjson.loads(row[0])
    return DeliveryPolicy(**{POLICY_KEYS[k]: v for k, v in stored.items() if k in POLICY_KEYS},
                          scheme=row[1], secret=row[2])


@dataclass(frozen=True)
class Delivery:
    """An async delivery as the worker takes it from the queue."""

    id: str
    workflow: str
    attempt: int
    request: dict[str, Any]


# One entry per column, in the order _workflow reads them.
_WORKFLOW_FIELDS = (
    "w.name", "w.kind", "w.enabled", "w.version", "w.catch_key", "w.settings", "w.limits",
    "w.schedule", "w.created_at", "w.updated_at", "v.code", "w.next_due", "w.skipped",
    "w.allow_net",
    "(SELECT json_group_object(e.key, e.value) FROM workflow_env e WHERE e.workflow = w.name)",
    "v.requirements", "v.environment",
)
_WORKFLOW_COLUMNS = ", ".join(_WORKFLOW_FIELDS)
_WORKFLOW_WIDTH = len(_WORKFLOW_FIELDS)
_WORKFLOW_SELECT = (
    f"SELECT {_WORKFLOW_COLUMNS} FROM workflows w "
    "JOIN versions v ON v.workflow = w.name AND v.version = w.version"
)
_EXECUTION_COLUMNS = (
    "id, workflow, version, trigger, status, started_at, duration_ms, http_status, "
    "error, traceback, output, output_truncated"
)
_LINEAGE_COLUMNS = "attempt, first_attempt_id, replay_of, request_id"
# A record with its lineage and the state of its delivery, if it had one.
_EXECUTION_SELECT = (
    "SELECT " + ", ".join(f"e.{c.strip()}" for c in _EXECUTION_COLUMNS.split(","))
    + ", " + ", ".join(f"e.{c.strip()}" for c in _LINEAGE_COLUMNS.split(","))
    + ", d.state FROM executions e LEFT JOIN deliveries d ON d.id = e.first_attempt_id"
)


def _workflow(row: Any) -> Workflow:
    return Workflow(
        name=row[0],
        kind=Kind(row[1]),
        enabled=bool(row[2]),
        version=row[3],
        catch_key=row[4],
        settings=protocol.loads(row[5]),
        limits=orjson.loads(row[6]),
        schedule=orjson.loads(row[7]) if row[7] else None,
        created_at=row[8],
        updated_at=row[9],
        code=row[10],
        next_due=row[11],
        skipped=row[12],
        allow_net=orjson.loads(row[13]),
        env=orjson.loads(row[14]) if row[14] else {},
        requirements=orjson.loads(row[15]) if row[15] else None,
        environment=orjson.loads(row[16]) if row[16] else None,
    )


def _execution(row: Any) -> ExecutionRecord:
    return ExecutionRecord(
        id=row[0], workflow=row[1], version=row[2], trigger=Trigger(row[3]),
        status=Status(row[4]), started_at=row[5], duration_ms=row[6], http_status=row[7],
        error=row[8], traceback=row[9], output=row[10], output_truncated=bool(row[11]),
        attempt=row[12], first_attempt_id=row[13], replay_of=row[14], request_id=row[15],
        delivery=row[16])


class SettingsTooLarge(StoreError):
    """A settings change would make the stored object larger than its limit."""


class SettingsNotStorable(StoreError):
    """The settings cannot be encoded (sandbox/protocol.py): a lone surrogate, say."""


def changed_since(given: dict[str, Any], change: SettingsChange) -> SettingsChange:
    """The part of an execution's settings change that really changes what it was given.

    A key sent with the value the execution was given, or removed although
    it was never given, is no change of the execution's: applying it would
    undo what another execution changed meanwhile. Only the rest is merged.
    """
    return {"set": {key: value for key, value in change["set"].items()
                    if not (key in given and _same(given[key], value))},
            "unset": [key for key in change["unset"] if key in given]}


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values: 1, 1.0 and True are three different values."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def check_kind(name: str, stored: Kind, kind: Kind) -> None:
    """A workflow keeps the kind of its first deploy: raise StoreError for another.

    The store checks it where it writes, in the deploy's transaction, so no
    concurrent deploy can slip in between; the deploy handler asks first
    too, to refuse before the code is checked in a child.
    """
    if kind != stored:
        raise StoreError(f"{name} is a {stored} workflow; its kind cannot change")


def merge_settings(stored: dict[str, Any], change: SettingsChange) -> dict[str, Any]:
    """Apply a workflow's key-level change (`set`, `unset`) to stored settings."""
    merged = dict(stored)
    merged.update(change["set"])
    for key in change["unset"]:
        merged.pop(key, None)
    return merged


def settings_json(settings: dict[str, Any], max_bytes: int) -> bytes:
    """Settings as stored, or SettingsTooLarge: the one check of the settings size.

    Measured here, on what would be written, for every writer (an execution's
    merge, `wfd ctl settings set`): the size a child computes from its own
    view cannot know what other executions stored meanwhile.
    """
    try:
        encoded = protocol.dumps(settings)
    except protocol.CodecError as exc:
        raise SettingsNotStorable(f"settings cannot be stored: {exc}") from None
    if len(encoded) > max_bytes:
        raise SettingsTooLarge(f"settings would be {len(encoded)} bytes, over the limit of "
                               f"{max_bytes} bytes (settings_kb = {max_bytes // 1024})")
    return encoded


class Store:
    """The daemon's single SQLite connection, one transaction at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        # Why the last write failed, until one succeeds (/healthz: degraded).
        self.write_error: str | None = None
        self.last_write = time.monotonic()
        # Read-through caches of what every catch request looks up (shared
        # objects: never mutated). A read that a write overtook is not kept:
        # each forgetting bumps the generation.
        self._workflows: dict[str, Workflow] = {}
        self._policies: dict[str, DeliveryPolicy] = {}
        self._generation = 0
        # Executions' transactions waiting for the next group commit, and the
        # task committing them (kept here so that it is not collected).
        self._group: list[_Grouped] = []
        self._committers: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        """Open (creating if needed) the database and apply pending migrations."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        # auto_vacuum must come first: it takes effect only in a database that
        # has no tables yet (retention and VACUUM policy: systemd/README.md).
        # journal_size_limit truncates the WAL after a checkpoint past 64 MiB.
        for pragma in ("auto_vacuum=INCREMENTAL", "journal_mode=WAL", "synchronous=NORMAL",
                       f"busy_timeout={BUSY_TIMEOUT_MS}", "foreign_keys=ON",
                       f"journal_size_limit={WAL_LIMIT_BYTES}",
                       f"wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}"):
            await self._db.execute(f"PRAGMA {pragma}")
        await self._migrate()

    async def close(self) -> None:
        if self._db is not None:
            async with self._lock:
                await self._db.close()
                self._db = None

    async def _migrate(self) -> None:
        async with self._transaction() as db:
            async with db.execute("PRAGMA user_version") as cursor:
                (current,) = await cursor.fetchone() or (0,)
            for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
                for statement in filter(str.strip, script.split(";")):
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version = {number}")

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; the lock keeps coroutines from interleaving in it.

        A write that fails for the store's own reasons (locked past the busy
        timeout, a full disk) is rolled back, raised, and remembered in
        `write_error` until a later write succeeds.
        """
        async with self._lock:
            db = self._db
            if db is None:
                raise StoreError("the store is closed")
            with self._noting_health():
                await db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    await db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            await db.execute("ROLLBACK")
                    raise

    @contextlib.contextmanager
    def _noting_health(self) -> Iterator[None]:
        """Remember why a write failed for the store's own reasons, or that one succeeded."""
        try:
            yield
        except Exception as exc:
            if _degrades(exc):
                self.write_error = f"{exc} ({type(exc).__name__})"
            raise
        self.write_error = None
        self.last_write = time.monotonic()

    async def _group_commit(self, work: Callable[[sqlite3.Connection], Any],
                            then: Callable[[Any], None]) -> Any:
        """Run `work` in the connection's thread, in one transaction with the others waiting.

        Each aiosqlite call is a hop to its thread and back (~50-100 µs on a
        busy loop); an execution's transaction of five calls paid five, and
        each execution its own commit. Here the executions that finish while
        the store is busy form the next group: one hop and one commit for
        all of them, no wait added (a lone execution is a group of one).
        Each `work` runs under a savepoint of its own: one that fails on its
        own data is rolled back alone; a failure of the store itself (locked,
        full disk) fails the whole group, as it would each of them. `then`
        gets the result in the event loop right after the commit, before any
        other coroutine runs; the caller gets it only after the commit, so a
        response still follows its own commit.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._group.append(_Grouped(work, then, future))
        if len(self._group) == 1:
            committer = asyncio.create_task(self._commit_group())
            self._committers.add(committer)
            committer.add_done_callback(self._committers.discard)
        return await future

    async def _commit_group(self) -> None:
        """Commit every transaction waiting, once the store is free.

        aiosqlite has no public call for running a function in its thread,
        but its own methods all go through `Connection._execute`, which
        queues one callable there; this is the one place wfd uses it. Same
        BEGIN IMMEDIATE, rollback and `write_error` as `_transaction`.
        """
        async with self._lock:
            group, self._group = self._group, []
            try:
                db = self._db
                if db is None:
                    raise StoreError("the store is closed")
                with self._noting_health():
                    results = await db._execute(  # type: ignore[no-untyped-call]
                        _committed, db._conn, functools.partial(
                            _each_in_savepoint, [item.work for item in group]))
            except BaseException as exc:
                for item in group:
                    if not item.future.done():
                        item.future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                return
            for item, (value, error) in zip(group, results, strict=True):
                if error is None:
                    item.then(value)
                if not item.future.done():
                    if error is None:
                        item.future.set_result(value)
                    else:
                        item.future.set_exception(error)

    async def _fetchall(self, sql: str, *args: Any) -> list[Any]:
        async with self._lock:
            if self._db is None:
                raise StoreError("the store is closed")
            async with self._db.execute(sql, args) as cursor:
                return list(await cursor.fetchall())

    async def _fetchone(self, sql: str, *args: Any) -> Any:
        rows = await self._fetchall(sql, *args)
        return rows[0] if rows else None

    # -- workflows -------------------------------------------------------------

    def _forget(self, *names: str) -> None:
        """Drop the cached workflows and policies of `names` (all of them without names).

        Called by every write to a workflow or its policy, inside its locked
        section; reads still in flight then keep what they read to themselves.
        """
        self._generation += 1
        if not names:
            self._workflows.clear()
            self._policies.clear()
        for name in names:
            self._workflows.pop(name, None)
            self._policies.pop(name, None)

    async def workflow(self, name: str) -> Workflow | None:
        """The workflow and its current code, from memory once read (unknown names are not kept)."""
        cached = self._workflows.get(name)
        if cached is not None:
            return cached
        generation = self._generation
        row = await self._fetchone(f"{_WORKFLOW_SELECT} WHERE w.name = ?", name)
        if row is None:
            return None
        workflow = _workflow(row)
        if generation == self._generation:
            self._workflows[name] = workflow
        return workflow

    async def workflows(self, names: list[str] | None = None) -> list[Workflow]:
        """All workflows, or those named (in one query, for a batch of timer ticks)."""
        if names is None:
            rows = await self._fetchall(f"{_WORKFLOW_SELECT} ORDER BY w.name")
        else:
            marks = ", ".join("?" * len(names))
            rows = await self._fetchall(f"{_WORKFLOW_SELECT} WHERE w.name IN ({marks})", *names)
        return [_workflow(row) for row in rows]

    async def deploy(self, name: str, kind: Kind, code: str, limits: dict[str, Any],
                     schedule: dict[str, Any] | None, catch_key: str,
                     allow_net: list[str] | None = None,
                     requirements: dict[str, Any] | None = None,
                     environment: dict[str, Any] | None = None) -> Workflow:
        """Store `code` as the next version of `name`, creating the workflow if new.

        `limits` (the workflow's overrides) and `schedule` are stored as given;
        the network allowances too, or kept as they were when `allow_net` is None.
        `catch_key` is used for a new workflow only.
        """
        now = utc_iso()
        async with self._transaction() as db:
            self._forget(name)
            async with db.execute("SELECT kind FROM workflows WHERE name = ?",
                                  (name,)) as cursor:
                row = await cursor.fetchone()
            if row is None:
                version = 1
                await db.execute(
                    "INSERT INTO workflows (name, kind, version, catch_key, limits, schedule,"
                    " created_at, updated_at, allow_net) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?)",
                    (name, kind, catch_key, orjson.dumps(limits).decode(),
                     _json_or_null(schedule), now, now, orjson.dumps(allow_net or []).decode()))
            else:
                check_kind(name, row[0], kind)
                async with db.execute("SELECT max(version) FROM versions WHERE workflow = ?",
                                      (name,)) as cursor:
                    (latest,) = await cursor.fetchone() or (0,)
                    version = latest + 1
                await db.execute(
                    "UPDATE workflows SET version = ?, limits = ?, schedule = ?, updated_at = ?,"
                    " allow_net = coalesce(?, allow_net) WHERE name = ?",
                    (version, orjson.dumps(limits).decode(), _json_or_null(schedule), now,
                     None if allow_net is None else orjson.dumps(allow_net).decode(), name))
            await db.execute(
                "INSERT INTO versions (workflow, version, code, created_at, requirements,"
                " environment) VALUES (?, ?, ?, ?, ?, ?)",
                (name, version, code, now, _json_or_null(requirements),
                 _json_or_null(environment)))
        return await self._require(name)

    async def _require(self, name: str) -> Workflow:
        workflow = await self.workflow(name)
        if workflow is None:
            raise StoreError(f"no workflow named {name}")
        return workflow

    async def _update(self, name: str, assignments: str, *args: Any) -> Workflow:
        async with self._transaction() as db:
            self._forget(name)
            cursor = await db.execute(
                f"UPDATE workflows SET {assignments}, updated_at = ? WHERE name = ?",
                (*args, utc_iso(), name))
            if cursor.rowcount == 0:
                raise StoreError(f"no workflow named {name}")
        return await self._require(name)

    async def set_enabled(self, name: str, enabled: bool) -> Workflow:
        return await self._update(name, "enabled = ?", int(enabled))

    async def set_catch_key(self, name: str, catch_key: str) -> Workflow:
        return await self._update(name, "catch_key = ?", catch_key)

    async def rollback(self, name: str, version: int) -> Workflow:
        """Make an earlier (or later) stored version current again."""
        if await self._fetchone("SELECT 1 FROM versions WHERE workflow = ? AND version = ?",
                                name, version) is None:
            raise StoreError(f"{name} has no version {version}")
        return await self._update(name, "version = ?", version)

    async def delete(self, name: str) -> None:
        """Forget a workflow, its versions and its execution records."""
        async with self._transaction() as db:
            self._forget(name)
            cursor = await db.execute("DELETE FROM workflows WHERE name = ?", (name,))
            if cursor.rowcount == 0:
                raise StoreError(f"no workflow named {name}")
            await db.execute("DELETE FROM versions WHERE workflow = ?", (name,))
            await db.execute("DELETE FROM executions WHERE workflow = ?", (name,))
            await db.execute("DELETE FROM workflow_env WHERE workflow = ?", (name,))
            for table in ("deliveries", "requests", "idempotency"):
                await db.execute(f"DELETE FROM {table} WHERE workflow = ?", (name,))

    async def versions(self, name: str) -> list[dict[str, Any]]:
        current = (await self._require(name)).version
        rows = await self._fetchall(
            "SELECT version, created_at, length(code) FROM versions WHERE workflow = ?"
            " ORDER BY version", name)
        return [{"version": v, "created_at": c, "size": n, "current": v == current}
                for v, c, n in rows]

    # -- settings and executions -----------------------------------------------

    async def change_settings(self, name: str, change: SettingsChange,
                              max_bytes: int) -> dict[str, Any]:
        """Apply an operator's `set`/`unset` change; returns the new settings.

        Raises SettingsTooLarge, writing nothing, when the result would be
        over `max_bytes`.
        """
        async with self._transaction() as db:
            self._forget(name)
            merged = merge_settings(await _settings(db, name), change)
            await db.execute("UPDATE workflows SET settings = ? WHERE name = ?",
                             (settings_json(merged, max_bytes).decode(), name))
        return merged

    async def change_env(self, name: str, values: dict[str, str], unset: list[str]
                         ) -> list[str]:
        """Set and remove a workflow's environment variables; returns the names now set."""
        async with self._transaction() as db:
            self._forget(name)
            await _settings(db, name)  # raises if there is no such workflow
            await db.executemany(
                "INSERT INTO workflow_env (workflow, key, value) VALUES (?, ?, ?)"
                " ON CONFLICT (workflow, key) DO UPDATE SET value = excluded.value",
                [(name, key, value) for key, value in values.items()])
            await db.executemany("DELETE FROM workflow_env WHERE workflow = ? AND key = ?",
                                 [(name, key) for key in unset])
            async with db.execute("SELECT key FROM workflow_env WHERE workflow = ?"
                                  " ORDER BY key", (name,)) as cursor:
                return [row[0] for row in await cursor.fetchall()]

    async def finish(self, workflow: str, change: SettingsChange | None,
                     given: dict[str, Any], max_settings_bytes: int,
                     record_for: Callable[[str | None], ExecutionRecord],
                     request: RequestFields | None = None) -> ExecutionRecord:
        """Merge an execution's settings change and store its record, in one transaction.

        Only what the execution changed relative to the settings it was
        `given` is merged, against the settings as stored now, so concurrent
        executions keep each other's changes. A merge that would exceed the
        size limit is refused, whatever the child said: nothing of it is
        written, and `record_for` is given the reason (None when nothing was
        refused); it runs in the store's thread. The record it returns is
        stored as is, and with it `request`, when given, under the record's
        `request_id` (kept for replay: never without the record).
        """
        def work(db: sqlite3.Connection) -> tuple[ExecutionRecord, bool]:
            row = db.execute("SELECT settings FROM workflows WHERE name = ?",
                             (workflow,)).fetchone()
            if row is None:
                return record_for(None), False  # deleted while it ran: nothing to keep
            refused, merged = None, None
            changed = changed_since(given, change or {"set": {}, "unset": []})
            if changed["set"] or changed["unset"]:
                try:
                    merged = settings_json(merge_settings(protocol.loads(row[0]), changed),
                                           max_settings_bytes)
                except (SettingsTooLarge, SettingsNotStorable) as exc:
                    refused = f"{exc}; nothing was kept"
                else:
                    db.execute("UPDATE workflows SET settings = ? WHERE name = ?",
                               (merged.decode(), workflow))
            record = record_for(refused)
            db.execute(_INSERT_EXECUTION, _execution_row(record))
            if request is not None and record.request_id is not None:
                db.execute(_INSERT_REQUEST, (record.request_id, workflow, _pack(request),
                                             utc_iso()))
            return record, merged is not None

        def forget_if_changed(result: tuple[ExecutionRecord, bool]) -> None:
            if result[1]:
                self._forget(workflow)

        record, _ = await self._group_commit(work, forget_if_changed)
        assert isinstance(record, ExecutionRecord)
        return record

    async def record(self, record: ExecutionRecord) -> None:
        """Store a record that changes nothing else (a skipped tick), if its workflow exists."""
        async with self._transaction() as db, db.execute(
                "SELECT 1 FROM workflows WHERE name = ?", (record.workflow,)) as cursor:
            if await cursor.fetchone():
                await _insert_execution(db, record)

    async def environments_in_use(self) -> dict[str, list[str]]:
        """Each environment hash used by a current version, with the workflows using it."""
        rows = await self._fetchall(
            "SELECT w.name, v.environment FROM workflows w JOIN versions v"
            " ON v.workflow = w.name AND v.version = w.version"
            " WHERE v.environment IS NOT NULL ORDER BY w.name")
        used: dict[str, list[str]] = {}
        for name, environment in rows:
            used.setdefault(orjson.loads(environment)["hash"], []).append(name)
        return used

    async def set_next_due(self, name: str, next_due: str | None) -> None:
        """Persist when a pull workflow is next due (None: not armed)."""
        await self.set_next_dues({name: next_due})

    async def set_next_dues(self, dues: dict[str, str | None]) -> None:
        """Persist the next due times of many pull workflows in one transaction."""
        async with self._transaction() as db:
            self._forget(*dues)
            await db.executemany("UPDATE workflows SET next_due = ? WHERE name = ?",
                                 [(due, name) for name, due in dues.items()])

    async def add_skipped(self, name: str, count: int) -> None:
        async with self._transaction() as db:
            self._forget(name)
            await db.execute("UPDATE workflows SET skipped = skipped + ? WHERE name = ?",
                             (count, name))

    async def executions(self, name: str, limit: int = 20) -> list[ExecutionRecord]:
        rows = await self._fetchall(
            f"{_EXECUTION_SELECT} WHERE e.workflow = ? ORDER BY e.id DESC LIMIT ?", name, limit)
        return [_execution(row) for row in rows]

    async def execution(self, execution_id: str) -> ExecutionRecord | None:
        row = await self._fetchone(f"{_EXECUTION_SELECT} WHERE e.id = ?", execution_id)
        return _execution(row) if row else None

    async def counts(self) -> dict[str, int]:
        """Totals for `wfd ctl status`, the database's size included."""
        workflows, enabled = await self._fetchone(
            "SELECT count(*), coalesce(sum(enabled), 0) FROM workflows")
        (executions,) = await self._fetchone("SELECT count(*) FROM executions")
        return {"workflows": workflows, "enabled": enabled, "executions": executions,
                **await self.size()}

    async def size(self) -> dict[str, int]:
        """Bytes the database file holds, and how many of them are free pages."""
        (page_size,) = await self._fetchone("PRAGMA page_size")
        (pages,) = await self._fetchone("PRAGMA page_count")
        (free,) = await self._fetchone("PRAGMA freelist_count")
        return {"db_bytes": pages * page_size, "db_free_bytes": free * page_size}

    # -- delivery: policies, stored requests, the async queue, idempotency ------

    async def delivery_policy(self, name: str) -> DeliveryPolicy:
        """The workflow's delivery policy (the defaults if none was set), from memory once read."""
        cached = self._policies.get(name)
        if cached is not None:
            return cached
        generation = self._generation
        policy = _policy(await self._fetchone(
            "SELECT policy, scheme, secret FROM delivery_policies WHERE workflow = ?", name))
        if generation == self._generation and name in self._workflows:
            self._policies[name] = policy  # only of known workflows: names are not unbounded
        return policy

    async def set_delivery_policy(self, name: str, changes: dict[str, Any]) -> DeliveryPolicy:
        """Merge `changes` (keys of POLICY_KEYS) into the stored policy; others keep theirs."""
        async with self._transaction() as db:
            self._forget(name)
            stored = await _policy_row(db, name)
            merged = {**orjson.loads(stored[0]), **changes}
            await db.execute("UPDATE delivery_policies SET policy = ? WHERE workflow = ?",
                             (orjson.dumps(merged).decode(), name))
        return await self.delivery_policy(name)

    async def set_verification(self, name: str, scheme: str | None,
                               secret: str | None) -> DeliveryPolicy:
        """Set (or with None, remove) the signature scheme and secret of a workflow."""
        async with self._transaction() as db:
            self._forget(name)
            await _policy_row(db, name)
            await db.execute(
                "UPDATE delivery_policies SET scheme = ?, secret = ? WHERE workflow = ?",
                (scheme, secret, name))
        return await self.delivery_policy(name)

    async def stored_request(self, request_id: str) -> dict[str, Any] | None:
        row = await self._fetchone("SELECT body FROM requests WHERE id = ?", request_id)
        return _unpack(row[0]) if row else None

    async def accept_delivery(self, delivery_id: str, workflow: str, request: RequestFields,
                              idempotency_key: str | None = None,
                              response: tuple[int, dict[str, str], bytes] | None = None
                              ) -> str:
        """Queue an async delivery durably: request, queue entry and idempotency key, one commit.

        Returns when the commit is done, so that a 202 sent afterwards is a
        promise that survives a crash. The first attempt's id is the delivery's.
        """
        now = utc_iso()
        async with self._transaction() as db:
            await db.execute("INSERT INTO requests (id, workflow, body, created_at)"
                             " VALUES (?, ?, ?, ?)",
                             (delivery_id, workflow, _pack(request), now))
            await db.execute(
                "INSERT INTO deliveries (id, workflow, state, attempt, attempt_id, due_at,"
                " accepted_at) VALUES (?, ?, 'queued', 1, ?, ?, ?)",
                (delivery_id, workflow, delivery_id, now, now))
            if idempotency_key is not None and response is not None:
                await _put_idempotency(db, workflow, idempotency_key, delivery_id, now, response)
        return now

    async def queued_deliveries(self, name: str | None = None) -> list[tuple[str, str, str]]:
        """(id, workflow, due_at) of every delivery waiting to run (of `name`, if given)."""
        if name is None:
            rows = await self._fetchall(
                "SELECT id, workflow, due_at FROM deliveries WHERE state = 'queued'")
        else:
            rows = await self._fetchall("SELECT id, workflow, due_at FROM deliveries"
                                        " WHERE state = 'queued' AND workflow = ?", name)
        return [tuple(row) for row in rows]

    async def running_deliveries(self) -> list[tuple[str, str, int, str, str | None]]:
        """(id, workflow, attempt, attempt_id, that attempt's recorded status) of each
        delivery that was running when the daemon last stopped."""
        return [tuple(row) for row in await self._fetchall(
            "SELECT d.id, d.workflow, d.attempt, d.attempt_id, e.status FROM deliveries d"
            " LEFT JOIN executions e ON e.id = d.attempt_id WHERE d.state = 'running'")]

    async def queued_delivery(self, delivery_id: str
                              ) -> tuple[Workflow, DeliveryPolicy, Delivery] | None:
        """A queued delivery with its request, workflow and policy, in one query
        (None: not queued any more, or deleted): the worker reads this per attempt."""
        row = await self._fetchone(
            f"SELECT {_WORKFLOW_COLUMNS}, p.policy, p.scheme, p.secret, d.attempt, r.body"
            " FROM deliveries d JOIN requests r ON r.id = d.id"
            " JOIN workflows w ON w.name = d.workflow"
            " JOIN versions v ON v.workflow = w.name AND v.version = w.version"
            " LEFT JOIN delivery_policies p ON p.workflow = w.name"
            " WHERE d.id = ? AND d.state = 'queued'", delivery_id)
        if row is None:
            return None
        workflow = _workflow(row[:_WORKFLOW_WIDTH])
        policy = _policy(row[_WORKFLOW_WIDTH:_WORKFLOW_WIDTH + 3]
                         if row[_WORKFLOW_WIDTH] is not None else None)
        return workflow, policy, Delivery(delivery_id, workflow.name, row[-2],
                                          _unpack(row[-1]))

    async def start_delivery(self, delivery_id: str, attempt_id: str) -> None:
        """Mark a delivery running as `attempt_id`, once that attempt has its slot.

        A delivery found running at start-up was cut off by a crash: its
        attempt is recorded `interrupted` and it is retried (`running_deliveries`).
        """
        async with self._transaction() as db:
            await db.execute("UPDATE deliveries SET state = 'running', attempt_id = ?"
                             " WHERE id = ? AND state = 'queued'", (attempt_id, delivery_id))

    async def settle_delivery(self, delivery_id: str, status: str, retry_at: str | None,
                              keep_request: bool) -> str | None:
        """After an attempt: `done` on success, queued again at `retry_at`, or `dead`.

        Without `keep_request` (`--no-store-requests`) the request goes as
        soon as the delivery cannot run again. Returns the new state (None:
        the delivery is gone, its workflow deleted).
        """
        if status == "success":
            state = "done"
        elif retry_at is not None:
            state = "queued"
        else:
            state = "dead"
        async with self._transaction() as db:
            if state == "queued":
                cursor = await db.execute(
                    "UPDATE deliveries SET state = 'queued', attempt = attempt + 1,"
                    " due_at = ?, last_status = ? WHERE id = ?", (retry_at, status, delivery_id))
            else:
                cursor = await db.execute(
                    "UPDATE deliveries SET state = ?, last_status = ? WHERE id = ?",
                    (state, status, delivery_id))
                if not keep_request:
                    await db.execute("DELETE FROM requests WHERE id = ?", (delivery_id,))
        return state if cursor.rowcount else None

    async def dead_deliveries(self, name: str) -> list[dict[str, Any]]:
        rows = await self._fetchall(
            "SELECT id, attempt, attempt_id, accepted_at, last_status FROM deliveries"
            " WHERE workflow = ? AND state = 'dead' ORDER BY id", name)
        return [{"id": r[0], "workflow": name, "attempts": r[1], "last_attempt_id": r[2],
                 "accepted_at": r[3], "last_status": r[4]} for r in rows]

    async def revive_delivery(self, delivery_id: str) -> None:
        """A dead delivery replayed with success is done."""
        async with self._transaction() as db:
            await db.execute("UPDATE deliveries SET state = 'done' WHERE id = ? AND state = 'dead'",
                             (delivery_id,))

    async def idempotent(self, workflow: str, key: str, since: str
                         ) -> tuple[int, dict[str, str], bytes] | None:
        """The response kept for `key`'s first request, if it came after `since`."""
        row = await self._fetchone(
            "SELECT status, headers, body FROM idempotency"
            " WHERE workflow = ? AND key = ? AND created_at >= ?", workflow, key, since)
        return (row[0], orjson.loads(row[1]), bytes(row[2])) if row else None

    async def answer_idempotency(self, workflow: str, key: str, execution_id: str,
                                 response: tuple[int, dict[str, str], bytes]) -> None:
        """Keep the first response to `key` for its repeats."""
        async with self._transaction() as db:
            await _put_idempotency(db, workflow, key, execution_id, utc_iso(), response)

    async def prune_delivery(self, idempotent_before: str) -> int:
        """Forget what no kept record needs any more; how many rows went.

        Idempotency keys older than their window; finished deliveries none of
        whose attempts is still recorded; stored requests that neither a
        record nor a delivery refers to (a request is stored after its record).
        """
        async with self._transaction() as db:
            deleted = 0
            for sql, args in (
                    ("DELETE FROM idempotency WHERE created_at < ?", (idempotent_before,)),
                    ("DELETE FROM deliveries WHERE state IN ('done', 'dead') AND id NOT IN"
                     " (SELECT first_attempt_id FROM executions"
                     "  WHERE first_attempt_id IS NOT NULL)", ()),
                    ("DELETE FROM requests WHERE id NOT IN (SELECT id FROM deliveries)"
                     " AND id NOT IN (SELECT request_id FROM executions"
                     "  WHERE request_id IS NOT NULL)", ())):
                cursor = await db.execute(sql, args)
                deleted += cursor.rowcount
        return deleted

    # -- retention ---------------------------------------------------------------

    async def prune_executions(self, keep_per_workflow: int, older_than: str,
                               limit: int) -> int:
        """Delete at most `limit` records past retention, in one short transaction.

        First records that started before `older_than` (ISO 8601 UTC), oldest
        first, then for each workflow those beyond its `keep_per_workflow`
        newest. Returns how many went; the caller repeats until it gets 0, so
        no single transaction holds the store for long.
        """
        async with self._transaction() as db:
            cursor = await db.execute(
                "DELETE FROM executions WHERE id IN (SELECT id FROM executions"
                " WHERE started_at < ? ORDER BY started_at LIMIT ?)", (older_than, limit))
            deleted = cursor.rowcount
            async with db.execute("SELECT name FROM workflows ORDER BY name") as names:
                workflows = [row[0] for row in await names.fetchall()]
            for name in workflows:
                if deleted >= limit:
                    break
                deleted += await _prune_workflow(db, name, keep_per_workflow, limit - deleted)
        return deleted

    async def reclaim_space(self, max_bytes: int) -> int:
        """Give up to `max_bytes` of free pages back to the file system; how many went.

        Only databases created with auto_vacuum=INCREMENTAL can; in older
        ones this does nothing and free pages are reused by new records.
        """
        (page_size,) = await self._fetchone("PRAGMA page_size")
        (before,) = await self._fetchone("PRAGMA freelist_count")
        pragma = f"PRAGMA incremental_vacuum({max(1, int(max_bytes) // page_size)})"
        async with self._transaction() as db, db.execute(pragma) as cursor:
            await cursor.fetchall()  # each step frees one page: run it to the end
        (after,) = await self._fetchone("PRAGMA freelist_count")
        return int((before - after) * page_size)

    async def prune_versions(self, keep: int) -> int:
        """Delete each workflow's versions beyond its `keep` newest; how many went.

        The current version and the one before it (what a rollback would
        most likely want) are never deleted, whatever `keep` says.
        """
        async with self._transaction() as db:
            cursor = await db.execute(
                "DELETE FROM versions WHERE rowid IN (SELECT v.rowid FROM versions v"
                " JOIN workflows w ON w.name = v.workflow"
                " WHERE v.version <> w.version"
                " AND v.version <> (SELECT max(p.version) FROM versions p"
                "                   WHERE p.workflow = v.workflow AND p.version < w.version)"
                " AND v.version <= (SELECT max(n.version) FROM versions n"
                "                   WHERE n.workflow = v.workflow) - ?)", (keep,))
            return cursor.rowcount

    # -- the store's own health ----------------------------------------------------

    async def probe(self) -> None:
        """A one-row write: succeeds once the store can write again (raises otherwise)."""
        async with self._transaction() as db:
            await db.execute("UPDATE store_probe SET at = ? WHERE id = 1", (utc_iso(),))

    async def checkpoint(self) -> tuple[int, int]:
        """Copy the whole WAL into the database and truncate it to zero bytes.

        Returns (frames in the WAL, frames checkpointed). Cheap when the
        WAL is empty. It never waits for another process (a backup reading
        the file): without the busy timeout it is then partial, and done
        the next time, rather than holding the store for seconds.
        """
        async with self._lock:
            db = self._db
            if db is None:
                raise StoreError("the store is closed")
            await db.execute("PRAGMA busy_timeout = 0")
            try:
                async with db.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cursor:
                    row = await cursor.fetchone()
                    _, frames, done = row if row is not None else (0, 0, 0)
            finally:
                await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return frames, done

    # -- export and import ------------------------------------------------------

    async def export(self, with_secrets: bool = False) -> list[dict[str, Any]]:
        """Every workflow with all its versions and settings, for a backup.

        Secrets only `with_secrets`: environment variables are exported by
        name alone, and without its signing secret an import keeps the scheme
        and refuses every request until a secret is set again.
        """
        out = []
        for workflow in await self.workflows():
            rows = await self._fetchall(
                "SELECT version, code, created_at, requirements, environment FROM versions"
                " WHERE workflow = ? ORDER BY version", workflow.name)
            policy = await self.delivery_policy(workflow.name)
            delivery = policy.public()
            if with_secrets and policy.secret:
                delivery["secret"] = policy.secret
            out.append({
                **workflow.public(),
                "catch_key": workflow.catch_key,
                "settings": workflow.settings,
                "versions": [{"version": v, "code": c, "created_at": t,
                              "requirements": orjson.loads(r) if r else None,
                              "environment": orjson.loads(e) if e else None}
                             for v, c, t, r, e in rows],
                "env": dict(workflow.env) if with_secrets else None,
                "env_names": sorted(workflow.env),
                "delivery": delivery,
            })
        return out

    async def import_(self, workflows: list[dict[str, Any]]) -> list[str]:
        """Restore exported workflows in one transaction; existing names are refused."""
        async with self._transaction() as db:
            self._forget()
            for item in workflows:
                name = item["name"]
                async with db.execute("SELECT 1 FROM workflows WHERE name = ?",
                                      (name,)) as cursor:
                    if await cursor.fetchone():
                        raise StoreError(f"a workflow named {name} exists already")
                await db.execute(
                    "INSERT INTO workflows (name, kind, enabled, version, catch_key, settings,"
                    " limits, schedule, created_at, updated_at, allow_net)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, item["kind"], int(item["enabled"]), item["version"],
                     item["catch_key"], protocol.dumps(item["settings"]).decode(),
                     orjson.dumps(item["limits"]).decode(), _json_or_null(item["schedule"]),
                     item["created_at"], item["updated_at"],
                     orjson.dumps(item.get("allow_net", [])).decode()))
                await db.executemany(
                    "INSERT INTO versions (workflow, version, code, created_at, requirements,"
                    " environment) VALUES (?, ?, ?, ?, ?, ?)",
                    [(name, v["version"], v["code"], v["created_at"],
                      _json_or_null(v.get("requirements")), _json_or_null(v.get("environment")))
                     for v in item["versions"]])
                await db.executemany(
                    "INSERT INTO workflow_env (workflow, key, value) VALUES (?, ?, ?)",
                    [(name, key, value) for key, value in (item.get("env") or {}).items()])
                if item.get("delivery"):
                    await _import_policy(db, name, item["delivery"])
        return [item["name"] for item in workflows]


async def _prune_workflow(db: aiosqlite.Connection, name: str, keep: int, limit: int) -> int:
    """Delete up to `limit` of `name`'s records older than its `keep` newest."""
    async with db.execute("SELECT id FROM executions WHERE workflow = ?"
                          " ORDER BY id DESC LIMIT 1 OFFSET ?", (name, keep)) as cursor:
        row = await cursor.fetchone()
    if row is None:
        return 0
    cursor = await db.execute(
        "DELETE FROM executions WHERE id IN (SELECT id FROM executions"
        " WHERE workflow = ? AND id <= ? ORDER BY id LIMIT ?)", (name, row[0], limit))
    return cursor.rowcount


async def _settings(db: aiosqlite.Connection, name: str) -> dict[str, Any]:
    async with db.execute("SELECT settings FROM workflows WHERE name = ?", (name,)) as cursor:
        row = await cursor.fetchone()
    if row is None:
        raise StoreError(f"no workflow named {name}")
    settings: dict[str, Any] = protocol.loads(row[0])
    return settings


_INSERT_EXECUTION = (f"INSERT INTO executions ({_EXECUTION_COLUMNS}, {_LINEAGE_COLUMNS})"
                     " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_INSERT_REQUEST = ("INSERT OR IGNORE INTO requests (id, workflow, body, created_at)"
                   " VALUES (?, ?, ?, ?)")


def _execution_row(record: ExecutionRecord) -> tuple[Any, ...]:
    return (record.id, record.workflow, record.version, record.trigger, record.status,
            record.started_at, record.duration_ms, record.http_status, record.error,
            record.traceback, record.output, int(record.output_truncated),
            record.attempt, record.first_attempt_id, record.replay_of, record.request_id)


async def _insert_execution(db: aiosqlite.Connection, record: ExecutionRecord) -> None:
    await db.execute(_INSERT_EXECUTION, _execution_row(record))


@dataclass(frozen=True)
class _Grouped:
    """One execution's transaction waiting for a group commit."""

    work: Callable[[sqlite3.Connection], Any]
    then: Callable[[Any], None]
    future: "asyncio.Future[Any]"


def _each_in_savepoint(works: list[Callable[[sqlite3.Connection], Any]],
                       db: sqlite3.Connection) -> list[tuple[Any, Exception | None]]:
    """Run each `work` under its own savepoint: (result, None), or (None, what it raised).

    A failure of the store itself is raised: the whole group fails with it.
    """
    results: list[tuple[Any, Exception | None]] = []
    for work in works:
        db.execute("SAVEPOINT execution")
        try:
            results.append((work(db), None))
        except Exception as exc:
            if _degrades(exc):
                raise
            db.execute("ROLLBACK TO execution")
            results.append((None, exc))
        db.execute("RELEASE execution")
    return results


def _committed(db: sqlite3.Connection, work: Callable[[sqlite3.Connection], _T]) -> _T:
    """`work` in one write transaction on the plain connection (in the store's thread)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work(db)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise
    return result


async def _import_policy(db: aiosqlite.Connection, name: str, exported: dict[str, Any]) -> None:
    policy = {k: exported[k] for k in POLICY_KEYS if k in exported}
    scheme = exported.get("verify")
    await db.execute(
        "INSERT INTO delivery_policies (workflow, policy, scheme, secret) VALUES (?, ?, ?, ?)",
        (name, orjson.dumps(policy).decode(), None if scheme in (None, "off") else scheme,
         exported.get("secret")))


def _pack(request: RequestFields) -> bytes:
    """A stored request: JSON, deflated (webhook JSON shrinks 3-5 times, for ~20 µs)."""
    return zlib.compress(protocol.dumps(request), 1)


def _unpack(blob: bytes) -> dict[str, Any]:
    request: dict[str, Any] = protocol.loads(zlib.decompress(blob))
    return request


async def _policy_row(db: aiosqlite.Connection, name: str) -> Any:
    """The workflow's policy row, created with the defaults if it has none."""
    async with db.execute("SELECT 1 FROM workflows WHERE name = ?", (name,)) as cursor:
        if await cursor.fetchone() is None:
            raise StoreError(f"no workflow named {name}")
    await db.execute("INSERT OR IGNORE INTO delivery_policies (workflow) VALUES (?)", (name,))
    async with db.execute("SELECT policy, scheme, secret FROM delivery_policies"
                          " WHERE workflow = ?", (name,)) as cursor:
        return await cursor.fetchone()


async def _put_idempotency(db: aiosqlite.Connection, workflow: str, key: str,
                           execution_id: str, created_at: str,
                           response: tuple[int, dict[str, str], bytes]) -> None:
    status, headers, body = response
    await db.execute(
        "INSERT OR REPLACE INTO idempotency (workflow, key, execution_id, created_at, status,"
        " headers, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (workflow, key, execution_id, created_at, status, orjson.dumps(headers).decode(), body))


def _json_or_null(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()
