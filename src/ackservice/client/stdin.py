"""Lines from standard input, read in a worker thread and handed over in batches.

Trio has no asynchronous stdin (a pipe or terminal cannot be made non-blocking without
affecting whoever else shares it), so the blocking ``os.read`` runs in a thread via
``trio.to_thread``. Each read returns whatever is available, up to ``READ_SIZE`` bytes, so
lines reach the client as soon as they are written, and many lines cross the thread
boundary per call when input is plentiful.

Lines are split by the same sans-IO ``MessageFramer`` the server uses, so a line here is
exactly what the server would call a message: the ``\\n`` is removed, and one ``\\r``
before it. A line longer than the limit comes out as ``OVERSIZED`` and is skipped to its
end, so memory stays bounded by ``READ_SIZE`` plus one maximum-size line whatever the input.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import trio

from ..protocol import MessageFramer, Oversized

__all__ = ["READ_SIZE", "LineReader", "StdinError", "read_lines"]

# One thread round-trip per 64 KiB: thousands of short lines per call.
READ_SIZE = 65536


class StdinError(OSError):
    """Reading standard input failed: an ``OSError`` the CLI can tell apart from a failed
    write of its output (both reach it from the same task)."""


class LineReader:
    """Reads newline-terminated lines from a file descriptor without blocking Trio.

    Reads use ``os.read`` on the descriptor rather than ``sys.stdin.buffer``: a thread left
    blocked in a buffered read holds the buffer's lock, and the interpreter then aborts at
    exit ("could not acquire lock for <stdin>") when Ctrl-C abandons it.
    """

    def __init__(self, fd: int, max_message_bytes: int) -> None:
        self._fd = fd
        self._framer = MessageFramer(max_message_bytes)
        self._at_eof = False

    async def read_batch(self) -> list[bytes | Oversized]:
        """The next lines available (at least one), or ``[]`` at end of input.

        Raises:
            StdinError: reading the descriptor failed.
        """
        while not self._at_eof:
            # abandon_on_cancel: Ctrl-C must not wait for the user to type another line.
            batch = await trio.to_thread.run_sync(self._read_lines, abandon_on_cancel=True)
            if batch:
                return batch
        return []

    def _read_lines(self) -> list[bytes | Oversized]:
        """Runs in the worker thread: one read, split into complete lines."""
        try:
            data = os.read(self._fd, READ_SIZE)
        except OSError as exc:
            raise StdinError(exc.errno, exc.strerror) from exc
        if data:
            return self._framer.feed(data)
        self._at_eof = True
        return self._framer.end_of_stream()


async def read_lines(fd: int, max_message_bytes: int) -> AsyncIterator[bytes | Oversized]:
    """Every line of ``fd`` in order, ``OVERSIZED`` for one over ``max_message_bytes``."""
    reader = LineReader(fd, max_message_bytes)
    while batch := await reader.read_batch():
        for line in batch:
            yield line
