"""Build the bubblewrap (bwrap) command line that isolates one execution, and probe for it.

The sandbox sees a read-only /usr, the Python runtime and the sandbox package,
the few /etc files DNS and TLS need, its own /proc, a minimal /dev and a
size-capped private tmpfs as /tmp and working directory.  The daemon's data
directory, config and socket are simply not mounted.  With the network layer
bwrap also makes a network namespace (`--unshare-net`), reports its child's
pid on an info fd, and (cold spawn) waits on a block fd until the daemon has
given that namespace its network (network.py).

Identity.  When the daemon is not root, bwrap makes a user namespace and maps
uid 65534 inside to the daemon's own (unprivileged) uid.  When the daemon runs
as root that mapping would be a disguise: "65534" inside is kernel uid 0
outside, which we measured could still write /proc/sys (e.g. vm/drop_caches)
and would pass SO_PEERCRED checks as root.  So as root bwrap keeps root only to
build the mounts, without a user namespace, and `setpriv` inside the sandbox
switches to the real kernel uid 65534 with no capabilities and no_new_privs
before Python starts.  Either way the code runs as a real unprivileged uid.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SANDBOX_UID = 65534  # "nobody" on Debian; never owns anything the daemon cares about
WORKDIR = "/tmp"
# Where an execution finds its workflow's persistent directory ($WFD_WORKFLOW_DIR):
# the same path in every execution of every workflow, each seeing its own.
WORKFLOW_DIR = "/wfd/workflow"
# Where the zygote sees every workflow's directory; each execution binds its
# own onto WORKFLOW_DIR, then covers this one (sandbox/isolate.py).
ZYGOTE_FILES = "/wfd/files"
# Where a workflow environment is (read-only) when an execution runs in one,
# and where a build sees the environment it makes and uv's cache.
ENV_DIR = "/wfd/env"
BUILD_DIR = "/wfd/build"
CACHE_DIR = "/wfd/cache"
TOOLS_DIR = "/wfd/tools"
ETC_FILES = (
    "resolv.conf",
    "hosts",
    "nsswitch.conf",
    "host.conf",
    "gai.conf",
    "ld.so.cache",
    "localtime",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
)
USR_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
PROBE_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class NetOptions:
    """The network namespace's part of a bwrap command line (network.py gives it its network).

    `info_fd` is where bwrap writes its child's pid; with `block_fd` the
    sandboxed program starts only once something is written there.
    """

    info_fd: int
    block_fd: int | None = None
    resolv_conf: str = "/etc/resolv.conf"

    def args(self) -> list[str]:
        args = ["--unshare-net", "--info-fd", str(self.info_fd)]
        if self.block_fd is not None:
            args += ["--block-fd", str(self.block_fd)]
        return args


@dataclass(frozen=True)
class BwrapSupport:
    """Whether strict isolation can run here, and if not, why (for logs and /healthz)."""

    available: bool
    version: str | None
    mode: str  # "setpriv" (daemon is root) or "userns" (daemon is unprivileged)
    reason: str | None = None


def _prefixes() -> list[Path]:
    return sorted({Path(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})


def _within(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def runtime_roots(python: str) -> list[Path]:
    """Directories to bind read-only so `python -I -m sandbox` works inside.

    Our own interpreter's prefixes (venv and its base) when `python` is ours,
    and the sandbox package; /usr is bound anyway.  Nested paths are dropped
    so each tree is mounted once.
    """
    exe = Path(python)
    candidates: list[Path] = []
    prefixes = _prefixes()
    if _within(exe, prefixes) or _within(exe.resolve(), prefixes):
        candidates += prefixes
    spec = importlib.util.find_spec("sandbox")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    roots: list[Path] = []
    for path in sorted({c.resolve() for c in candidates}, key=lambda p: len(p.parts)):
        if not _within(path, [Path("/usr"), *roots]):
            roots.append(path)
    if not _within(exe.resolve(), [Path("/usr"), *roots]):
        bound = ", ".join(str(p) for p in [Path("/usr"), *roots])
        raise ValueError(f"{python} is outside every path the sandbox binds ({bound}): run wfd "
                         "with the Python it is installed in, or one under /usr")
    return roots


def _system_view(resolv_conf: str = "/etc/resolv.conf") -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for name in USR_LINKS:
        host = Path("/") / name
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            args += ["--ro-bind", str(host), str(host)]
    # Else made 0700 (when resolv.conf is elsewhere), and the sandbox uid could
    # then resolve no name.
    args += ["--perms", "0755", "--dir", "/etc"]
    for name in ETC_FILES:
        source = resolv_conf if name == "resolv.conf" else f"/etc/{name}"
        args += ["--ro-bind-try", source, f"/etc/{name}"]
    return args


def _bind_runtime(roots: list[Path]) -> list[str]:
    """Bind each root at its own path; bwrap would create missing parents 0700."""
    args: list[str] = []
    made: set[Path] = set()
    for root in roots:
        for parent in reversed(root.parents[:-1]):
            if parent not in made:
                made.add(parent)
                args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", str(root), str(root)]
    return args


def _private_dirs(size_bytes: int) -> list[str]:
    size = str(size_bytes)
    return [
        "--proc", "/proc",
        "--dev", "/dev",
        "--perms", "1777", "--size", size, "--tmpfs", "/dev/shm",
        "--perms", "1777", "--size", size, "--tmpfs", WORKDIR,
        "--chdir", WORKDIR,
    ]  # fmt: skip


def _environment(roots: list[Path]) -> list[str]:
    path = ":".join([*(str(r / "bin") for r in roots if (r / "bin").is_dir()), "/usr/bin", "/bin"])
    env = {"PATH": path, "HOME": WORKDIR, "TMPDIR": WORKDIR, "LANG": "C.UTF-8"}
    args = ["--clearenv"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    return args


def _identity(uid: int, privileged: bool) -> list[str]:
    if not privileged:
        return ["--unshare-user", "--uid", str(uid), "--gid", str(uid), "--cap-drop", "ALL", "--"]
    setpriv = shutil.which("setpriv")
    if setpriv is None or not setpriv.startswith("/usr/"):
        raise FileNotFoundError("setpriv (util-linux) must be installed under /usr")
    return [
        "--", setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
        "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--",
    ]  # fmt: skip


def _bind_files(source: Path, target: str) -> list[str]:
    """A writable bind of a host directory; its parent made crossable first."""
    return ["--perms", "0755", "--dir", str(Path(target).parent), "--bind", str(source), target]


def _bind_environment(environment: Path | None) -> list[str]:
    if environment is None:
        return []
    return ["--perms", "0755", "--dir", str(Path(ENV_DIR).parent),
            "--ro-bind", str(environment), ENV_DIR]


def command(
    python: str,
    workdir_size_bytes: int,
    *,
    uid: int = SANDBOX_UID,
    privileged: bool | None = None,
    files: Path | None = None,
    writable: dict[str, Path] | None = None,
    read_only: dict[str, Path] | None = None,
    environment: Path | None = None,
    net: NetOptions | None = None,
) -> list[str]:
    """Argv prefix; append `[python, "-I", "-m", "sandbox"]` (or any command) to it.

    `privileged` defaults to "the daemon is root" and selects how the
    unprivileged identity is obtained (see the module docstring). `files`,
    the workflow's persistent directory on the host, appears at WORKFLOW_DIR;
    `writable` maps paths inside to host directories (an environment being
    built, uv's cache), `read_only` likewise (uv's own directory, for a
    build); `environment`, a workflow environment, is read-only
    at ENV_DIR (never at its host path, which is inside the data directory);
    `net` adds a network namespace.
    """
    if privileged is None:
        privileged = os.geteuid() == 0
    roots = runtime_roots(python)
    return [
        shutil.which("bwrap") or "bwrap",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        *(net.args() if net else []),
        "--new-session", "--die-with-parent",
        *_environment(roots),
        *_system_view(*([net.resolv_conf] if net else [])),
        # The private dirs first: a runtime under /tmp (a checkout or venv
        # there) must be bound over the sandbox's /tmp, not hidden under it.
        *_private_dirs(workdir_size_bytes),
        *_bind_runtime(roots),
        *(_bind_files(files, WORKFLOW_DIR) if files else []),
        *[arg for inside, host in (writable or {}).items()
          for arg in _bind_files(host, inside)],
        *[arg for inside, host in (read_only or {}).items()
          for arg in ["--perms", "0755", "--dir", str(Path(inside).parent),
                      "--ro-bind", str(host), inside]],
        *_bind_environment(environment),
        *_identity(uid, privileged),
    ]  # fmt: skip


# As root, bwrap's own /proc covers /proc/sys and others with read-only binds
# that become locked in a less privileged user namespace, where the kernel then
# refuses any new /proc mount (an execution needs one for its PID namespace).
# So the zygote's /proc is mounted plain, by root, just before setpriv.
_MOUNT_PROC_SH = 'mount -t proc -o nosuid,nodev,noexec proc /proc && exec "$@"'
ZYGOTE_SCRATCH_BYTES = 1 << 20


def zygote_command(python: str, *, uid: int = SANDBOX_UID, privileged: bool | None = None,
                   files_root: Path | None = None, environment: Path | None = None,
                   net: NetOptions | None = None) -> list[str]:
    """Argv prefix for the zygote: the same view as an execution's, but shared, so read-only.

    The zygote and every execution forked from it see this one bwrap's
    filesystem: its root and /dev are remounted read-only (unprivileged, bwrap
    creates them owned by the sandbox uid), and each execution mounts its
    own /tmp, /dev/shm and /proc over the zygote's (sandbox/isolate.py). The
    zygote runs as uid 65534 without capabilities, exactly like an execution
    of the spawn path; it builds each execution's namespaces through an
    unprivileged user namespace of the execution's own. `files_root`, every
    workflow's persistent directory, is at ZYGOTE_FILES, with WORKFLOW_DIR
    ready as each execution's mount point. With `net`, the zygote and its
    children share one network namespace.
    """
    if privileged is None:
        privileged = os.geteuid() == 0
    roots = runtime_roots(python)
    size = str(ZYGOTE_SCRATCH_BYTES)
    if privileged:
        proc = ["--dir", "/proc"]
        launch = ["--", "/bin/sh", "-c", _MOUNT_PROC_SH, "wfd-zygote-proc",
                  *_identity(uid, privileged)[1:]]
    else:
        proc = ["--proc", "/proc"]
        launch = _identity(uid, privileged)
    return [
        shutil.which("bwrap") or "bwrap",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        *(net.args() if net else []),
        "--new-session", "--die-with-parent",
        *_environment(roots),
        *_system_view(*([net.resolv_conf] if net else [])),
        *proc, "--dev", "/dev",
        "--perms", "1777", "--size", size, "--tmpfs", "/dev/shm",
        "--perms", "1777", "--size", size, "--tmpfs", WORKDIR,
        *_bind_runtime(roots),  # after /tmp: see command()
        *([*_bind_files(files_root, ZYGOTE_FILES), "--dir", WORKFLOW_DIR]
          if files_root else []),
        *_bind_environment(environment),
        "--chdir", WORKDIR,
        "--remount-ro", "/dev", "--remount-ro", "/",
        *launch,
    ]  # fmt: skip


def probe(python: str = sys.executable) -> BwrapSupport:
    """Run `python -I -c pass` in the real sandbox once: PATH, namespaces and file access."""
    mode = "setpriv" if os.geteuid() == 0 else "userns"
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return BwrapSupport(False, None, mode, "bwrap not on PATH (Debian package bubblewrap)")
    version = subprocess.run([bwrap, "--version"], capture_output=True, text=True).stdout.strip()
    try:
        argv = [*command(python, 1 << 20), python, "-I", "-c", "pass"]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        return BwrapSupport(False, version, mode, f"sandbox probe failed: {e}")
    if run.returncode != 0:
        detail = run.stderr.strip().splitlines()[-1:] or [f"exit {run.returncode}"]
        return BwrapSupport(False, version, mode, f"sandbox probe failed: {detail[0]}")
    return BwrapSupport(True, version, mode)
