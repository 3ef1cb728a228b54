"""Which sandbox layers this host gives an execution, and how to start one inside them.

Detected once, at start-up and before the event loop starts any thread: the
bwrap probe runs a real sandboxed interpreter, and cgroup detection may move
the daemon into a leaf (v2), which must happen before aiosqlite's threads
exist. After that an `Isolation` only builds argv and per-execution cgroups.

Each layer degrades on its own: no bwrap means no namespaces, identity or
filesystem view (refused in "strict"); no writable cgroup tree means rlimits
only (refused in "strict" unless `[isolation] require_cgroups = false`).
`layers()` says which are active, for `wfd ctl status` and /healthz.
"""

import contextlib
import logging
import secrets
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from sandbox import protocol
from wfd import logs
from wfd.config import MIB, Limits
from wfd.isolation import bwrap, cgroups, network

# One CPU per execution: a workflow spinning threads on every core would
# otherwise delay every other workflow (SPEC 5), which RLIMIT_CPU cannot stop.
CPU_QUOTA = 1.0
# A cgroup's memory cap in bytes and its pids.max (`Isolation.cgroup_limits`).
GroupLimits = tuple[int, int]
# A blank group's limits before any execution has asked for its own: it holds
# one waiting spare (sandbox/spare.py), which uses a few MiB.
SPARE_LIMITS: GroupLimits = (64 * MIB, 1)


class IsolationError(Exception):
    """The configured isolation cannot be had on this host; the message says what to do."""


@dataclass(frozen=True)
class Layer:
    """One layer as the operator sees it: on or off, and what that means here."""

    active: bool
    detail: str


def strict_advice(reason: str | None) -> str:
    """The start-up error of strict mode: what is missing and the three ways out."""
    return (
        f'isolation = "strict" needs bubblewrap and namespaces, and this host cannot run '
        f"them: {reason}. Install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; "
        "setpriv comes with util-linux). For a daemon that is not root, also allow user "
        "namespaces (sysctl user.max_user_namespaces > 0; under systemd, RestrictNamespaces= "
        'must allow user mnt pid ipc uts). Or set isolation = "best-effort" to run with the '
        'layers this host has, or "none" for rlimits only.'
    )


def network_advice(reason: str | None) -> str:
    """The start-up error of strict mode when executions cannot have a network of their own."""
    return (f'isolation = "strict" gives each execution a network namespace of its own, and '
            f"this host cannot: {reason}. Install passt (Debian/Ubuntu: apt-get install "
            'passt iproute2), or set isolation = "best-effort" to run executions on the '
            "host's network.")


def cgroup_advice(reasons: list[str]) -> str:
    """The start-up error of strict mode without cgroups: why, how to get them, the opt-out."""
    return (
        'isolation = "strict" needs a cgroup per execution (memory and pids), and this '
        f"daemon has no writable cgroup tree: {'; '.join(reasons)}. Under systemd, install "
        "the wfd.service of this version (Delegate=yes, and on cgroup v1 its ExecStartPre "
        "hands wfd its groups: systemd/README.md). Outside systemd, run the daemon as root, "
        "or delegate to its user a cgroup v2 subtree with memory and pids (e.g. "
        "systemd-run -p Delegate=yes), or on cgroup v1 a `wfd` group it owns under its own "
        "group in the pids and memory hierarchies. Or opt out: [isolation] "
        "require_cgroups = false (wfd serve --no-require-cgroups) runs with rlimits only."
    )


FALLBACK = ("per-execution memory and process caps fall back to rlimits (RLIMIT_DATA per "
            "process, RLIMIT_NPROC shared by every execution's uid), and no group kill")


class Isolation:
    """The layers detected at start-up, and the per-execution plumbing they need."""

    def __init__(self, mode: str, python: str, support: bwrap.BwrapSupport | None,
                 backend: cgroups.CgroupBackend | None,
                 net: network.Network | None = None, net_missing: str | None = None) -> None:
        self.mode = mode
        self.python = python
        self.support = support
        self.backend = backend
        self.network = net if support is not None and support.available else None
        self.net_missing = net_missing
        # In a workflow environment (for_environment): its directory on the
        # host, and the host interpreter it was made from, whose prefix is bound.
        self.environment: Path | None = None
        self.interpreter = python

    def for_environment(self, environment: Path, interpreter: str) -> "Isolation":
        """The same layers around a workflow environment's interpreter.

        Under bwrap the environment is at bwrap.ENV_DIR, so the data
        directory it lives in is never part of the sandbox's view.
        """
        inside = Path(bwrap.ENV_DIR if self.sandboxed else environment) / "bin" / "python"
        around = Isolation(self.mode, str(inside), self.support, self.backend, self.network,
                           self.net_missing)
        around.environment, around.interpreter = environment, interpreter
        return around

    @classmethod
    def detect(cls, mode: str, python: str = sys.executable,
               resolv_conf: Path = Path("/etc/resolv.conf"),
               require_cgroups: bool = True) -> "Isolation":
        """Probe bwrap, pasta and cgroups (blocking; call before the loop starts threads)."""
        if mode == "none":
            return cls(mode, python, None, None)
        support = bwrap.probe(python)
        if not support.available:
            if mode == "strict":
                raise IsolationError(strict_advice(support.reason))
            logs.event("isolation-degraded", level=logging.ERROR, mode=mode,
                       off="namespaces, unprivileged identity, filesystem view",
                       reason=support.reason)
        net, net_missing = None, None
        if support.available:
            found = network.detect()
            if found.available:
                net = network.Network(found, resolv_conf)
            elif mode == "strict":
                raise IsolationError(network_advice(found.reason))
            else:
                net_missing = found.reason
                logs.event("isolation-degraded", level=logging.ERROR, mode=mode,
                           off="network namespace: executions share the HOST'S NETWORK "
                               "(its loopback, metadata service, private ranges)",
                           reason=found.reason)
        reasons: list[str] = []
        backend = _detect_cgroups(reasons)
        if backend is None:
            if mode == "strict" and require_cgroups:
                raise IsolationError(cgroup_advice(reasons))
            logs.event("isolation-layer-missing", level=logging.WARNING, layer="cgroup",
                       reason="; ".join(reasons), fallback=FALLBACK)
        return cls(mode, python, support, backend, net, net_missing)

    @property
    def sandboxed(self) -> bool:
        """Executions run under bwrap: namespaces, unprivileged uid, read-only view."""
        return self.support is not None and self.support.available

    def layers(self, executor: str = "spawn") -> dict[str, dict[str, object]]:
        """Each layer, active or not, with a line saying what it is or why it is off.

        The zygote's children have the same layers as a cold spawn, built
        differently (docs/isolation.md, "The zygote"); the details say how.
        """
        support = self.support
        missing = (support.reason or "unavailable") if support else 'isolation = "none"'
        sandbox = self.sandboxed
        mode = support.mode if support else None
        forked = executor == "zygote"
        version = support.version if support else None
        survivors = [name for name, on in (("pid namespace", sandbox),
                                           ("cgroup kill", self.backend is not None)) if on]
        namespaces = (f"{version}: pid, ipc, uts, mount"
                      + (", network" if self.network else "; network shared")
                      + "; none of its own (seccomp)"
                      + ("; per execution its own user, mount, pid and ipc namespaces "
                         "inside the zygote's" if forked else ""))
        filesystem = ("read-only /usr and Python runtime, private /tmp tmpfs; data dir, "
                      "config and socket absent"
                      + ("; per execution its own /tmp, /dev/shm and /proc" if forked else ""))
        layers = {
            "rlimits": Layer(True, "memory, CPU, file size, open files, processes, no core; "
                                   "PR_SET_PDEATHSIG, no_new_privs"),
            "namespaces": Layer(sandbox, namespaces if sandbox else missing),
            "identity": Layer(sandbox, f"uid {bwrap.SANDBOX_UID} via {mode}"
                              + (", zygote included; no capabilities" if forked else "")
                              if sandbox else missing),
            "filesystem": Layer(sandbox, filesystem if sandbox else missing),
            "network": Layer(self.network is not None,
                             self.network.describe() if self.network
                             else self.net_missing or missing),
            "cgroup": Layer(self.backend is not None, self._cgroup_detail()),
            "no_survivors": Layer(bool(survivors), " + ".join(survivors)
                                  or "process group kill only: setsid escapes it"),
        }
        return {name: asdict(layer) for name, layer in layers.items()}

    def _cgroup_detail(self) -> str:
        if self.backend is None:
            return "no writable cgroup v2 subtree nor v1 pids+memory: rlimits only"
        described = self.backend.describe()
        paths = described.get("paths") or {"": described.get("path")}
        where = paths.values() if isinstance(paths, dict) else [paths]
        return f"{described['cgroup']} at {', '.join(map(str, where))}"

    def cgroup_for(self, limits: Limits, execution_id: str) -> cgroups.ExecutionCgroup | None:
        """A fresh cgroup for one execution, or None where the host has none.

        The memory cap adds the /tmp tmpfs size: its pages are charged to the
        group, while RLIMIT_DATA already bounds each process's heap.
        """
        if self.backend is None:
            return None
        return self.backend.create(execution_id, *self.cgroup_limits(limits), CPU_QUOTA)

    def cgroup_limits(self, limits: Limits) -> GroupLimits:
        """The cgroup's memory cap in bytes and its pids.max, for an execution with `limits`.

        A zygote's spare is its execution's only process (sandbox/spare.py),
        so a group it joined before its job holds nothing above the workflow.
        """
        return (limits.memory_mb + limits.tmp_mb) * MIB, limits.processes

    def spare_cgroup(self, limits: GroupLimits | None = None) -> cgroups.ExecutionCgroup | None:
        """A group for a zygote's spare to join as it is forked, off any request's path.

        `limits` (`cgroup_limits`) are those the daemon expects its job to
        have; a job with others has its own written when it takes the spare.
        """
        if self.backend is None:
            return None
        return self.backend.create(f"spare-{secrets.token_hex(8)}", *(limits or SPARE_LIMITS),
                                   CPU_QUOTA)

    def argv(self, limits: Limits, cgroup: cgroups.ExecutionCgroup | None,
             files: Path | None = None, net: bwrap.NetOptions | None = None) -> list[str]:
        """The whole command line of one execution: cgroup join, bwrap, interpreter."""
        command = [self.python, "-I", "-m", protocol.CHILD_MODULE]
        if self.sandboxed:
            command = [*bwrap.command(self.interpreter, limits.tmp_mb * MIB, files=files,
                                      environment=self.environment, net=net), *command]
        return cgroup.join_argv(command) if cgroup else command

    def workflow_dir(self, files: Path) -> str:
        """`$WFD_WORKFLOW_DIR` as the execution sees its directory `files` of the host."""
        return bwrap.WORKFLOW_DIR if self.sandboxed else str(files)

    def files_mount(self, files: Path | None) -> dict[str, str | None] | None:
        """What a zygote's child mounts for its workflow's directory (sandbox/isolate.py).

        Every execution covers the zygote's view of all directories, the
        ones without a directory of their own too (a deploy check).
        """
        if not self.sandboxed:
            return None
        return {"source": f"{bwrap.ZYGOTE_FILES}/{files.name}" if files else None,
                "target": bwrap.WORKFLOW_DIR, "hide": bwrap.ZYGOTE_FILES}

    def zygote_command(self, net: bwrap.NetOptions | None = None,
                       files_root: Path | None = None) -> list[str]:
        """The zygote's command line up to its arguments (`protocol.ZygoteArgs`).

        Its children join their cgroup and build their namespaces themselves
        (sandbox/isolate.py), so nothing per execution appears here; the
        network namespace (`net`) is the zygote's, shared by its children.
        """
        command = [self.python, "-I", "-m", protocol.ZYGOTE_MODULE]
        if not self.sandboxed:
            return command
        return [*bwrap.zygote_command(self.interpreter, files_root=files_root,
                                      environment=self.environment, net=net), *command]

    @property
    def zygote_mode(self) -> str:
        """Sandbox mode under bwrap: each execution builds namespaces of its own."""
        return protocol.MODE_SANDBOX if self.sandboxed else protocol.MODE_PLAIN

    def close(self) -> None:
        """Remove the daemon's own cgroup parents (at shutdown)."""
        if self.backend is not None:
            with contextlib.suppress(OSError, cgroups.CgroupError):
                self.backend.close()


def _detect_cgroups(reasons: list[str]) -> cgroups.CgroupBackend | None:
    try:
        return cgroups.detect(why=reasons)
    except OSError as exc:
        reasons.append(f"cgroup detection failed: {exc}")
        return None
