"""Reading stdin: lines exactly as the server would frame them, in bounded memory, without
blocking Trio."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import trio

from ackservice.client.stdin import READ_SIZE, LineReader, read_lines
from ackservice.protocol import OVERSIZED


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """An OS pipe (read end, write end), both closed afterwards."""
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (write_end, read_end):  # the writer first, so a blocked reader sees EOF
        with contextlib.suppress(OSError):  # a test may have closed it already
            os.close(fd)


async def collect(fd: int, limit: int = 100) -> list[bytes | object]:
    return [line async for line in read_lines(fd, limit)]


async def test_lines_lose_their_newline_and_one_carriage_return(
    pipe: tuple[int, int],
) -> None:
    """``\\n`` and ``\\r\\n`` end a line; empty lines are messages; the last line needs
    no newline."""
    read_end, write_end = pipe
    os.write(write_end, b"one\r\ntwo\n\nthree\r\r\nlast")
    os.close(write_end)
    assert await collect(read_end) == [b"one", b"two", b"", b"three\r", b"last"]


async def test_a_line_over_the_limit_is_skipped_not_buffered(pipe: tuple[int, int]) -> None:
    """A line longer than the limit comes out as ``OVERSIZED``; the next line is intact."""
    read_end, write_end = pipe

    def write_all() -> None:
        os.write(write_end, b"short\n" + b"x" * (3 * READ_SIZE) + b"\nafter\n")
        os.close(write_end)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, write_all)
        lines = await collect(read_end, limit=10)
    assert lines == [b"short", OVERSIZED, b"after"]


async def test_lines_arrive_as_soon_as_they_are_written(pipe: tuple[int, int]) -> None:
    """A batch is whatever one read found: a slow producer's line is not held back
    waiting for more input."""
    read_end, write_end = pipe
    reader = LineReader(read_end, 100)
    os.write(write_end, b"first\nsecond\n")
    assert await reader.read_batch() == [b"first", b"second"]
    os.write(write_end, b"third\n")
    assert await reader.read_batch() == [b"third"]
    os.close(write_end)
    assert await reader.read_batch() == []
    assert await reader.read_batch() == []


async def test_waiting_for_input_does_not_block_other_tasks(pipe: tuple[int, int]) -> None:
    """The read blocks a worker thread, not the event loop, and is cancellable."""
    read_end, _ = pipe
    ticks = 0
    with trio.move_on_after(0.2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(LineReader(read_end, 100).read_batch)
            while True:
                await trio.sleep(0.01)
                ticks += 1
    assert ticks >= 5
