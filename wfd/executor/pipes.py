"""An execution's pipes and the loop-friendly reading and writing of them.

The daemon makes the pipes itself whichever executor starts the child, so
feeding the job and draining output and result is one piece of code.
"""

import asyncio
import os
from collections.abc import Callable
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
    """

    def __init__(self) -> None:
        self.job_r, self.job_w = os.pipe()
        self.output_r, self.output_w = os.pipe()
        self.result_r, self.result_w = os.pipe()

    def theirs(self) -> list[int]:
        """The child's ends, in the order of `sandbox.protocol.PIPES`."""
        return [self.job_r, self.output_w, self.result_w]

    def close_theirs(self) -> None:
        """Once the child holds its ends: EOF on ours then means it is done."""
        for fd in self.theirs():
            os.close(fd)

    def close_ours(self) -> None:
        for fd in (self.job_w, self.output_r, self.result_r):
            os.close(fd)


async def feed(fd: int, data: bytes) -> None:
    """Write the job to the child's stdin and close it, never blocking the loop."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    try:
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                await ready(fd, asyncio.get_running_loop().add_writer,
                             asyncio.get_running_loop().remove_writer)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the child died before reading its job; its exit says why
    finally:
        os.close(fd)


async def drain(fd: int, into: Captured) -> None:
    """Read a raw pipe to EOF through the loop, then close it (exactly once).

    A plain add_reader loop rather than connect_read_pipe: under uvloop the
    transport closes the fd itself while the file object wrapping it would
    close the same number again later, possibly someone else's by then.
    """
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                await ready(fd, loop.add_reader, loop.remove_reader)
                continue
            if not chunk:
                return
            into.add(chunk)
    finally:
        os.close(fd)


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
