"""The example /etc/wfd/wfd.toml documents every daemon key with its default."""

import tomllib
from pathlib import Path

EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "systemd" / "wfd.toml"
KEYS = {
    "listen", "admin_listen", "public_url", "team", "data_dir", "socket", "socket_group",
    "log_format", "log_level", "max_body_mb", "global_concurrency", "queue_max", "grace_s",
    "isolation.mode", "isolation.require_cgroups", "max_json_depth", "max_code_kb",
    "header_timeout_s", "body_timeout_s", "keepalive_s", "max_connections", "max_pending_mb",
    "env_idle_s", "max_zygotes", "env_keep_days", "env_cache_dir",
    "limits.timeout_s", "limits.memory_mb", "limits.cpu_s", "limits.processes",
    "limits.open_files", "limits.file_size_mb", "limits.tmp_mb", "limits.concurrency",
    "limits.output_kb",
    "limits.settings_kb", "limits.files_mb",
    "trace_stages",
    "retention.max_per_workflow", "retention.max_age_days", "retention.versions_per_workflow",
    "network.allow", "network.resolv_conf",
}  # fmt: skip


def test_example_config_has_every_key() -> None:
    config = tomllib.loads(EXAMPLE_CONFIG.read_text())
    found = set()
    for key, value in config.items():
        if isinstance(value, dict):
            found |= {f"{key}.{inner}" for inner in value}
        else:
            found.add(key)
    assert found == KEYS


def test_every_key_has_an_explanation() -> None:
    """A comment line right above each key: the file is the operator's manual."""
    lines = EXAMPLE_CONFIG.read_text().splitlines()
    for number, line in enumerate(lines):
        if line and line[0].isalpha():
            assert lines[number - 1].startswith("# "), f"line {number + 1}: {line}"
