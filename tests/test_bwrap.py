"""bwrap: run the real sandbox and check each wall from both sides."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid
from pathlib import Path

import pytest
from conftest import wait_for

from wfd.isolation import bwrap

CAP = 8 << 20


@pytest.fixture(scope="module", autouse=True)
def require_bwrap() -> None:
    """CI installs bubblewrap; a missing or broken bwrap is a failure, never a skip."""
    support = bwrap.probe()
    if not support.available:
        pytest.fail(f"bwrap unusable: {support.reason}")


def sandboxed(code: str, **kwargs) -> list[str]:
    return [*bwrap.command(sys.executable, CAP, **kwargs), sys.executable, "-I", "-c", code]


def run(code: str, **kwargs) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        sandboxed(textwrap.dedent(code)), capture_output=True, text=True, timeout=30, **kwargs
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def host_pids_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_outside_paths_are_absent(tmp_path: Path) -> None:
    data_dir = tmp_path / "wfd-data"
    data_dir.mkdir()
    (data_dir / "wfd.sqlite").write_text("secret")
    daemon_src = Path(bwrap.__file__).parent
    out = run(
        f"import os; print(os.path.exists({str(data_dir)!r}), os.path.exists({str(daemon_src)!r}))"
    )
    assert out.stdout.split() == ["False", "False"]


def test_proc_lists_only_the_sandbox() -> None:
    out = run("import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    assert out.stdout.strip() == "[1, 2]"


def host_view_of_ids(prefix: list[str], python: str) -> list[str]:
    """Uid/Gid/Groups/CapEff of the sandboxed process as the host kernel sees them.

    Reading from inside can mislead: uid_map is relative to nested namespaces,
    and "65534" inside a root-made user namespace is kernel uid 0.
    """
    marker = "wfd-ids-" + uuid.uuid4().hex
    code = f"import sys; print('ready', flush=True); sys.stdin.readline()  # {marker}"
    proc = subprocess.Popen(
        [*prefix, python, "-I", "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == b"ready\n"
    (pid,) = [p for p in host_pids_with(marker) if Path(f"/proc/{p}/exe").resolve().name != "bwrap"]
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0
    keep = ("Uid:", "Gid:", "Groups:", "CapEff:")
    return [" ".join(line.split()) for line in status if line.startswith(keep)]


def test_identity_is_unprivileged_in_the_host_kernel() -> None:
    ids = host_view_of_ids(bwrap.command(sys.executable, CAP), sys.executable)
    assert ids == [
        "Uid: 65534 65534 65534 65534",
        "Gid: 65534 65534 65534 65534",
        "Groups:",
        "CapEff: 0000000000000000",
    ]


def test_host_secrets_and_kernel_knobs_are_closed() -> None:
    out = run(
        """
        for path, mode in [('/etc/shadow', 'r'), ('/proc/sys/vm/drop_caches', 'w'),
                           ('/proc/sysrq-trigger', 'w')]:
            try:
                open(path, mode).close()  # opening only: nothing is ever written
                print('OPEN', path)
            except OSError as e:
                print('closed', path, type(e).__name__)
        """
    )
    assert "OPEN" not in out.stdout
    assert out.stdout.count("closed") == 3


def test_runtime_is_read_only_and_tmp_is_capped() -> None:
    target = Path(sys.prefix) / "wfd-write-test"
    out = run(
        f"""
        import errno
        try:
            open({str(target)!r}, 'w')
        except OSError as e:
            print(errno.errorcode[e.errno])
        try:
            with open('/tmp/fill', 'wb') as f:
                f.write(b'x' * {2 * CAP})
        except OSError as e:
            print(errno.errorcode[e.errno])
        """
    )
    assert out.stdout.split() == ["EROFS", "ENOSPC"]
    assert not target.exists()


def test_environment_is_scrubbed() -> None:
    env = {**os.environ, "WFD_SECRET_TOKEN": "s3cret"}
    out = run("import os; print(sorted(os.environ))", env=env)
    assert "WFD_SECRET_TOKEN" not in out.stdout
    assert out.stdout.strip() == "['HOME', 'LANG', 'PATH', 'PWD', 'TMPDIR']"


def test_inherited_result_fd_passes_through() -> None:
    r, w = os.pipe()
    try:
        run(f"import os; os.write({w}, b'result-ok')", pass_fds=(w,))
        os.close(w)
        assert os.read(r, 100) == b"result-ok"
    finally:
        os.close(r)


def test_outbound_tcp_to_host_works() -> None:
    received: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def accept() -> None:
            conn, _ = server.accept()
            with conn:
                received.append(conn.recv(100))

        thread = threading.Thread(target=accept)
        thread.start()
        run(f"import socket; socket.create_connection(('127.0.0.1', {port})).sendall(b'hello')")
        thread.join(timeout=10)
    assert received == [b"hello"]


def test_installed_packages_import() -> None:
    out = run("import requests, hrflow; print('imported')")
    assert out.stdout.strip() == "imported"


DOUBLE_FORK = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv('/bin/sh', ['sh', '-c', 'sleep 300; : {marker}'])
    os._exit(0)
os.wait()
print('ready', flush=True)
sys.stdin.readline()
"""


def test_setsid_grandchild_dies_with_the_sandbox() -> None:
    marker = "wfd-survivor-" + uuid.uuid4().hex
    code = DOUBLE_FORK.format(marker=marker)
    proc = subprocess.Popen(
        sandboxed(code), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == "ready\n"
    wait_for(lambda: host_pids_with(marker) != [], what="grandchild visible on the host")
    proc.stdin.write("\n")
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0
    wait_for(lambda: host_pids_with(marker) == [], what="grandchild gone after sandbox exit")


def test_everything_dies_when_the_daemon_is_sigkilled() -> None:
    marker = "wfd-orphan-" + uuid.uuid4().hex
    inner = sandboxed(DOUBLE_FORK.format(marker=marker))
    # A stand-in daemon: starts the sandbox, then gets SIGKILLed without cleaning up.
    daemon_code = f"import subprocess; subprocess.run({inner!r}); import time; time.sleep(300)"
    daemon = subprocess.Popen(
        [sys.executable, "-c", daemon_code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert daemon.stdout is not None
    assert daemon.stdout.readline() == "ready\n"
    wait_for(lambda: host_pids_with(marker) != [], what="grandchild visible on the host")
    daemon.send_signal(signal.SIGKILL)
    assert daemon.wait(timeout=10) == -signal.SIGKILL
    wait_for(lambda: host_pids_with(marker) == [], what="sandbox gone after daemon SIGKILL")
    wait_for(lambda: host_pids_with(inner[-1]) == [], what="bwrap gone after daemon SIGKILL")


def test_unprivileged_daemon_path_uses_a_user_namespace() -> None:
    """The non-root code path, run as uid 65534 with the system Python it can reach."""
    python = "/usr/bin/python3"
    setpriv = shutil.which("setpriv")
    assert setpriv is not None
    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    ids = host_view_of_ids([*as_nobody, *bwrap.command(python, CAP, privileged=False)], python)
    assert ids[:2] == ["Uid: 65534 65534 65534 65534", "Gid: 65534 65534 65534 65534"]
    assert ids[3] == "CapEff: 0000000000000000"


def test_python_outside_every_bind_is_refused() -> None:
    with pytest.raises(ValueError, match=r"outside every path the sandbox binds \(/usr"):
        bwrap.command("/opt/elsewhere/bin/python", CAP)


def test_a_runtime_under_tmp_is_bound_over_the_private_tmp(monkeypatch) -> None:
    """A checkout or venv under /tmp (CI clones there) must stay visible inside."""
    runtime = Path(tempfile.mkdtemp(prefix="wfd-runtime-", dir="/tmp"))
    roots = bwrap.runtime_roots
    monkeypatch.setattr(bwrap, "runtime_roots", lambda python: [*roots(python), runtime])
    try:
        (runtime / "marker.txt").write_text("runtime file")
        runtime.chmod(0o755)
        code = (f"import os\nprint(open({str(runtime / 'marker.txt')!r}).read())\n"
                "print(oct(os.stat('/tmp').st_mode & 0o7777))\n"
                "open('/tmp/scratch', 'w').write('x')\n")
        out = subprocess.run(
            [*bwrap.command(sys.executable, CAP), sys.executable, "-I", "-c", code],
            capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["runtime", "file", "0o1777"]
    finally:
        shutil.rmtree(runtime)
