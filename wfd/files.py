"""Each workflow's persistent directory (SPEC 10, `$WFD_WORKFLOW_DIR`), and its bound.

Where it lives: `<data_dir>/files/<name>/`. When the daemon is root, that
directory is the mount point of a file-backed ext4 image
(`<data_dir>/files/<name>.img`, sparse, `[limits] files_mb` large, made by
`mkfs.ext4` at first use), mounted through a loop device. The image is the
bound: a write past it fails in the workflow with `OSError(ENOSPC)`, and
nothing one workflow writes can fill the host's disk or another workflow's
space. The image is a plain file, so the directory persists across versions
and restarts with nothing more to do.

The mounts live in a mount namespace of the daemon's own (`private_mounts`,
called once at start-up, before any thread exists): no other process on the
host sees them, and when the daemon ends, `kill -9` included, the kernel
drops them and frees their loop devices. The `files/` directory is made a
shared mount inside it, so a workflow's image mounted later still reaches
the zygote's sandbox, which binds `files/` once (docs/isolation.md).

A daemon that is not root cannot mount: its workflows get plain
directories, bounded per file only (`RLIMIT_FSIZE`), and `wfd ctl status`
says so.
"""

import asyncio
import base64
import contextlib
import ctypes
import io
import logging
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from wfd import logs
from wfd.isolation.bwrap import SANDBOX_UID

CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_SLAVE, MS_SHARED = 0x1000, 0x4000, 0x80000, 0x100000
MIB = 1024 * 1024
TOOL_TIMEOUT_S = 60.0
PROBE_MB = 2
TOOLS = ("mkfs.ext4", "mount", "umount")
# mkfs.ext4 is in /usr/sbin, which a daemon's PATH may lack.
TOOL_PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin:/usr/bin:/bin"


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=TOOL_PATH)


class FilesError(Exception):
    """A workflow's directory could not be made ready; the message says why."""


def _libc_call(name: str, *args: object) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def private_mounts(root: Path) -> bool:
    """As root: a mount namespace of the daemon's own, with `root` shared inside it.

    Must run before any thread starts (unshare(CLONE_NEWNS) refuses a
    process whose threads share its filesystem context). Returns whether
    images can be mounted (False when not root, or when the host refuses).
    """
    if os.geteuid() != 0:
        return False
    missing = [tool for tool in TOOLS if _which(tool) is None]
    if missing:
        logs.event("workflow-files-unbounded", level=logging.WARNING,
                   reason=f"{', '.join(missing)} not found (Debian: e2fsprogs, mount)")
        return False
    try:
        root.mkdir(parents=True, exist_ok=True)
        _libc_call("unshare", CLONE_NEWNS)
        # Mounts made here stay here; the host's new mounts still arrive.
        _libc_call("mount", b"none", b"/", None, ctypes.c_ulong(MS_REC | MS_SLAVE), None)
        path = str(root).encode()
        _libc_call("mount", path, path, None, ctypes.c_ulong(MS_BIND), None)
        _libc_call("mount", b"none", path, None, ctypes.c_ulong(MS_SHARED), None)
    except OSError as exc:
        logs.event("workflow-files-unbounded", level=logging.WARNING,
                   reason=f"cannot make a private mount namespace: {exc}")
        return False
    try:
        _probe(root)
    except (FilesError, OSError) as exc:  # say, a container without loop devices
        logs.event("workflow-files-unbounded", level=logging.WARNING,
                   reason=f"cannot mount an image here: {exc}")
        return False
    return True


def _probe(root: Path) -> None:
    """Make, mount and remove one small image, so that a host that cannot is known now."""
    image, target = root / ".probe.img", root / ".probe"
    try:
        with image.open("wb") as handle:
            handle.truncate(PROBE_MB * MIB)
        target.mkdir(exist_ok=True)
        _tool("mkfs.ext4", "-q", "-F", str(image))
        _tool("mount", "-o", "loop", str(image), str(target))
        _tool("umount", str(target))
    finally:
        image.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            target.rmdir()


class WorkflowFiles:
    """Makes, mounts, archives and removes the workflows' persistent directories."""

    def __init__(self, root: Path, images: bool) -> None:
        self.root = root
        # Made now, not with the first workflow's directory: every zygote's
        # sandbox binds the root when it starts, and bwrap refuses a missing source.
        root.mkdir(parents=True, exist_ok=True)
        self.images = images
        self._ready: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    def path(self, name: str) -> Path:
        return self.root / name

    def describe(self) -> str:
        """The bound as `wfd ctl status` states it."""
        if self.images:
            return f"per-workflow ext4 image under {self.root}, [limits] files_mb each"
        return (f"plain directories under {self.root}, bounded per file only "
                "(the daemon is not root, so it cannot mount size-capped images)")

    async def ensure(self, name: str, size_mb: int) -> Path:
        """The workflow's directory, made (and mounted) on first use since start-up."""
        if name in self._ready:
            return self.path(name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            if name not in self._ready:
                await asyncio.to_thread(self._prepare, name, size_mb)
                self._ready.add(name)
        return self.path(name)

    def _prepare(self, name: str, size_mb: int) -> None:
        target = self.path(name)
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.images:
            if os.geteuid() == 0:  # root without images: the sandbox uid must own it
                os.chown(target, SANDBOX_UID, SANDBOX_UID)
            return
        image = self.root / f"{name}.img"
        if not image.exists():
            partial = image.with_suffix(".img.new")
            with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                      "wb") as handle:
                handle.truncate(size_mb * MIB)
            # No blocks reserved for root; the root directory owned by the
            # sandbox uid, so executions (and only they) can write in it.
            _tool("mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                  f"root_owner={SANDBOX_UID}:{SANDBOX_UID}", str(partial))
            partial.rename(image)
        if not os.path.ismount(target):
            _tool("mount", "-o", "loop,nosuid,nodev,noexec", str(image), str(target))
            with contextlib.suppress(OSError):  # mkfs's, empty: not the workflow's business
                (target / "lost+found").rmdir()
        os.chmod(target, 0o700)

    async def remove(self, name: str) -> None:
        """Delete a workflow's directory and image (`wfd ctl delete`)."""
        self._ready.discard(name)
        await asyncio.to_thread(self._remove, name)

    def _remove(self, name: str) -> None:
        target = self.path(name)
        if self.images and os.path.ismount(target):
            # Lazy: an execution still running keeps its files until it ends.
            _tool("umount", "--lazy", str(target))
        shutil.rmtree(target, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.root / f"{name}.img").unlink()

    async def archive(self, name: str, size_mb: int) -> str | None:
        """The directory's content as a base64 tar.gz (None when empty), for export."""
        path = await self.ensure(name, size_mb)
        return await asyncio.to_thread(_archive, path)

    async def restore(self, name: str, size_mb: int, data: str) -> None:
        """Unpack an export's archive into the workflow's (new) directory."""
        path = await self.ensure(name, size_mb)
        await asyncio.to_thread(_restore, path, data, self.images)


def _tool(name: str, *args: str) -> None:
    path = _which(name)
    if path is None:
        raise FilesError(f"{name} is not installed (Debian: e2fsprogs, mount)")
    argv = [path, *args]
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True,
                       timeout=TOOL_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        stderr = getattr(exc, "stderr", None) or ""
        detail = stderr.strip().splitlines()[-1:] or [str(exc)]
        raise FilesError(f"{name} failed: {detail[0]}") from None


def _archive(path: Path) -> str | None:
    entries = sorted(p for p in path.rglob("*") if p.name != "lost+found"
                     and "lost+found" not in p.relative_to(path).parts)
    if not entries:
        return None
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for entry in entries:
            info = tar.gettarinfo(str(entry), str(entry.relative_to(path)))
            if not (info.isfile() or info.isdir()):
                continue  # links and devices are not workflow data
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if info.isfile():
                with entry.open("rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)
    return base64.b64encode(buffer.getvalue()).decode()


def _restore(path: Path, data: str, images: bool) -> None:
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(data)), mode="r:gz") as tar:
        tar.extractall(path, filter="data")
    if images:  # the sandbox uid owns what its executions will change
        for entry in [path, *path.rglob("*")]:
            if entry.name != "lost+found":
                os.lchown(entry, SANDBOX_UID, SANDBOX_UID)
