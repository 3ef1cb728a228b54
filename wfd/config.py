"""The daemon's configuration: a validated value, built once at start-up.

Every key can come from the TOML file and be overridden by a `wfd serve`
flag. Unknown keys are errors rather than silently ignored, so a typo in
`/etc/wfd/wfd.toml` is caught at start-up instead of months later.
"""

import os
import re
import resource
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic import with_config as _with_config

from wfd.isolation.network import Allow

MIB = 1024 * 1024
MODULE_PATTERN = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
# The {team} part of catch URLs: one path segment, nothing a proxy would rewrite.
TEAM_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# orjson writes at most 254 levels; settings and requests must stay encodable.
MAX_JSON_DEPTH = 254
# Descriptors the daemon keeps for itself when `max_connections` is derived
# from RLIMIT_NOFILE: the store, the zygote and its spares, the control
# socket and its clients, logs; and each running execution's pipes and pidfd.
RESERVED_FDS = 128
FDS_PER_EXECUTION = 8
MIN_CONNECTIONS = 16


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


# Types of config values: TOML's own types only (strict: "30" is not 30, true
# is not 1), each with its range. A float key takes an integer too.
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
PositiveFloat = Annotated[float, Strict(), Field(gt=0)]
NonNegativeFloat = Annotated[float, Strict(), Field(ge=0)]
Text = Annotated[str, Strict()]
IsolationMode = Literal["strict", "best-effort", "none"]
# Unknown keys are errors; values are checked again when a reload builds a new one.
_STRICT_KEYS = ConfigDict(extra="forbid")


def split_host_port(address: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[::1]:PORT`) as a pair, with a clear error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host or not 1 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT with a port from 1 to 65535, got {address!r}")
    return host.strip("[]"), int(port)


def _address(value: str) -> str:
    split_host_port(value)
    return value


def _optional_address(value: str) -> str:
    return _address(value) if value else value


def _public_url(value: str) -> str:
    if value and not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"must be empty or start with http:// or https:// and a host, "
                         f"got {value!r}")
    return value


def _team(value: str) -> str:
    if not TEAM_PATTERN.fullmatch(value):
        raise ValueError("must be 1 to 63 letters, digits, '_', '.' or '-', starting with a "
                         f"letter or digit, got {value!r}")
    return value


def _module_names(value: tuple[str, ...]) -> tuple[str, ...]:
    for name in value:
        if not MODULE_PATTERN.fullmatch(name):
            raise ValueError(f"must be a list of module names, got {name!r}")
    return value


def _executor(value: str) -> str:
    from wfd.executor import EXECUTORS  # the one name map; imported late, it imports us

    if value not in EXECUTORS:
        raise ValueError(f"must be {' or '.join(map(repr, EXECUTORS))}, got {value!r}")
    return value


@_with_config(_STRICT_KEYS)
@dataclass(frozen=True)
class Limits:
    """Per-execution limits: daemon-wide defaults, each overridable per workflow."""

    timeout_s: PositiveFloat = 30.0
    memory_mb: PositiveInt = 512
    cpu_s: PositiveInt = 30
    processes: PositiveInt = 128
    open_files: PositiveInt = 256
    file_size_mb: PositiveInt = 64
    tmp_mb: PositiveInt = 128
    concurrency: PositiveInt = 10
    output_kb: PositiveInt = 1024
    settings_kb: PositiveInt = 1024
    # The workflow's persistent directory, $WFD_WORKFLOW_DIR (wfd/files.py).
    files_mb: PositiveInt = 100

    def merged(self, overrides: dict[str, Any]) -> "Limits":
        """These limits with a workflow's overrides applied (None means inherit)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self) -> "Limits":
        """Return self, or raise ConfigError naming the first limit out of range."""
        limits: Limits = _validated(Limits, asdict(self), "limit ")
        return limits


def redeployed_overrides(previous: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """A workflow's limit overrides after a deploy: those given replace, the rest stay.

    None in `given` means "not named on this deploy", not "back to the default".
    """
    return {**previous, **{k: v for k, v in given.items() if v is not None}}


@_with_config(_STRICT_KEYS)
@dataclass(frozen=True)
class Retention:
    """How many execution records and code versions to keep."""

    max_per_workflow: PositiveInt = 1000
    max_age_days: PositiveFloat = 30.0
    # Versions of each workflow's code kept; the current one and the one
    # before it are kept whatever this says.
    versions_per_workflow: PositiveInt = 50


@_with_config(_STRICT_KEYS)
@dataclass(frozen=True)
class Network:
    """Where every execution may connect beyond the default (docs/isolation.md, "The network")."""

    # CIDR or CIDR:PORT entries (127.0.0.1/32:PORT for one port of the host's loopback).
    allow: tuple[Text, ...] = ()
    # Bound into the sandbox as /etc/resolv.conf; its nameservers are allowed on port 53.
    resolv_conf: Path = Path("/etc/resolv.conf")


def check_allowances(entries: Any, own_ports: set[int], where: str) -> tuple[str, ...]:
    """Canonical allowances, or ConfigError naming the bad one; the daemon's ports never."""
    if isinstance(entries, str) or not isinstance(entries, list | tuple):
        raise ConfigError(f"{where} must be a list of CIDR[:PORT] strings, got {entries!r}")
    allowed = []
    for entry in entries:
        try:
            allow = Allow.parse(entry)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if allow.loopback and allow.port in own_ports:
            raise ConfigError(f"{where}: {entry} is the daemon's own port; executions never "
                              "reach the daemon's listeners")
        allowed.append(str(allow))
    return tuple(allowed)


@_with_config(_STRICT_KEYS)
@dataclass(frozen=True)
class Config:
    """Everything `wfd serve` needs to know before it starts."""

    listen: Annotated[Text, AfterValidator(_address)] = "127.0.0.1:8080"
    admin_listen: Annotated[Text, AfterValidator(_optional_address)] = ""
    public_url: Annotated[Text, AfterValidator(_public_url)] = ""
    team: Annotated[Text, AfterValidator(_team)] = "default"
    data_dir: Path = Path("wfd-data")
    socket: Path | None = None
    socket_group: Text = ""
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_body_mb: PositiveFloat = 10.0
    # Catch bodies nested deeper are refused (400); settings too (the execution fails).
    max_json_depth: Annotated[int, Strict(), Field(ge=2, le=MAX_JSON_DEPTH)] = 64
    # Largest workflow file a deploy accepts.
    max_code_kb: PositiveInt = 1024
    global_concurrency: NonNegativeInt = 0
    queue_max: NonNegativeInt = 100
    grace_s: NonNegativeFloat = 30.0
    # -- Hostile clients (SPEC 8): how long a client may take, how many may be
    # connected, how many body bytes may wait. README "Slow and hostile clients".
    header_timeout_s: PositiveFloat = 10.0
    body_timeout_s: PositiveFloat = 30.0
    keepalive_s: PositiveFloat = 15.0
    # 0: derived from the descriptor limit (`connection_limit`).
    max_connections: NonNegativeInt = 0
    max_pending_mb: PositiveFloat = 256.0
    # -- end of hostile clients
    # How executions start (README "The zygote"): "zygote" forks them from a
    # preloaded process, "spawn" starts a fresh interpreter for each one.
    executor: Annotated[Text, AfterValidator(_executor)] = "zygote"
    # Modules the zygote imports once so that executions start with them loaded.
    preload: Annotated[tuple[Text, ...], AfterValidator(_module_names)] = (
        "hrflow", "requests", "json")
    # Bounds of the pool of already-forked children waiting for work.
    spares_min: NonNegativeInt = 2
    spares_max: PositiveInt = 8
    isolation: IsolationMode = "strict"
    # Strict refuses to start without a cgroup per execution unless this is false
    # (`[isolation] require_cgroups`): rlimits alone cannot bound a fork bomb.
    require_cgroups: Annotated[bool, Strict()] = True
    # Workflow environments (README "Packages, variables and files"): a
    # zygote other than the default (an environment's, or a policy's) stops
    # after this long without an execution; at most this many run at once;
    # an environment no version uses is removed after this many days.
    env_idle_s: NonNegativeFloat = 300.0
    max_zygotes: PositiveInt = 4
    env_keep_days: NonNegativeFloat = 7.0
    # uv's package cache, shared by every build (default: <data_dir>/envs/.cache).
    env_cache_dir: Path | None = None
    # Time each catch execution's stages and log them (`stages` lines): for
    # bench/bench_stages.py, off in production (wfd/stages.py).
    trace_stages: Annotated[bool, Strict()] = False
    limits: Limits = field(default_factory=Limits)
    retention: Retention = field(default_factory=Retention)
    network: Network = field(default_factory=Network)

    def __post_init__(self) -> None:
        if self.spares_min > self.spares_max:
            raise ValueError(f"spares_min must be at most spares_max ({self.spares_max}), "
                             f"got {self.spares_min}")
        if self.max_pending_mb < self.max_body_mb:
            raise ValueError(f"max_pending_mb ({self.max_pending_mb:g}) must be at least "
                             f"max_body_mb ({self.max_body_mb:g}), or no body of the "
                             "largest size could ever be read")

    @property
    def own_ports(self) -> set[int]:
        """The ports of the daemon's listeners, which no allowance may open."""
        return {split_host_port(a)[1] for a in (self.listen, self.admin_listen) if a}

    @property
    def socket_path(self) -> Path:
        return self.socket or self.data_dir / "wfd.sock"

    @property
    def envs_root(self) -> Path:
        """Where workflow environments are built (absolute: they are bound)."""
        return self.data_dir.resolve() / "envs"

    @property
    def envs_cache(self) -> Path:
        return (self.env_cache_dir or self.envs_root / ".cache").resolve()

    @property
    def files_root(self) -> Path:
        """Where the workflows' persistent directories live (absolute: it is bound)."""
        return self.data_dir.resolve() / "files"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "wfd.db"

    @property
    def concurrency(self) -> int:
        """Executions running at once across all workflows (default 2 per CPU)."""
        return self.global_concurrency or 2 * (os.cpu_count() or 1)

    @property
    def base_url(self) -> str:
        """The scheme and host callers use, as seen from outside a proxy."""
        return (self.public_url or f"http://{self.listen}").rstrip("/")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MIB)

    @property
    def max_pending_bytes(self) -> int:
        return int(self.max_pending_mb * MIB)

    @property
    def connection_limit(self) -> int:
        """`max_connections`, or what the descriptor limit leaves after the daemon's own."""
        if self.max_connections:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        reserved = RESERVED_FDS + FDS_PER_EXECUTION * self.concurrency
        return max(MIN_CONNECTIONS, soft - reserved)


@_with_config(_STRICT_KEYS)
@dataclass(frozen=True)
class IsolationTable:
    """The long form of `isolation`: an `[isolation]` table (see `_flatten_isolation`)."""

    mode: IsolationMode = "strict"
    require_cgroups: Annotated[bool, Strict()] = True


SECTIONS = ("limits", "retention", "network", "isolation")


def _key(location: tuple[Any, ...]) -> str:
    """A config key as the TOML file spells it: `queue_max`, `[limits] memory_mb`."""
    parts = [str(part) for part in location if part != "__post_init__"]
    if len(parts) > 1 and parts[0] in SECTIONS:
        return f"[{parts[0]}] {'.'.join(parts[1:])}"
    return ".".join(parts) or "the config"


def _message(error: dict[str, Any], prefix: str) -> str:
    """One line naming the key, what it must be, and what it was."""
    key = prefix + _key(error["loc"])
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"unknown key {key}"
    text = error["msg"].removeprefix("Value error, ")
    if error["type"] == "bool_type":
        text = "must be true or false"
    elif text.startswith("Input should be "):
        text = "must be " + text.removeprefix("Input should be ")
    if "got " not in text and error["type"] != "missing":
        text += f", got {error['input']!r}"
    return f"{key} {text}" if error["loc"] else text


def _validated(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    try:
        return TypeAdapter(cls).validate_python(values)
    except ValidationError as exc:
        raise ConfigError(_message(dict(exc.errors()[0]), prefix)) from None


def load(path: Path | None = None, **overrides: Any) -> Config:
    """Build the configuration from a TOML file (optional) and flag overrides.

    Every key is type- and range-checked (pydantic, against the dataclasses
    above); the first problem is raised as a ConfigError of one line.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
    raw.update({k: v for k, v in overrides.items() if v is not None})
    _flatten_isolation(raw)
    config: Config = _validated(Config, raw)
    return replace(config, network=replace(config.network, allow=check_allowances(
        config.network.allow, config.own_ports, "[network] allow")))


def _flatten_isolation(raw: dict[str, Any]) -> None:
    """`isolation = "strict"`, or an `[isolation]` table with `mode` and `require_cgroups`.

    TOML cannot have both a key and a table of one name, so the table keeps
    the mode too; the short form stays valid for existing configs.
    """
    table = raw.get("isolation")
    if not isinstance(table, dict):
        return
    checked: IsolationTable = _validated(IsolationTable, table, "[isolation] ")
    raw["isolation"] = checked.mode
    raw["require_cgroups"] = checked.require_cgroups
