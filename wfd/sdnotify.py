"""Tell systemd how the daemon is doing: the sd_notify protocol, standard library only.

Under `Type=notify` systemd passes `$NOTIFY_SOCKET`, the address of a unix
datagram socket, and waits for `READY=1` before it calls the service started
(so `systemctl start wfd` returns once we really serve, and units ordered
after us start only then). With `WatchdogSec=` it also passes
`WATCHDOG_USEC`, and restarts the service if `WATCHDOG=1` stops arriving.

How `wfd serve` uses it:

- `ready()` once the listeners and the ctl socket accept connections;
- a task running `feed_watchdog(interval)` for as long as the process lives,
  when `watchdog_interval()` is not None. It runs on the event loop that
  serves requests, not in a thread, so a wedged loop stops feeding and
  systemd restarts us; cancel it last, after the store is closed, because
  the drain can take `grace_s`;
- `reloading()` when SIGHUP re-reads the config, then `ready()` again;
- `stopping()` as soon as SIGTERM (or any shutdown) begins, so systemd shows
  "deactivating" and applies `TimeoutStopSec=` instead of waiting blind;
- `status(text)` for a one-line state in `systemctl status` (optional).

Outside systemd `$NOTIFY_SOCKET` is unset and every call is a cheap no-op
that returns False, so the daemon calls these unconditionally.
"""

import asyncio
import os
import socket
import time


def notify(message: str) -> bool:
    """Send one sd_notify datagram; True if it was handed to the socket.

    Never raises for a missing, refused or full socket: losing a status line
    must not take the daemon down, and the caller can log a False. The send
    is non-blocking because it runs on the event loop; systemd's receive
    queue is large, so a dropped datagram means systemd itself is stuck.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        # Abstract namespace: the leading "@" stands for a NUL byte.
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True


def ready() -> bool:
    """Report that the daemon serves: `systemctl start` returns from here on."""
    return notify("READY=1")


def stopping() -> bool:
    """Report that shutdown has begun, so systemd shows the unit as deactivating."""
    return notify("STOPPING=1")


def reloading() -> bool:
    """Report that a SIGHUP reload has begun; `ready()` again when it is done.

    `MONOTONIC_USEC` is required with `Type=notify-reload` (systemd 253+) and
    harmless before, so `systemctl reload` waits for the reload to finish.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def status(text: str) -> bool:
    """Show one line of free text in `systemctl status`.

    Newlines are flattened: each line of a datagram is a separate assignment,
    so an unflattened newline would let text (say, a workflow name in the
    status) send `READY=1` or `MAINPID=` on our behalf.
    """
    return notify("STATUS=" + " ".join(text.splitlines()))


def watchdog_interval() -> float | None:
    """The watchdog period in seconds that systemd expects of this process, or None.

    systemd sets `WATCHDOG_USEC` (microseconds) when the unit has
    `WatchdogSec=`; `WATCHDOG_PID`, when present, names the process it is
    meant for, so a child that inherited the variables does not start
    feeding on the daemon's behalf.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


async def feed_watchdog(interval: float) -> None:
    """Send `WATCHDOG=1` every `interval / 2` seconds until cancelled.

    Half the period, as systemd recommends, leaves room for one late tick.
    It must run as a task on the loop whose health it vouches for: feeding
    from a thread would keep a wedged loop alive forever.
    """
    if interval <= 0:
        raise ValueError(f"watchdog interval must be positive, got {interval!r}")
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval / 2)
