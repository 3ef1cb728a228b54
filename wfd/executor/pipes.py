"""An execution's pipes and the loop-friendly reading and writing of them.

The daemon makes the pipes itself whichever executor starts the child, so
feeding the job and draining output and result is one piece of code.
"""

import asyncio
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Captured:
    """The first `cap` bytes of a stream, and whether more came after them."""

    cap: int
    chunks: list[bytes] = field(default_factory=list)
    kept: int = 0
    truncated: bool = False

    def add(self, chunk: bytes) -> None:
        room = self.cap - self.kept
        if room > 0:
            self.chunks.append(chunk[:room])
            self.kept += len(self.chunks[-1])
        if len(chunk) > room:
            self.truncated = True

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class Pipes:
    """One execution's three pipes, made by the daemon whichever way the child starts.

    The child gets the job's reading end, the output's and the result's
    writing ends (`theirs`); the daemon keeps the other three, so draining,
    capping and judging are the same code for every executor.

    This object is the one owner of all six descriptors: `close` is
    idempotent and used as a context manager it closes whatever is still
    open on every way out, so no path (a failed spawn, a cancellation) can
    leak one.
    """

    def __init__(self) -> None:
        self._open: set[int] = set()
        try:
            self.job_r, self.job_w = self._pipe()
            self.output_r, self.output_w = self._pipe()
            self.result_r, self.result_w = self._pipe()
        except BaseException:
            self.close_all()
            raise

    def _pipe(self) -> tuple[int, int]:
        ends = os.pipe()
        self._open.update(ends)
        return ends

    def __enter__(self) -> "Pipes":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close_all()

    def theirs(self) -> list[int]:
        """The child's ends, in the order of `sandbox.protocol.PIPES`."""
        return [self.job_r, self.output_w, self.result_w]

    def close(self, *fds: int) -> None:
        """Close those of `fds` still open (each exactly once)."""
        for fd in fds:
            if fd in self._open:
                self._open.discard(fd)
                os.close(fd)

    def close_theirs(self) -> None:
        """Once the child holds its ends: EOF on ours then means it is done."""
        self.close(*self.theirs())

    def close_all(self) -> None:
        self.close(*list(self._open))


async def feed(pipes: Pipes, pieces: Sequence[bytes]) -> None:
    """Write the job's pieces to the child's stdin in turn and close it, never blocking the loop."""
    fd = pipes.job_w
    os.set_blocking(fd, False)
    try:
        for piece in pieces:
            view = memoryview(piece)
            while view:
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    await ready(fd, asyncio.get_running_loop().add_writer,
                                asyncio.get_running_loop().remove_writer)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the child died before reading its job; its exit says why
    finally:
        pipes.close(fd)  # EOF: the child reads its job to the end


async def drain(fd: int, into: Captured) -> None:
    """Read a raw pipe to EOF through the loop; `Pipes` closes it afterwards.

    A plain add_reader loop rather than connect_read_pipe: under uvloop the
    transport closes the fd itself while the file object wrapping it would
    close the same number again later, possibly someone else's by then.
    """
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            await ready(fd, loop.add_reader, loop.remove_reader)
            continue
        if not chunk:
            return
        into.add(chunk)


async def ready(fd: int, watch: Callable[..., Any], unwatch: Callable[[int], Any]) -> None:
    """Wait until the loop reports `fd` ready (for reading or writing, by `watch`)."""
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    watch(fd, wake)
    try:
        await ready
    finally:
        unwatch(fd)
