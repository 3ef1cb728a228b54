"""Shared helpers for tests that watch processes on the host (conftest has wait_for)."""

from __future__ import annotations


def pid_gone(pid: int) -> bool:
    """True when pid is no longer a live process (absent, or a zombie awaiting its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def pid_alive(pid: int) -> bool:
    return not pid_gone(pid)
