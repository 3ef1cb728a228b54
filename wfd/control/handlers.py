"""The handlers behind each `wfd ctl` command: plain data in, plain data out."""

import asyncio
import contextlib
import logging
import sys
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sandbox import protocol
from wfd import catch, envvars, ids, logs, signatures
from wfd.admission import Overloaded
from wfd.config import Config, ConfigError, Limits, check_allowances, redeployed_overrides
from wfd.control.follow import Follower
from wfd.control.protocol import EXPORT_FORMAT, CommandError, check_name
from wfd.delivery import MAX_BACKOFF_S, Deliveries
from wfd.dispatch import Dispatcher, Executed
from wfd.domain import Kind, SettingsChange, Trigger
from wfd.environments import BuildError, Environments, prune_environments
from wfd.executor import JobError
from wfd.files import WorkflowFiles
from wfd.requirements import Requirements, RequirementsError, declared, top_level_imports
from wfd.schedule import Schedule, ScheduleError, next_due
from wfd.scheduler import Busy, Scheduler
from wfd.store import POLICY_KEYS, ExecutionRecord, Store, Workflow, check_kind, merge_settings

LIMIT_FLAGS = ("timeout_s", "memory_mb", "cpu_s", "processes", "open_files", "concurrency")


class Commands:
    """The handlers behind each `wfd ctl` command."""

    def __init__(self, config: Config, store: Store, dispatcher: Dispatcher,
                 scheduler: Scheduler, status: Callable[[], dict[str, Any]],
                 deliveries: Deliveries) -> None:
        self.config = config
        self.store = store
        self.dispatcher = dispatcher
        self.scheduler = scheduler
        self.deliveries = deliveries
        self._status = status
        self._followers: dict[str, set[Follower]] = {}

    def table(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        return {
            "status": self.status, "list": self.list_workflows, "deploy": self.deploy,
            "show": self.show, "url": self.url, "enable": self.enable,
            "disable": self.disable, "delete": self.delete, "settings": self.settings,
            "settings-set": self.settings_set, "settings-unset": self.settings_unset,
            "env": self.env, "env-set": self.env_set, "env-unset": self.env_unset,
            "envs": self.envs, "envs-prune": self.envs_prune,
            "run": self.run, "executions": self.executions, "logs": self.logs,
            "follow": self.follow,
            "versions": self.versions, "rollback": self.rollback,
            "rotate-key": self.rotate_key, "export": self.export, "import": self.import_,
            "verify": self.verify, "replay": self.replay, "replay-dead": self.replay_dead,
            "dead": self.dead,
        }

    async def _workflow(self, name: Any) -> Workflow:
        workflow = await self.store.workflow(check_name(name))
        if workflow is None:
            raise CommandError(f"no workflow named {name}")
        return workflow

    def _url(self, workflow: Workflow) -> str:
        minor = sys.version_info.minor
        return (f"{self.config.base_url}/teams/{self.config.team}/{workflow.name}"
                f"/python3.{minor}/{workflow.catch_key}")

    @staticmethod
    def _listing(workflow: Workflow) -> dict[str, Any]:
        """A workflow as `list` and `show` print it: the schedule in words."""
        listed = workflow.public()
        if workflow.schedule:
            listed["schedule"] = Schedule.from_json(workflow.schedule).describe()
        return listed

    async def status(self) -> dict[str, Any]:
        return {**self._status(), **await self.store.counts()}

    async def list_workflows(self) -> list[dict[str, Any]]:
        return [self._listing(w) for w in await self.store.workflows()]

    async def deploy(self, name: str, kind: str, code: str, limits: dict[str, Any] | None = None,
                     schedule: dict[str, Any] | None = None, requirements: str | None = None,
                     delivery: dict[str, Any] | None = None,
                     allow_net: list[str] | None = None
                     ) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        """Check the code in a child, then store it as the workflow's next version.

        Code that declares packages (a PEP 723 block, or `requirements`, the
        text of a requirements file) first gets its environment resolved and
        built: then the answer is a stream of `{"step"}` items, the last one
        `{"deployed"}`, so that `wfd ctl deploy` shows the build as it goes.
        `allow_net` replaces the workflow's network allowances; None keeps them.
        """
        check_name(name)
        kind = _kind(kind)
        self._check_code_size(code)
        delivery = _delivery_changes(kind, delivery or {})
        unknown = sorted({k for k, v in (limits or {}).items() if v is not None}
                         - set(LIMIT_FLAGS))
        if unknown:
            raise CommandError(f"unknown limit(s): {', '.join(unknown)}")
        existing = await self.store.workflow(name)
        if existing:
            check_kind(name, existing.kind, kind)
        overrides = redeployed_overrides(existing.limits if existing else {}, limits or {})
        schedule = self.parse_schedule(kind, schedule)
        try:
            if allow_net is not None:
                allow_net = list(check_allowances(allow_net, self.config.own_ports,
                                                  "--allow-net"))
            effective = self.config.limits.merged(overrides).validate()
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
        if requirements is not None and not isinstance(requirements, str):
            raise CommandError("requirements must be the text of a requirements file")
        try:
            wanted = declared(code, requirements)
        except RequirementsError as exc:
            raise CommandError(f"deploy refused, {_stays(existing)}: {exc}") from None
        deploy = _Deploy(name, kind, code, overrides, schedule, effective, existing,
                         allow_net, delivery)
        if wanted is None:
            return await self._store_version(deploy)
        return self._deploy_in_environment(deploy, wanted)

    async def _deploy_in_environment(self, deploy: "_Deploy", wanted: Requirements
                                     ) -> AsyncIterator[dict[str, Any]]:
        """Resolve and build the environment, reporting each step; then check and store."""
        environments = self.dispatcher.environments
        if environments is None:
            raise CommandError("this daemon cannot build environments")
        steps: asyncio.Queue[str] = asyncio.Queue()
        building = asyncio.create_task(environments.prepare(wanted, steps.put_nowait))
        try:
            while not (building.done() and steps.empty()):
                waiter = asyncio.ensure_future(steps.get())
                await asyncio.wait({waiter, building}, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    yield {"step": waiter.result()}
                else:
                    waiter.cancel()
            environment = building.result()
        except (BuildError, OSError) as exc:
            logs.event("deploy-build-failed", workflow=deploy.name)
            raise CommandError(f"deploy refused, {_stays(deploy.existing)}: the environment "
                               f"could not be built:\n{exc}") from None
        except Exception as exc:  # a stream must end with an answer, never a closed socket
            logs.event("deploy-build-crashed", level=logging.ERROR, exc_info=True,
                       workflow=deploy.name)
            raise CommandError(f"deploy refused, {_stays(deploy.existing)}: internal error "
                               f"while building the environment: {exc}") from None
        finally:
            if not building.done():
                building.cancel()
                with contextlib.suppress(BaseException):
                    await building
        preload = wanted.preload if wanted.preload is not None else tuple(
            top_level_imports(deploy.code))
        yield {"step": f"checking the code in environment {environment['hash']}"
                       + (f", preloading {', '.join(preload)}" if preload else "")}
        yield {"deployed": await self._store_version(deploy, wanted.to_json(), environment,
                                                     preload)}

    async def _store_version(self, deploy: "_Deploy",
                             requirements: dict[str, Any] | None = None,
                             environment: dict[str, Any] | None = None,
                             preload: tuple[str, ...] = ()) -> dict[str, Any]:
        name, existing = deploy.name, deploy.existing
        allow_net = (deploy.allow_net if deploy.allow_net is not None
                     else existing.allow_net if existing else [])
        problem = await self.dispatcher.check(name, deploy.kind, deploy.code, deploy.limits,
                                              allow_net, existing.env if existing else None,
                                              environment, preload)
        if problem:
            if existing is None:  # the check made its directory; nothing of it stays
                await self._files().remove(name)
            raise CommandError(f"deploy refused, {_stays(existing)}: {problem}")
        workflow = await self.store.deploy(name, deploy.kind, deploy.code, deploy.overrides,
                                           deploy.schedule, ids.catch_key(), deploy.allow_net,
                                           requirements, environment)
        if deploy.delivery:
            await self.store.set_delivery_policy(name, deploy.delivery)
        await self.scheduler.refresh(name)
        await self.store.prune_versions(self.config.retention.versions_per_workflow)
        logs.event("deployed", workflow=name, version=workflow.version, kind=deploy.kind,
                   environment=environment and environment["hash"])
        result = {"name": name, "kind": deploy.kind, "version": workflow.version}
        if environment is not None:
            result["environment"] = environment["hash"]
        if deploy.kind == Kind.CATCH:
            result["url"] = self._url(workflow)
        return result

    def _check_code_size(self, code: Any) -> None:
        """Refuse a file over `max_code_kb`: every version is kept in memory and stored."""
        if not isinstance(code, str):
            raise CommandError("code must be the text of a Python file")
        size, limit = len(code.encode("utf-8", "surrogatepass")), self.config.max_code_kb
        if size > limit * 1024:
            raise CommandError(f"deploy refused: the file is {size / 1024:.0f} KiB, over the "
                               f"limit of {limit} KiB (max_code_kb)")

    @staticmethod
    def parse_schedule(kind: Kind, schedule: dict[str, Any] | None) -> dict[str, Any] | None:
        """The stored form of `--every`/`--cron`/`--tz`, refused with a clear message."""
        if kind == Kind.CATCH:
            if schedule and any(schedule.values()):
                raise CommandError("a catch workflow takes no schedule (--every, --cron, --tz)")
            return None
        given = schedule or {}
        try:
            parsed = Schedule.parse(given.get("every"), given.get("cron"), given.get("tz"))
            next_due(parsed, datetime.now(UTC))  # refuses a cron that never matches
        except ScheduleError as exc:
            raise CommandError(f"invalid schedule: {exc}") from None
        return parsed.to_json()

    async def show(self, name: str) -> dict[str, Any]:
        workflow = await self._workflow(name)
        limits = self.dispatcher.limits(workflow)
        recent = await self.store.executions(workflow.name, 1)
        delivery = await self.store.delivery_policy(workflow.name)
        return {**self._listing(workflow),
                "effective_limits": {k: getattr(limits, k) for k in limits.__dataclass_fields__},
                **({"delivery": delivery.public()} if workflow.kind == "catch" else {}),
                "network": self.dispatcher.network(workflow).describe(),
                "settings_keys": sorted(workflow.settings),
                "last_execution": recent[0].summary() if recent else None}

    async def url(self, name: str) -> str:
        workflow = await self._workflow(name)
        if workflow.kind != Kind.CATCH:
            raise CommandError(f"{name} is a pull workflow; only catch workflows have a URL")
        return self._url(workflow)

    async def enable(self, name: str) -> dict[str, Any]:
        return await self._set_enabled(name, True)

    async def disable(self, name: str) -> dict[str, Any]:
        return await self._set_enabled(name, False)

    async def _set_enabled(self, name: str, enabled: bool) -> dict[str, Any]:
        await self.store.set_enabled(check_name(name), enabled)
        await self.scheduler.refresh(name)
        if enabled:
            await self.deliveries.resume(name)
        logs.event("enabled" if enabled else "disabled", workflow=name)
        return self._listing(await self._workflow(name))

    async def delete(self, name: str) -> dict[str, Any]:
        """Forget a workflow. A run in progress finishes, but nothing of it is kept."""
        await self.store.delete(check_name(name))
        await self._files().remove(name)
        await self.scheduler.refresh(name)
        self.dispatcher.admission.forget(name)
        logs.event("deleted", workflow=name)
        return {"deleted": name}

    async def settings(self, name: str) -> dict[str, Any]:
        return (await self._workflow(name)).settings

    async def settings_set(self, name: str, values: dict[str, Any]) -> dict[str, Any]:
        return await self._change_settings(name, {"set": values, "unset": []})

    async def settings_unset(self, name: str, keys: list[str]) -> dict[str, Any]:
        return await self._change_settings(name, {"set": {}, "unset": keys})

    async def _change_settings(self, name: str, change: SettingsChange) -> dict[str, Any]:
        workflow = await self._workflow(name)
        limit = self.dispatcher.limits(workflow).settings_kb * 1024
        depth = self.config.max_json_depth
        try:
            protocol.check_depth(merge_settings(workflow.settings, change), depth)
        except protocol.CodecError as exc:
            raise CommandError(f"settings cannot be stored: {exc} "
                               f"(max_json_depth = {depth})") from None
        return await self.store.change_settings(name, change, limit)

    async def env(self, name: str) -> list[str]:
        """The names of a workflow's environment variables; values never leave the daemon."""
        return sorted((await self._workflow(name)).env)

    async def env_set(self, name: str, values: dict[str, Any]) -> list[str]:
        if not isinstance(values, dict) or not values:
            raise CommandError("env set needs at least one KEY=VALUE")
        try:
            checked = {envvars.check_name(k): envvars.check_value(k, v)
                       for k, v in values.items()}
        except envvars.EnvError as exc:
            raise CommandError(str(exc)) from None
        return await self._change_env(name, checked, [])

    async def env_unset(self, name: str, keys: list[str]) -> list[str]:
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
            raise CommandError("env unset needs at least one KEY")
        return await self._change_env(name, {}, keys)

    async def _change_env(self, name: str, values: dict[str, str], unset: list[str]
                          ) -> list[str]:
        await self._workflow(name)
        names = await self.store.change_env(name, values, unset)
        logs.event("env-changed", workflow=name, set=sorted(values), unset=sorted(unset))
        return names

    async def envs(self) -> list[dict[str, Any]]:
        """Every built environment: packages, size, the workflows using it, its zygote."""
        environments = self._environments()
        used = await self.store.environments_in_use()
        listed = await asyncio.to_thread(environments.listing)
        executors = self.dispatcher.executor
        for item in listed:
            item["workflows"] = used.get(item["hash"], [])
            status = getattr(executors, "environment_status", lambda _: None)(item["hash"])
            item["zygote"] = status or {"state": "stopped"}
        return listed

    async def envs_prune(self) -> dict[str, Any]:
        """Remove now every environment no workflow's current version uses."""
        return {"removed": await prune_environments(self.store, self._environments(), 0)}

    def _environments(self) -> Environments:
        if self.dispatcher.environments is None:
            raise CommandError("this daemon has no workflow environments")
        return self.dispatcher.environments

    async def run(self, name: str, data: Any = None) -> dict[str, Any]:
        """Execute now with the trigger `manual`, and say how it went."""
        workflow = await self._workflow(name)
        try:
            if workflow.kind == Kind.PULL:
                executed = await self.scheduler.run_now(workflow)
            else:
                request = {"Content-Type": "application/json",
                           **catch.json_fields({} if data is None else data)}
                executed = await self.deliveries.run(
                    workflow, await self.store.delivery_policy(name), Trigger.MANUAL, request)
        except Overloaded as exc:
            raise CommandError(f"the daemon is overloaded: {exc}; try again") from None
        except Busy as exc:
            raise CommandError(str(exc)) from None
        except JobError as exc:
            raise CommandError(f"--data cannot be handed to the workflow: {exc}") from None
        return self._ran(workflow, executed)

    @staticmethod
    def _ran(workflow: Workflow, executed: Executed) -> dict[str, Any]:
        """How `run` and `replay` report an execution: its record, and for catch the response."""
        if not executed.recorded:
            raise CommandError(f"execution {executed.record.id} ran "
                               f"({executed.record.status}) but the store could not record "
                               "it: nothing it changed was kept")
        out: dict[str, Any] = executed.record.summary()
        if workflow.kind == Kind.CATCH:
            response = executed.response
            if response is None:
                response = catch.status_response(executed.record.status, executed.record.id)
            out["response"] = response
        return out

    async def replay(self, execution_id: str) -> dict[str, Any]:
        """Run a past execution's request (pull: the run) again, as trigger `replay`."""
        record = await self.store.execution(str(execution_id))
        if record is None:
            raise CommandError(f"no execution with id {execution_id}")
        workflow = await self._workflow(record.workflow)
        return self._ran(workflow, await self._replay(workflow, record.id, record.request_id))

    async def _replay(self, workflow: Workflow, original: str, request_id: str | None
                      ) -> Executed:
        lineage = {"replay_of": original, "request_id": request_id}
        try:
            if workflow.kind == "pull":
                return await self.scheduler.run_now(workflow, Trigger.REPLAY, lineage)
            request = await self.store.stored_request(request_id) if request_id else None
            if request is None:
                policy = await self.store.delivery_policy(workflow.name)
                why = ("it is deployed with --no-store-requests, so its requests are not kept"
                       if not policy.store_requests else
                       "its request is no longer stored (retention removed it with its record"
                       " or it ran before requests were kept)")
                raise CommandError(f"cannot replay {original} of {workflow.name}: {why}")
            return await self.dispatcher.execute(workflow, Trigger.REPLAY, request,
                                                 lineage=lineage)
        except Overloaded as exc:
            raise CommandError(f"the daemon is overloaded: {exc}; try again") from None
        except Busy as exc:
            raise CommandError(str(exc)) from None

    async def replay_dead(self, name: str) -> list[dict[str, Any]]:
        """Replay every dead delivery of `name`; each one that succeeds is done."""
        workflow = await self._workflow(name)
        dead = await self.store.dead_deliveries(workflow.name)
        if dead and not (await self.store.delivery_policy(name)).store_requests:
            raise CommandError(f"cannot replay the dead deliveries of {name}: it is deployed "
                               "with --no-store-requests, so their requests were not kept")
        replays = await asyncio.gather(*(self._replay(workflow, item["last_attempt_id"],
                                                      item["id"]) for item in dead))
        for item, executed in zip(dead, replays, strict=True):
            if executed.record.status == "success":
                await self.store.revive_delivery(item["id"])
        logs.event("replayed-dead", workflow=name, deliveries=len(dead))
        return [executed.record.summary() for executed in replays]

    async def dead(self, name: str) -> list[dict[str, Any]]:
        return await self.store.dead_deliveries((await self._workflow(name)).name)

    async def executions(self, name: str, limit: int = 20) -> list[dict[str, Any]]:
        workflow = await self._workflow(name)
        if not isinstance(limit, int) or limit < 1:
            raise CommandError("--limit must be a positive integer")
        return [r.summary() for r in await self.store.executions(workflow.name, limit)]

    async def logs(self, execution_id: str) -> dict[str, Any]:
        record = await self.store.execution(str(execution_id))
        if record is None:
            raise CommandError(f"no execution with id {execution_id}")
        return _full(record)

    async def follow(self, name: str) -> AsyncIterator[dict[str, Any]]:
        """`logs NAME --follow`: each execution of `name` as it ends, until stopped.

        The first item says the subscription is in place, so that a client
        (or a test) knows from when on no execution will be missed.
        """
        await self._workflow(name)
        return self._stream(name)

    async def _stream(self, name: str) -> AsyncIterator[dict[str, Any]]:
        follower = Follower()
        self._followers.setdefault(name, set()).add(follower)
        try:
            yield {"following": name}
            while True:
                for record in await follower.next_batch():
                    yield _full(record)
        finally:
            self._followers[name].discard(follower)

    def publish(self, record: ExecutionRecord) -> None:
        """A listener of the dispatcher: hand a stored record to its followers."""
        for follower in self._followers.get(record.workflow, ()):
            follower.push(record)

    def end_streams(self) -> None:
        """Shutdown: end every `--follow` stream with a message."""
        for followers in self._followers.values():
            for follower in followers:
                follower.end("the daemon is stopping")

    async def versions(self, name: str) -> list[dict[str, Any]]:
        return await self.store.versions(check_name(name))

    async def rollback(self, name: str, version: int) -> dict[str, Any]:
        if isinstance(version, bool) or not isinstance(version, int):
            raise CommandError(f"version must be an integer, got {version!r}")
        workflow = await self.store.rollback(check_name(name), version)
        logs.event("rolled-back", workflow=name, version=version)
        return self._listing(workflow)

    async def rotate_key(self, name: str) -> dict[str, Any]:
        workflow = await self._workflow(name)
        if workflow.kind != Kind.CATCH:
            raise CommandError(f"{name} is a pull workflow; only catch workflows have a key")
        workflow = await self.store.set_catch_key(name, ids.catch_key())
        logs.event("key-rotated", workflow=name)
        return {"name": name, "url": self._url(workflow)}

    async def _rebuild_environments(self, workflows: list[dict[str, Any]]) -> None:
        """Build the current versions' environments from their exact pins, before storing.

        An environment that cannot be built here (its Python is missing, the
        index is unreachable) refuses the whole import, which then stores
        nothing. Older versions' environments are built if rolled back to.
        """
        for item in workflows:
            current = [v for v in item["versions"] if v.get("version") == item["version"]]
            environment = current[0].get("environment") if current else None
            if not environment:
                continue
            try:
                await self._environments().ensure(environment["python"], environment["pins"])
            except (BuildError, OSError, KeyError, TypeError) as exc:
                raise CommandError(f"{item['name']}: its environment could not be built, "
                                   f"nothing was imported: {exc}") from None

    def _files(self) -> WorkflowFiles:
        return self.dispatcher.files or WorkflowFiles(self.config.files_root, images=False)

    async def verify(self, name: str, scheme: str, secret: str | None = None) -> dict[str, Any]:
        """Check the signature of every catch request under `scheme`, or with `off` stop.

        The secret is stored, never returned, listed or logged.
        """
        workflow = await self._workflow(name)
        if workflow.kind != "catch":
            raise CommandError(f"{name} is a pull workflow; only catch requests are signed")
        if scheme == "off":
            if secret:
                raise CommandError("verify off takes no secret")
            await self.store.set_verification(name, None, None)
        else:
            try:
                signatures.check_secret(scheme, secret or "")
            except ValueError as exc:
                raise CommandError(f"verify {scheme}: {exc}") from None
            await self.store.set_verification(name, scheme, secret)
        logs.event("verification", workflow=name, scheme=scheme)
        return {"name": name, "verify": scheme}

    async def export(self, with_secrets: bool = False) -> dict[str, Any]:
        """Every workflow, its versions, settings and persistent directory (a tar.gz)."""
        workflows = await self.store.export(with_secrets=with_secrets is True)
        for item in workflows:
            size = self.config.limits.merged(item["limits"]).files_mb
            item["files"] = await self._files().archive(item["name"], size)
        return {"format": EXPORT_FORMAT, "workflows": workflows}

    async def import_(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise CommandError(f"not a wfd export (expected format {EXPORT_FORMAT!r})")
        workflows = data.get("workflows")
        if not isinstance(workflows, list):
            raise CommandError("the export has no list of workflows")
        for item in workflows:
            check_name(item.get("name") if isinstance(item, dict) else None)
            _check_exported(item)
        await self._rebuild_environments(workflows)
        try:
            names = await self.store.import_(workflows)
        except (KeyError, TypeError, ValueError) as exc:
            raise CommandError(f"the export is incomplete or malformed: {exc!r}") from None
        for item in workflows:
            if item.get("files"):
                size = self.config.limits.merged(item["limits"]).files_mb
                try:
                    await self._files().restore(item["name"], size, item["files"])
                except (OSError, ValueError, tarfile.TarError) as exc:
                    raise CommandError(f"{item['name']}: its files could not be restored "
                                       f"({exc}); the workflows were imported") from None
        for imported in names:
            await self.scheduler.refresh(imported)
        logs.event("imported", workflows=len(names))
        return {"imported": names}


@dataclass(frozen=True)
class _Deploy:
    """A deploy request once checked, on its way to becoming a version."""

    name: str
    kind: Kind
    code: str
    overrides: dict[str, Any]
    schedule: dict[str, Any] | None
    limits: Limits
    existing: Workflow | None
    # The new network allowances (None: the workflow keeps its own), delivery flags.
    allow_net: list[str] | None
    delivery: dict[str, Any]


def _stays(existing: Workflow | None) -> str:
    return f"version {existing.version if existing else '-'} stays in place"


def _delivery_changes(kind: str, given: dict[str, Any]) -> dict[str, Any]:
    """The delivery flags of a deploy, checked; refused with a clear message."""
    if not given:
        return {}
    if kind != "catch":
        raise CommandError("--async, --retries, --retry-backoff-s and --store-requests are "
                           "for catch workflows")
    unknown = sorted(set(given) - set(POLICY_KEYS))
    if unknown:
        raise CommandError(f"unknown delivery option(s): {', '.join(unknown)}")
    for flag in ("async", "store_requests"):
        if flag in given and not isinstance(given[flag], bool):
            raise CommandError(f"{flag} must be true or false")
    retries = given.get("retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 100:
        raise CommandError(f"--retries must be an integer from 0 to 100, got {retries!r}")
    backoff = given.get("retry_backoff_s", 1)
    if isinstance(backoff, bool) or not isinstance(backoff, int | float) or not (
            0 < backoff <= MAX_BACKOFF_S):
        raise CommandError(f"--retry-backoff-s must be over 0 and at most {MAX_BACKOFF_S:g},"
                           f" got {backoff!r}")
    return given


def _check_exported(item: dict[str, Any]) -> None:
    """Refuse what the store would accept but could not serve.

    A workflow whose current version is not among its versions would be
    stored and then be invisible (its code is joined on that version).
    """
    name, versions = item["name"], item.get("versions")
    _kind(item.get("kind"), f"{name}: ")
    if not isinstance(versions, list) or not all(isinstance(v, dict) for v in versions):
        raise CommandError(f"{name}: versions must be a list of objects")
    if item.get("version") not in {v.get("version") for v in versions}:
        raise CommandError(f"{name}: current version {item.get('version')} is not among "
                           "its versions")
    env = item.get("env") or {}
    if not isinstance(env, dict):
        raise CommandError(f"{name}: env must be an object")
    try:
        for key, value in env.items():
            envvars.check_value(envvars.check_name(key), value)
    except envvars.EnvError as exc:
        raise CommandError(f"{name}: {exc}") from None
    delivery = item.get("delivery") or {}
    if not isinstance(delivery, dict) or delivery.get("verify", "off") not in (
            "off", *signatures.SCHEMES):
        raise CommandError(f"{name}: delivery.verify must be off or one of "
                           f"{', '.join(signatures.SCHEMES)}")


def _kind(value: Any, where: str = "") -> Kind:
    """The kind a deploy or an import names, refused with a clear message."""
    try:
        return Kind(value)
    except ValueError:
        kinds = " or ".join(Kind)
        raise CommandError(f"{where}kind must be {kinds}, got {value!r}") from None


def _full(record: ExecutionRecord) -> dict[str, Any]:
    """A record as `wfd ctl logs` shows it: with its output and traceback."""
    return {**record.summary(), "traceback": record.traceback, "output": record.output,
            "output_truncated": record.output_truncated}


