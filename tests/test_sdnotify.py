"""sd_notify against a real unix datagram socket standing in for systemd."""

import asyncio
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from wfd import sdnotify


@pytest.fixture
def systemd(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket named by $NOTIFY_SOCKET, as systemd would pass it.

    The path is short and under the system temp dir: AF_UNIX paths are
    limited to 108 bytes, which pytest's tmp_path can exceed.
    """
    path = Path(tempfile.gettempdir()) / f"wfd-notify-{os.getpid()}.sock"
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()
    path.unlink(missing_ok=True)


def test_ready_stopping_and_status_arrive(systemd: socket.socket) -> None:
    assert sdnotify.ready() is True
    assert systemd.recv(4096) == b"READY=1"
    assert sdnotify.status("serving 3 workflows") is True
    assert systemd.recv(4096) == b"STATUS=serving 3 workflows"
    assert sdnotify.stopping() is True
    assert systemd.recv(4096) == b"STOPPING=1"


def test_status_cannot_smuggle_other_assignments(systemd: socket.socket) -> None:
    assert sdnotify.status("deploying x\nREADY=1\nMAINPID=1") is True
    assert systemd.recv(4096) == b"STATUS=deploying x READY=1 MAINPID=1"


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"wfd-notify-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready() is True
        assert sock.recv(4096) == b"READY=1"


def test_unset_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    assert sdnotify.notify("WATCHDOG=1") is False


@pytest.mark.parametrize("address", ["", "relative/path.sock", "vsock:2:1234"])
def test_unusable_address_is_a_no_op(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert sdnotify.ready() is False


def test_missing_socket_returns_false_without_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    gone = Path(tempfile.gettempdir()) / f"wfd-notify-gone-{os.getpid()}.sock"
    gone.unlink(missing_ok=True)
    monkeypatch.setenv("NOTIFY_SOCKET", str(gone))
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", f"@wfd-notify-nobody-listens-{os.getpid()}")
    assert sdnotify.stopping() is False


def test_full_socket_returns_false_instead_of_blocking(systemd: socket.socket) -> None:
    """A stuck reader must not wedge the event loop the daemon sends from."""
    results: list[bool] = []

    def flood() -> None:
        while len(results) < 100_000 and (not results or results[-1]):
            results.append(sdnotify.notify("WATCHDOG=1"))

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    sender.join(timeout=5)
    assert not sender.is_alive(), "notify blocked on a full socket"
    assert results[-1] is False
    assert systemd.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("30000000", "other", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            own = str(os.getpid())
            monkeypatch.setenv(name, {"self": own, "other": own + "0"}.get(value, value))
    assert sdnotify.watchdog_interval() == expected


def test_feeder_sends_watchdog_from_the_event_loop(
    systemd: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # 0.1 s: a feed every 0.05 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    interval = sdnotify.watchdog_interval()
    assert interval == 0.1
    systemd.setblocking(False)

    async def main() -> tuple[list[bytes], bool]:
        loop = asyncio.get_running_loop()
        feeder = asyncio.create_task(sdnotify.feed_watchdog(interval))
        received = []
        async with asyncio.timeout(5):
            while len(received) < 4:
                received.append(await loop.sock_recv(systemd, 4096))
        feeder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await feeder
        return received, feeder.cancelled()

    received, cancelled = asyncio.run(main())
    assert received == [b"WATCHDOG=1"] * 4
    assert cancelled is True


def test_feeder_refuses_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        asyncio.run(sdnotify.feed_watchdog(0))


def test_feeder_feeds_at_half_the_interval(
    systemd: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half the period leaves room for one late tick before systemd gives up."""
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) == 3:
            raise asyncio.CancelledError
        await real_sleep(0)

    monkeypatch.setattr(sdnotify.asyncio, "sleep", recording_sleep)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(sdnotify.feed_watchdog(30.0))
    assert delays == [15.0, 15.0, 15.0]
    assert [systemd.recv(4096) for _ in delays] == [b"WATCHDOG=1"] * 3
