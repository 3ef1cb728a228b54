"""wfd: a self-hosted runner for HrFlow-compatible workflows (daemon side)."""
