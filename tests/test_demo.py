"""`make run` (examples/demo.sh) says "serving" only when its own daemon answers."""

import os
import shutil
import subprocess
from pathlib import Path

from conftest import free_port

REPO = Path(__file__).resolve().parent.parent


def demo(tmp_path: Path, listen: str) -> subprocess.CompletedProcess:
    """Run a copy of demo.sh in `tmp_path` (its own wfd-data), with the repo's .venv."""
    (tmp_path / "examples").mkdir()
    for name in ("demo.sh", "hello.py"):
        shutil.copy(REPO / "examples" / name, tmp_path / "examples" / name)
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    return subprocess.run([str(tmp_path / "examples" / "demo.sh")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "WFD_LISTEN": listen})


def stop(tmp_path: Path) -> None:
    pid_file = tmp_path / "wfd-data" / "wfd.pid"
    if pid_file.exists():
        subprocess.run(["kill", pid_file.read_text().strip()], check=False)


def test_demo_refuses_a_port_another_server_answers_on(tmp_path, standin):
    other = standin()
    other.routes[("GET", "/healthz")] = (200, {}, {"status": "serving", "instance": "other"})
    listen = other.url.removeprefix("http://")
    try:
        result = demo(tmp_path, listen)
    finally:
        stop(tmp_path)
    assert result.returncode != 0
    assert "wfd is serving" not in result.stdout
    assert f"cannot listen on {listen}" in result.stdout + result.stderr


def test_demo_serves_and_deploys_on_a_free_port(tmp_path):
    listen = f"127.0.0.1:{free_port()}"
    try:
        result = demo(tmp_path, listen)
    finally:
        stop(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"wfd is serving on http://{listen}" in result.stdout
