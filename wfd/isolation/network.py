"""The network layer: executions in a network namespace of their own, behind a policy.

bubblewrap makes the namespace (`--unshare-net`); `pasta` (Debian package
passt) attached to it carries the execution's TCP and UDP out through
ordinary sockets of the host, and the daemon then installs the egress
policy as routing rules inside the namespace, where the execution (no
capability over that namespace) cannot change them:

- rules at priority 100 answer `unreachable` for the denied ranges, so a
  denied connection fails at once (EHOSTUNREACH or ENETUNREACH);
- allowances come first (priority 50: look the route up as usual), by
  address range and optionally one destination port;
- an allowance for a loopback address and port (`127.0.0.1/32:5432`) is a
  pasta port forward (`-T`): that port of the namespace's own loopback leads
  to the same port of the host's. Nothing else of the host's loopback is
  reachable (pasta runs with `--no-map-gw` and no automatic forwards), and
  abstract unix sockets belong to the network namespace, so the host's are
  out of reach too.
- the resolvers of the resolv.conf bound into the sandbox are allowed on
  port 53, so DNS works as on the host.

One namespace serves one policy: a zygote and its children share it, a
cold spawn gets one per execution (docs/isolation.md, "The network").
"""

import asyncio
import contextlib
import fcntl
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from wfd.isolation import bwrap

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DENIED = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
    "100.64.0.0/10", "::1/128", "fe80::/10", "fc00::/7"))
LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
DNS_PORT = 53
ALLOW_PRIORITY, DENY_PRIORITY = 50, 100
ATTACH_TIMEOUT_S = 10.0
NS_GET_USERNS = 0xB701
TUN = "/dev/net/tun"


# Run by an unprivileged daemon: join the user and network namespaces (full
# capabilities in the user namespace that owns the network one), keep
# CAP_NET_ADMIN across exec (inheritable + ambient), install the rules.
_RULES_HELPER = """
import ctypes, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
userns, netns, ip, ipv4, ipv6 = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6]
for fd, kind in ((userns, 0x10000000), (netns, 0x40000000)):
    if libc.setns(fd, kind) != 0:
        sys.exit("setns: " + os.strerror(ctypes.get_errno()))
header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
CAP_NET_ADMIN, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 12, 47, 2
if libc.capget(header, data) != 0:
    sys.exit("capget: " + os.strerror(ctypes.get_errno()))
data[2] |= 1 << CAP_NET_ADMIN
if libc.capset(header, data) != 0 or libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE,
                                                CAP_NET_ADMIN, 0, 0) != 0:
    sys.exit("keeping CAP_NET_ADMIN: " + os.strerror(ctypes.get_errno()))
for family, rules in (("-4", ipv4), ("-6", ipv6)):
    subprocess.run([ip, family, "-batch", "-"], input=rules.encode(), check=True)
"""


class NetworkError(Exception):
    """A namespace could not be given its network; the message says which step failed."""


@dataclass(frozen=True, order=True)
class Allow:
    """One allowance: an address range, and optionally the one port allowed in it."""

    network: str
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Allow":
        """`CIDR`, `CIDR:PORT`, `[IPv6-CIDR]:PORT` or a bare address; ValueError says why."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"network allowance must be CIDR or CIDR:PORT, got {text!r}")
        entry, port = text.strip(), None
        if entry.startswith("["):
            net, _, rest = entry[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"network allowance {text!r}: expected [CIDR]:PORT")
                port = rest[1:]
        elif entry.count(":") == 1:
            net, port = entry.split(":")
        else:
            net = entry
        try:
            network = ipaddress.ip_network(net, strict=True)
        except ValueError as exc:
            raise ValueError(f"network allowance {text!r}: {exc}") from None
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"network allowance {text!r}: port must be 1-65535")
        number = int(port) if port is not None else None
        if network.is_loopback and (network not in LOOPBACK or number is None):
            raise ValueError(f"network allowance {text!r}: the host's loopback is reachable "
                             "only one port at a time, as 127.0.0.1/32:PORT or [::1/128]:PORT")
        return cls(str(network), number)

    @property
    def ip_network(self) -> IPNetwork:
        return ipaddress.ip_network(self.network)

    @property
    def loopback(self) -> bool:
        return self.ip_network.is_loopback

    def __str__(self) -> str:
        if self.port is None:
            return self.network
        return f"[{self.network}]:{self.port}" if ":" in self.network else \
            f"{self.network}:{self.port}"


@dataclass(frozen=True)
class Policy:
    """Where executions of one workflow may connect: the denied ranges less the allowances.

    Its `key` tells namespaces apart: two workflows with equal policies may
    share one, two with different policies never do.
    """

    allow: tuple[Allow, ...] = ()

    @classmethod
    def of(cls, *entries: str) -> "Policy":
        return cls(tuple(sorted({Allow.parse(entry) for entry in entries})))

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(map(str, self.allow))

    def loopback_ports(self) -> list[int]:
        return sorted({a.port for a in self.allow if a.loopback and a.port is not None})

    def rules(self, resolvers: list[str]) -> tuple[str, str]:
        """The `ip -batch` text that installs this policy: IPv4 rules, then IPv6 ones."""
        lines: dict[int, list[str]] = {4: [], 6: []}
        allowed = [a for a in self.allow if not a.loopback]
        allowed += [Allow(f"{r}/{32 if '.' in r else 128}", DNS_PORT) for r in resolvers]
        for entry in allowed:
            port = f" dport {entry.port}" if entry.port is not None else ""
            lines[entry.ip_network.version].append(
                f"rule add to {entry.network}{port} lookup main priority {ALLOW_PRIORITY}")
        for network in DENIED:
            if not network.is_loopback:  # the namespace's own: only pasta's forwards listen
                lines[network.version].append(
                    f"rule add to {network} unreachable priority {DENY_PRIORITY}")
        return "\n".join(lines[4]) + "\n", "\n".join(lines[6]) + "\n"

    def describe(self) -> dict[str, list[str]]:
        """For `wfd ctl show`: what is denied, and what this workflow may reach anyway."""
        return {"deny": [str(n) for n in DENIED], "allow": list(self.key)}


def resolvers(resolv_conf: Path) -> list[str]:
    """The nameserver addresses of a resolv.conf (not on loopback: those are the host's)."""
    found = []
    with contextlib.suppress(OSError):
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    address = ipaddress.ip_address(parts[1].split("%")[0])
                    if not address.is_loopback:
                        found.append(str(address))
    return found


@dataclass(frozen=True)
class NetworkSupport:
    """Whether executions can have a network of their own here, and if not, why."""

    available: bool
    reason: str | None = None
    pasta: str = ""
    nsenter: str = ""
    ip: str = ""
    setpriv: str = ""


def detect() -> NetworkSupport:
    """The programs the layer needs: pasta (passt), nsenter and setpriv (util-linux), ip."""
    found = {name: shutil.which(name) or "" for name in ("pasta", "nsenter", "ip", "setpriv")}
    missing = [name for name, path in found.items() if not path]
    if missing:
        packages = {"pasta": "passt", "nsenter": "util-linux", "ip": "iproute2",
                    "setpriv": "util-linux"}
        return NetworkSupport(False, "not on PATH: " + ", ".join(
            f"{name} (Debian package {packages[name]})" for name in missing))
    if os.geteuid() != 0 and not os.access(TUN, os.R_OK | os.W_OK):
        return NetworkSupport(False, f"pasta needs {TUN} readable and writable by the daemon's "
                                     "user (mode 0666, Debian's default)")
    try:
        ran = subprocess.run([found["pasta"], "--version"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return NetworkSupport(False, f"pasta does not run: {exc}")
    if ran.returncode != 0:
        return NetworkSupport(False, f"pasta does not run (pasta --version: exit "
                                     f"{ran.returncode})")
    return NetworkSupport(True, None, found["pasta"], found["nsenter"], found["ip"],
                          found["setpriv"])


def _read_child_pid(info_fd: int) -> int:
    data = b""
    while b"}" not in data:
        chunk = os.read(info_fd, 4096)
        if not chunk:
            break
        data += chunk
    match = re.search(rb'"child-pid"\s*:\s*(\d+)', data)
    if match is None:
        raise NetworkError("the sandbox ended before it had a network namespace")
    return int(match[1])


def _wait_for_loopback(pid: int) -> None:
    """Return once bwrap's child has brought up the namespace's loopback.

    bwrap reports its child before the child sets up `lo`; pasta bringing
    `lo` up first would make the kernel add 127.0.0.1 itself, and bwrap's own
    (exclusive) add of it then fails. The local route of 127.0.0.1 appears
    once `lo` is up with its address.
    """
    deadline = time.monotonic() + ATTACH_TIMEOUT_S
    while True:
        try:
            with open(f"/proc/{pid}/net/fib_trie") as trie:
                if "127.0.0.1" in trie.read():
                    return
        except OSError:
            raise NetworkError("the sandbox ended before its loopback was up") from None
        if time.monotonic() > deadline:
            raise NetworkError("the sandbox's loopback never came up")
        time.sleep(0.0005)


def _read_child_ready(info_fd: int) -> int:
    pid = _read_child_pid(info_fd)
    _wait_for_loopback(pid)
    return pid


async def child_pid(info_fd: int) -> int:
    """The host pid of bwrap's child, from bwrap's `--info-fd` (closed by the caller).

    Returns once the child has set up its namespace's loopback, so pasta may attach.
    """
    return await asyncio.wait_for(asyncio.to_thread(_read_child_ready, info_fd),
                                  ATTACH_TIMEOUT_S)


class Attached:
    """The network of one namespace: the pasta serving it, stopped by `close`.

    pasta stays the daemon's child (`--foreground`) with a parent-death
    signal: it holds the namespace open, so it would never quit by itself,
    and a daemon that dies (kill -9, OOM) must not leave it behind.
    """

    def __init__(self, pasta: asyncio.subprocess.Process) -> None:
        self.pasta = pasta

    def alive(self) -> bool:
        return self.pasta.returncode is None

    def close(self) -> None:
        """Stop pasta; the loop reaps it."""
        if self.pasta.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.pasta.kill()


class Network:
    """Gives namespaces their network: pasta attached, then the policy's rules."""

    def __init__(self, support: NetworkSupport, resolv_conf: Path) -> None:
        self.support = support
        self.resolv_conf = resolv_conf
        self.resolvers = resolvers(resolv_conf)
        self.privileged = os.geteuid() == 0

    def bwrap_options(self, info_fd: int, block_fd: int | None = None) -> bwrap.NetOptions:
        """bwrap's side of a namespace this network will serve (`attach`)."""
        return bwrap.NetOptions(info_fd, block_fd, str(self.resolv_conf))

    def describe(self) -> str:
        dns = ", ".join(self.resolvers) or "none outside loopback"
        return (f"own network namespace per zygote (per execution for a cold spawn), "
                f"pasta, egress policy; resolvers allowed on port 53: {dns}")

    async def attach(self, child_pid: int, policy: Policy) -> Attached:
        """Connect the namespace of `child_pid` (bwrap's child) and install `policy`."""
        try:
            netns = os.open(f"/proc/{child_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NetworkError(f"the sandbox's namespace is gone: {exc}") from None
        userns = -1
        try:
            # An unprivileged daemon joins the user namespace owning the network
            # namespace (bwrap's, which the daemon's uid owns); root needs none.
            if not self.privileged:
                userns = fcntl.ioctl(netns, NS_GET_USERNS)
            attached = Attached(await self._pasta(netns, userns, policy))
            try:
                await self._rules(netns, userns, policy)
            except BaseException:
                attached.close()
                raise
            return attached
        finally:
            os.close(netns)
            if userns >= 0:
                os.close(userns)

    async def _pasta(self, netns: int, userns: int,
                     policy: Policy) -> asyncio.subprocess.Process:
        handle, pidfile = tempfile.mkstemp(prefix="wfd-pasta-", suffix=".pid")
        os.close(handle)  # pasta writes its pid there once the namespace is configured
        forward = ",".join(map(str, policy.loopback_ports())) or "none"
        argv = [self.support.setpriv, "--pdeathsig", "KILL", "--",
                self.support.pasta, "--foreground", "--config-net", "--no-map-gw", "--quiet",
                "-t", "none", "-u", "none", "-T", forward, "-U", "none",
                "--pid", pidfile, "--netns", f"/proc/self/fd/{netns}"]
        fds = [netns]
        if self.privileged:
            # As root pasta would switch to nobody before joining the namespace,
            # and nobody may not; it still drops every capability it does not need.
            argv[5:5] = ["--runas", "0"]
        else:
            argv += ["--userns", f"/proc/self/fd/{userns}"]
            fds.append(userns)
        try:
            with tempfile.TemporaryFile() as errors:
                process = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL, stderr=errors, pass_fds=fds)
                try:
                    await _configured(process, Path(pidfile), errors)
                except BaseException:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
                    raise
            return process
        finally:
            with contextlib.suppress(OSError):
                os.unlink(pidfile)

    async def _rules(self, netns: int, userns: int, policy: Policy) -> None:
        # `ip -batch` takes one address family per run.
        ipv4, ipv6 = policy.rules(self.resolvers)
        if userns < 0:  # root: nsenter keeps the capabilities across its exec
            script = (f'printf %s "$1" | {self.support.ip} -4 -batch - && '
                      f'printf %s "$2" | {self.support.ip} -6 -batch -')
            await _run([self.support.nsenter, f"--net=/proc/self/fd/{netns}", "/bin/sh", "-c",
                        script, "wfd-rules", ipv4, ipv6], [netns], "the egress rules")
            return
        # Unprivileged, the daemon's uid is not uid 0 in bwrap's user namespace, so
        # nsenter's exec would drop the capabilities gained there: a helper passes
        # CAP_NET_ADMIN on to `ip` as an ambient capability.
        await _run([sys.executable, "-I", "-c", _RULES_HELPER, str(userns), str(netns),
                    self.support.ip, ipv4, ipv6], [netns, userns], "the egress rules")


async def _configured(process: asyncio.subprocess.Process, pidfile: Path,
                      errors: typing.IO[bytes]) -> None:
    """Wait until pasta has configured the namespace: it writes its pid file then."""
    deadline = time.monotonic() + ATTACH_TIMEOUT_S
    delay = 0.0005
    while not pidfile.read_text().strip():
        if process.returncode is not None:
            raise NetworkError(f"pasta failed (exit {process.returncode}): "
                               f"{_last_message(errors)}")
        if time.monotonic() > deadline:
            raise NetworkError(f"pasta: no answer within {ATTACH_TIMEOUT_S:g} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)


def _last_message(errors: typing.IO[bytes]) -> str:
    """The last line a setup step wrote to its stderr file (syslog noise left out)."""
    errors.seek(0)
    lines = [line for line in errors.read().decode(errors="replace").splitlines()
             if "syslog" not in line]
    return lines[-1] if lines else "no message"


async def _run(argv: list[str], fds: list[int], what: str) -> None:
    """Run a setup step to its end; NetworkError with its last message if it fails.

    Its stderr goes to a file, not a pipe: nothing then depends on the step
    closing its descriptors.
    """
    with tempfile.TemporaryFile() as errors:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=errors, pass_fds=fds)
        try:
            await asyncio.wait_for(process.wait(), ATTACH_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise NetworkError(f"{what}: no answer within {ATTACH_TIMEOUT_S:g} s") from None
        if process.returncode != 0:
            raise NetworkError(f"{what} failed (exit {process.returncode}): "
                               f"{_last_message(errors)}")
