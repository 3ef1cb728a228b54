"""Workflow environments (SPEC 10): resolved with uv, built once, shared, pruned.

An environment is a virtual environment under `<data_dir>/envs/<hash>/`,
the hash being that of its interpreter's version and its exact pins, so
every workflow that resolves to the same packages shares one. uv resolves
the declared requirements to exact pins at deploy (`uv pip compile`), then
makes the venv and installs the pins (`uv venv`, `uv pip install
--no-deps`), with one package cache for all builds (`envs/.cache`), which
makes a second build of similar sets fast.

A build runs code from the package index (build scripts), so it runs like
an execution: under bubblewrap as the sandbox uid, with the network, and
able to write only the new environment and the cache (at /wfd/build and
/wfd/cache: it sees nothing else of the data directory). The environment
never holds wfd's own packages: the child side (`sandbox`, standard
library only) is copied into it (`wfd-sandbox/`, refreshed when its
executor starts so it follows upgrades of wfd), found through a relative `.pth` file, so the
environment works wherever it is mounted (/wfd/env in the sandbox).
"""

import asyncio
import compileall
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uv
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from wfd import logs
from wfd.isolation import bwrap
from wfd.isolation.layers import Isolation
from wfd.requirements import Requirements

BUILD_TIMEOUT_S = 900.0
# A resolution this recent is reused for the same requirements and interpreter
# (a redeploy, a second workflow): as long as the index's own pages are cached.
RESOLUTION_REUSE_S = 600.0
BUILD_TMP_BYTES = 1 << 30
META = "wfd-env.json"
SANDBOX_LINK = "wfd-sandbox.pth"
SANDBOX_COPY = "wfd-sandbox"
INTERPRETER = re.compile(r"python3\.\d+")
# The daemon's own settings for reaching the package index, passed to uv.
PASSED_THROUGH = ("UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX",
                  "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                  "no_proxy")
Progress = Callable[[str], None]


class BuildError(Exception):
    """Resolution or installation failed; the message is the installer's."""


@dataclass(frozen=True)
class Interpreter:
    """A Python found on the host that environments can be built on."""

    path: str
    version: str

    @property
    def minor(self) -> str:
        return ".".join(self.version.split(".")[:2])


@dataclass(frozen=True)
class Environment:
    """A built environment, as an execution needs it."""

    digest: str
    path: Path

    @property
    def python(self) -> str:
        return str(self.path / "bin" / "python")


def environment_hash(python_version: str, pins: str) -> str:
    """The identity of an environment: interpreter version and exact pins."""
    text = f"cpython-{python_version}\n{pins.strip()}\n"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def find_interpreters() -> list[Interpreter]:
    """Our own interpreter first, then every `python3.N` in /usr/bin and /usr/local/bin."""
    candidates = [getattr(sys, "_base_executable", sys.executable)]
    for directory in ("/usr/bin", "/usr/local/bin"):
        with contextlib.suppress(OSError):
            candidates += sorted(str(Path(directory) / name) for name in os.listdir(directory)
                                 if INTERPRETER.fullmatch(name))
    found: dict[str, Interpreter] = {}
    for path in candidates:
        real = os.path.realpath(path)
        if real in found or not os.access(real, os.X_OK):
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            version = subprocess.run(
                [real, "-I", "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
            found[real] = Interpreter(real, version)
    return list(found.values())


class Environments:
    """The environments of one data directory: pick an interpreter, resolve, build, list."""

    def __init__(self, root: Path, isolation: Isolation, cache: Path | None = None) -> None:
        self.root = root
        self.cache = cache or root / ".cache"
        self.isolation = isolation
        self.uv = uv.find_uv_bin()
        self.interpreters: list[Interpreter] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._resolved: dict[tuple[tuple[str, ...], str], tuple[float, str]] = {}

    def start(self) -> None:
        """Make the directories (blocking, cheap: the daemon's start-up waits for it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        self._own(self.cache)

    async def _discovered(self) -> list[Interpreter]:
        """The host's interpreters, looked for once, when the first build needs them."""
        if not self.interpreters:
            self.interpreters = await asyncio.to_thread(find_interpreters)
        return self.interpreters

    def refresh(self, environment: Environment) -> None:
        """Bring the environment's copy of `sandbox` up to this wfd's (blocking)."""
        _install_sandbox(environment.path)

    def interpreter(self, requires_python: str | None) -> Interpreter:
        """The interpreter for `requires-python`: ours if it fits, else the newest that does."""
        if not self.interpreters:
            raise BuildError("no Python interpreter was found on this host")
        if requires_python is None:
            return self.interpreters[0]
        try:
            spec = SpecifierSet(requires_python)
        except InvalidSpecifier:
            raise BuildError(f"requires-python {requires_python!r} is not a version "
                             "specifier (e.g. \">=3.11\")") from None
        fitting = [i for i in self.interpreters if spec.contains(i.version)]
        if not fitting:
            available = ", ".join(f"{i.version} ({i.path})" for i in self.interpreters)
            raise BuildError(f"no interpreter on this host satisfies requires-python "
                             f"{requires_python!r}; available: {available}")
        ours = self.interpreters[0]
        return ours if ours in fitting else max(
            fitting, key=lambda i: tuple(map(int, i.version.split("."))))

    def interpreter_of(self, environment: Environment) -> str | None:
        """The host interpreter the environment was made from (its prefix is bound)."""
        with contextlib.suppress(OSError, ValueError, KeyError):
            return str(json.loads((environment.path / META).read_text())["interpreter"])
        return None

    def get(self, digest: str) -> Environment | None:
        path = self.root / digest
        return Environment(digest, path) if (path / META).exists() else None

    # -- deploy: resolve, then build -------------------------------------------

    async def prepare(self, requirements: Requirements, progress: Progress) -> dict[str, str]:
        """Resolve and build (or reuse); what the version stores: hash, python, pins."""
        await self._discovered()
        interpreter = self.interpreter(requirements.requires_python)
        names = ", ".join(requirements.dependencies)
        key = (requirements.dependencies, interpreter.path)
        started = time.monotonic()
        when, pins = self._resolved.get(key, (0.0, ""))
        if started - when < RESOLUTION_REUSE_S:
            progress(f"resolved {names} for Python {interpreter.version} "
                     f"{started - when:.0f} s ago: same pins")
        else:
            progress(f"resolving {names} for Python {interpreter.version}")
            pins = await self._resolve(requirements.dependencies, interpreter)
            self._resolved[key] = (time.monotonic(), pins)
            count = len([line for line in pins.splitlines() if line.strip()])
            progress(f"resolved {count} package(s) in {time.monotonic() - started:.1f} s")
        built = await self.ensure(interpreter.version, pins, progress)
        return {"hash": built.digest, "python": interpreter.version, "pins": pins}

    async def ensure(self, python_version: str, pins: str,
                     progress: Progress | None = None) -> Environment:
        """The environment of these pins, built now if it is not there (import, rollback)."""
        digest = environment_hash(python_version, pins)
        say = progress or (lambda _: None)
        async with self._locks.setdefault(digest, asyncio.Lock()):
            existing = self.get(digest)
            if existing is not None:
                say(f"reusing environment {digest}")
                return existing
            interpreter = next((i for i in await self._discovered()
                                if i.version == python_version), None)
            if interpreter is None:
                raise BuildError(f"Python {python_version} is not on this host any more")
            say(f"building environment {digest}")
            started = time.monotonic()
            await self._build(digest, interpreter, pins)
            say(f"built environment {digest} in {time.monotonic() - started:.1f} s")
            logs.event("environment-built", hash=digest, python=python_version,
                       seconds=round(time.monotonic() - started, 1))
            return Environment(digest, self.root / digest)

    async def _resolve(self, dependencies: tuple[str, ...], interpreter: Interpreter) -> str:
        return await self._uv(["pip", "compile", "-", "--python", interpreter.path,
                               "--no-header", "--no-annotate", "--quiet"],
                              {bwrap.CACHE_DIR: self.cache}, interpreter.path,
                              stdin="\n".join(dependencies) + "\n")

    def _inside(self, inside: str, host: Path) -> str:
        """A path as the (sandboxed) build sees it."""
        return inside if self.isolation.sandboxed else str(host)

    async def _build(self, digest: str, interpreter: Interpreter, pins: str) -> None:
        """Build into `<hash>.build`, then rename: a half-built environment is never used."""
        building = self.root / f"{digest}.build"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir()
        self._own(building)
        (building / "wfd-pins.txt").write_text(pins)
        seen = self._inside(bwrap.BUILD_DIR, building)
        writable = {bwrap.BUILD_DIR: building, bwrap.CACHE_DIR: self.cache}
        try:
            await self._uv(["venv", seen, "--python", interpreter.path, "--relocatable",
                            "--allow-existing", "--quiet"], writable, interpreter.path)
            # Bytecode now: the environment is read-only for every execution.
            await self._uv(["pip", "install", "--python", f"{seen}/bin/python", "--no-deps",
                            "--compile-bytecode", "--quiet", "-r", f"{seen}/wfd-pins.txt"],
                           writable,
                           interpreter.path)
            _install_sandbox(building)
            (building / META).write_text(json.dumps({
                "hash": digest, "python": interpreter.version, "interpreter": interpreter.path,
                "pins": pins, "created_at": time.time()}))
            target = self.root / digest
            shutil.rmtree(target, ignore_errors=True)
            building.rename(target)
        finally:
            shutil.rmtree(building, ignore_errors=True)

    def _own(self, path: Path) -> None:
        """As root, the sandbox uid builds: it must own what it writes."""
        if os.geteuid() == 0 and self.isolation.sandboxed:
            os.chown(path, bwrap.SANDBOX_UID, bwrap.SANDBOX_UID)

    async def _uv(self, args: list[str], writable: dict[str, Path], python: str,
                  stdin: str | None = None) -> str:
        """Run uv, sandboxed like an execution; its stdout, or BuildError with its stderr."""
        cache = self._inside(bwrap.CACHE_DIR, self.cache)
        variables = [f"UV_CACHE_DIR={cache}", "UV_PYTHON_DOWNLOADS=never",
                     "UV_NO_CONFIG=1", "UV_NO_PROGRESS=1", "UV_NATIVE_TLS=1", "HOME=/tmp",
                     *(f"{key}={os.environ[key]}" for key in PASSED_THROUGH
                       if key in os.environ)]
        tool = Path(self.uv)
        if self.isolation.sandboxed:
            command = [*bwrap.command(python, BUILD_TMP_BYTES, writable=writable,
                                      read_only={bwrap.TOOLS_DIR: tool.parent}),
                       "/usr/bin/env", *variables, f"{bwrap.TOOLS_DIR}/{tool.name}", *args]
        else:
            command = ["/usr/bin/env", *variables, str(tool), *args]
        process = await asyncio.create_subprocess_exec(
            *command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        try:
            out, err = await asyncio.wait_for(
                process.communicate((stdin or "").encode()), BUILD_TIMEOUT_S)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            raise
        if process.returncode != 0:
            message = err.decode(errors="replace").strip() or f"uv exited {process.returncode}"
            raise BuildError(message[-4000:])
        return out.decode()

    # -- listing and pruning -----------------------------------------------------

    def listing(self) -> list[dict[str, Any]]:
        """Every built environment with its packages and size on disk (blocking)."""
        out = []
        for meta in sorted(self.root.glob(f"*/{META}")):
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(meta.read_text())
                pins = [line for line in data["pins"].splitlines() if line.strip()]
                out.append({"hash": data["hash"], "python": data["python"],
                            "packages": pins, "size_mb": round(_size(meta.parent) / 2**20, 1),
                            "created_at": data["created_at"],
                            "unreferenced_since": data.get("unreferenced_since")})
        return out

    def prune(self, referenced: set[str], keep_s: float) -> list[str]:
        """Remove environments no version uses and none has used for `keep_s` (blocking).

        The first time an environment is seen unreferenced is written in its
        metadata, so the delay survives restarts.
        """
        removed = []
        now = time.time()
        for meta in self.root.glob(f"*/{META}"):
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(meta.read_text())
                if data["hash"] in referenced:
                    if data.get("unreferenced_since") is not None:
                        data["unreferenced_since"] = None
                        meta.write_text(json.dumps(data))
                    continue
                since = data.get("unreferenced_since")
                if since is None:
                    data["unreferenced_since"] = since = now
                    meta.write_text(json.dumps(data))
                if now - since >= keep_s:
                    shutil.rmtree(meta.parent, ignore_errors=True)
                    removed.append(data["hash"])
        return removed


def _install_sandbox(environment: Path) -> None:
    """Copy the `sandbox` package into an environment, and point its site-packages at it.

    The daemon never imports `sandbox`; it only copies its files. The `.pth`
    path is relative to site-packages, so it holds wherever the environment
    is mounted.
    """
    spec = importlib.util.find_spec("sandbox")
    if spec is None or not spec.submodule_search_locations:
        raise OSError("the sandbox package is not installed beside wfd")
    source = Path(next(iter(spec.submodule_search_locations)))
    stamp = json.dumps(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                              for p in source.glob("*.py")))
    with contextlib.suppress(OSError):
        if (environment / SANDBOX_COPY / ".stamp").read_text() == stamp:
            return  # already this wfd's
    fresh = environment / f"{SANDBOX_COPY}.new"
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.copytree(source, fresh / "sandbox",
                    ignore=shutil.ignore_patterns("__pycache__", "*.md"))
    compileall.compile_dir(fresh, quiet=1)
    (fresh / ".stamp").write_text(stamp)
    shutil.rmtree(environment / SANDBOX_COPY, ignore_errors=True)
    fresh.rename(environment / SANDBOX_COPY)
    for site in environment.glob("lib/python*/site-packages"):
        (site / SANDBOX_LINK).write_text(f"../../../{SANDBOX_COPY}\n")


def _size(path: Path) -> int:
    """Bytes on disk, each inode once (uv hard-links files from its cache)."""
    seen: set[int] = set()
    total = 0
    for top, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                stat = os.lstat(os.path.join(top, name))
                if stat.st_ino not in seen:
                    seen.add(stat.st_ino)
                    total += stat.st_blocks * 512
    return total


async def prune_environments(store: Any, environments: Environments, keep_s: float) -> list[str]:
    """Remove the environments no current version has used for `keep_s` seconds."""
    used = set(await store.environments_in_use())
    removed = await asyncio.to_thread(environments.prune, used, keep_s)
    if removed:
        logs.event("environments-pruned", removed=removed)
    return removed
