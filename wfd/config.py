"""The daemon's configuration: a validated value, built once at start-up.

Every key can come from the TOML file and be overridden by a `wfd serve`
flag. Unknown keys are errors rather than silently ignored, so a typo in
`/etc/wfd/wfd.toml` is caught at start-up instead of months later.
"""

import os
import re
import resource
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from wfd.isolation.network import Allow

MIB = 1024 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error")
MODULE_PATTERN = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
ISOLATION_MODES = ("strict", "best-effort", "none")
# Descriptors the daemon keeps for itself when `max_connections` is derived
# from RLIMIT_NOFILE: the store, the zygote and its spares, the control
# socket and its clients, logs; and each running execution's pipes and pidfd.
RESERVED_FDS = 128
FDS_PER_EXECUTION = 8
MIN_CONNECTIONS = 16


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class Limits:
    """Per-execution limits: daemon-wide defaults, each overridable per workflow."""

    timeout_s: float = 30.0
    memory_mb: int = 512
    cpu_s: int = 30
    processes: int = 128
    open_files: int = 256
    file_size_mb: int = 64
    tmp_mb: int = 128
    concurrency: int = 10
    output_kb: int = 1024
    settings_kb: int = 1024
    # The workflow's persistent directory, $WFD_WORKFLOW_DIR (wfd/files.py).
    files_mb: int = 100

    def merged(self, overrides: dict[str, Any]) -> "Limits":
        """These limits with a workflow's overrides applied (None means inherit).

        The one place a workflow's effective limits are made: the daemon's
        defaults, under the overrides the workflow was deployed with.
        """
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self) -> "Limits":
        """Return self, or raise ConfigError naming the first limit out of range."""
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"limit {item.name} must be a positive number, got {value!r}")
        return self


def redeployed_overrides(previous: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """A workflow's limit overrides after a deploy: those given replace, the rest stay.

    None in `given` means "not named on this deploy", not "back to the default".
    """
    return {**previous, **{k: v for k, v in given.items() if v is not None}}


@dataclass(frozen=True)
class Retention:
    """How many execution records to keep: per workflow, and by age."""

    max_per_workflow: int = 1000
    max_age_days: float = 30.0

    def validate(self) -> "Retention":
        """Return self, or raise ConfigError: keeping nothing, or forever, is not retention."""
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"retention {item.name} must be a positive number, "
                                  f"got {value!r}")
        return self


@dataclass(frozen=True)
class Network:
    """Where every execution may connect beyond the default (docs/isolation.md, "The network")."""

    # CIDR or CIDR:PORT entries (127.0.0.1/32:PORT for one port of the host's loopback).
    allow: tuple[str, ...] = ()
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


@dataclass(frozen=True)
class Config:
    """Everything `wfd serve` needs to know before it starts."""

    listen: str = "127.0.0.1:8080"
    admin_listen: str = ""
    public_url: str = ""
    team: str = "default"
    data_dir: Path = Path("wfd-data")
    socket: Path | None = None
    socket_group: str = ""
    log_format: str = "text"
    log_level: str = "info"
    max_body_mb: float = 10.0
    global_concurrency: int = 0
    queue_max: int = 100
    grace_s: float = 30.0
    # -- Hostile clients (SPEC 8): how long a client may take, how many may be
    # connected, how many body bytes may wait. README "Slow and hostile clients".
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_s: float = 15.0
    # 0: derived from the descriptor limit (`connection_limit`).
    max_connections: int = 0
    max_pending_mb: float = 256.0
    # -- end of hostile clients
    # How executions start (README "The zygote"): "zygote" forks them from a
    # preloaded process, "spawn" starts a fresh interpreter for each one.
    executor: str = "zygote"
    # Modules the zygote imports once so that executions start with them loaded.
    preload: tuple[str, ...] = ("hrflow", "requests", "json")
    # Bounds of the pool of already-forked children waiting for work.
    spares_min: int = 2
    spares_max: int = 8
    isolation: str = "strict"
    # Strict refuses to start without a cgroup per execution unless this is false
    # (`[isolation] require_cgroups`): rlimits alone cannot bound a fork bomb.
    require_cgroups: bool = True
    # Workflow environments (README "Packages, variables and files"): a
    # zygote other than the default (an environment's, or a policy's) stops
    # after this long without an execution; at most this many run at once;
    # an environment no version uses is removed after this many days.
    env_idle_s: float = 300.0
    max_zygotes: int = 4
    env_keep_days: float = 7.0
    # uv's package cache, shared by every build (default: <data_dir>/envs/.cache).
    env_cache_dir: Path | None = None
    limits: Limits = field(default_factory=Limits)
    retention: Retention = field(default_factory=Retention)
    network: Network = field(default_factory=Network)

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


def split_host_port(address: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[::1]:PORT`) as a pair, with a clear error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"listen address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _typed(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Check that `values` only names fields of `cls`, converting paths."""
    known = {item.name: item for item in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown {where}key(s): {', '.join(unknown)}")
    out = {}
    for key, value in values.items():
        if key in ("data_dir", "socket", "resolv_conf", "env_cache_dir") and value:
            value = Path(value)
        if key == "preload" and isinstance(value, list):
            value = tuple(value)
        out[key] = value
    return out


def load(path: Path | None = None, **overrides: Any) -> Config:
    """Build the configuration from a TOML file (optional) and flag overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
    _flatten_isolation(raw)
    limits = Limits(**_typed(Limits, raw.pop("limits", {}), "[limits] ")).validate()
    retention = Retention(**_typed(Retention, raw.pop("retention", {}),
                                   "[retention] ")).validate()
    network = Network(**_typed(Network, raw.pop("network", {}), "[network] "))
    raw.update({k: v for k, v in overrides.items() if v is not None})
    config = Config(limits=limits, retention=retention, network=network,
                    **_typed(Config, raw, ""))
    split_host_port(config.listen)
    if config.admin_listen:
        split_host_port(config.admin_listen)
    config = replace(config, network=replace(network, allow=check_allowances(
        network.allow, config.own_ports, "[network] allow")))
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, "
                          f"got {config.log_level!r}")
    if config.log_format not in ("text", "json"):
        raise ConfigError(f"log_format must be 'text' or 'json', got {config.log_format!r}")
    _check_executor(config)
    _check_clients(config)
    for key in ("env_idle_s", "max_zygotes", "env_keep_days"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or (
                key == "max_zygotes" and (not isinstance(value, int) or value < 1)):
            raise ConfigError(f"{key} must be a positive number, got {value!r}")
    if config.isolation not in ISOLATION_MODES:
        raise ConfigError(f"isolation must be one of {', '.join(ISOLATION_MODES)}, "
                          f"got {config.isolation!r}")
    if not isinstance(config.require_cgroups, bool):
        raise ConfigError(f"[isolation] require_cgroups must be true or false, "
                          f"got {config.require_cgroups!r}")
    return config


def _flatten_isolation(raw: dict[str, Any]) -> None:
    """`isolation = "strict"`, or an `[isolation]` table with `mode` and `require_cgroups`.

    TOML cannot have both a key and a table of one name, so the table keeps
    the mode too; the short form stays valid for existing configs.
    """
    table = raw.get("isolation")
    if not isinstance(table, dict):
        return
    unknown = sorted(set(table) - {"mode", "require_cgroups"})
    if unknown:
        raise ConfigError(f"unknown [isolation] key(s): {', '.join(unknown)}")
    raw["isolation"] = table.get("mode", "strict")
    if "require_cgroups" in table:
        raw["require_cgroups"] = table["require_cgroups"]


def _check_executor(config: Config) -> None:
    from wfd.executor import EXECUTORS  # the one name map; imported late, it imports us

    if config.executor not in EXECUTORS:
        names = " or ".join(repr(name) for name in EXECUTORS)
        raise ConfigError(f"executor must be {names}, got {config.executor!r}")
    if not (isinstance(config.preload, tuple)
            and all(isinstance(name, str) and MODULE_PATTERN.fullmatch(name)
                    for name in config.preload)):
        raise ConfigError(f"preload must be a list of module names, got {config.preload!r}")
    low, high = config.spares_min, config.spares_max
    if not (type(low) is int and type(high) is int and 0 <= low <= high and high >= 1):
        raise ConfigError(f"spares_min and spares_max must be integers with "
                          f"0 <= spares_min <= spares_max, 1 <= spares_max; got {low}, {high}")


def _check_clients(config: Config) -> None:
    """The hostile-client keys: positive, and a budget that fits one whole body."""
    for key in ("header_timeout_s", "body_timeout_s", "keepalive_s", "max_pending_mb"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{key} must be a positive number, got {value!r}")
    if type(config.max_connections) is not int or config.max_connections < 0:
        raise ConfigError(f"max_connections must be a positive integer or 0 (derived from "
                          f"the descriptor limit), got {config.max_connections!r}")
    if config.max_pending_mb < config.max_body_mb:
        raise ConfigError(f"max_pending_mb ({config.max_pending_mb:g}) must be at least "
                          f"max_body_mb ({config.max_body_mb:g}), or no body of the "
                          "largest size could ever be read")
