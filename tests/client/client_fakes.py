"""Fake servers for the client tests: protocol-speaking handlers and in-memory connections.

Imported by the test modules (pytest puts this directory on ``sys.path``); the name
``client_fakes`` keeps it apart from any other test directory's helpers.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Awaitable, Callable

import trio
import trio.testing

from ackservice.protocol import MessageFramer, Oversized, ack_line, err_line
from ackservice.server import Server

Handler = Callable[[trio.abc.Stream], Awaitable[None]]
"""A fake server's per-connection behaviour."""
StartServer = Callable[..., Awaitable[Server]]
"""The ``start_server`` fixture: ``await start_server(on_message=None, tls=None)``."""
StartFake = Callable[[Handler], Awaitable[int]]
"""The ``start_fake`` fixture: ``port = await start_fake(handler)``."""
RunClient = Callable[..., Awaitable[subprocess.CompletedProcess[bytes]]]
"""The ``run_client`` fixture: ``await run_client(*args, stdin=b"...")``."""


def client_env() -> dict[str, str]:
    """The environment for a client process: ours, without stray ACKSERVICE_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ACKSERVICE_")}


class Replies:
    """A fake server's bookkeeping for one connection: frames what arrives, numbers it."""

    def __init__(self) -> None:
        self.framer = MessageFramer()
        self.seq = 0

    def frames(self, data: bytes) -> list[bytes]:
        """The complete messages in ``data`` (none of the fakes sends oversized ones)."""
        frames = self.framer.feed(data) if data else self.framer.end_of_stream()
        assert not any(isinstance(frame, Oversized) for frame in frames)
        return [frame for frame in frames if isinstance(frame, bytes)]

    def ack(self, payload: bytes) -> bytes:
        """The correct ACK line for the next message."""
        self.seq += 1
        return ack_line(self.seq, payload)


async def ack_everything(stream: trio.abc.Stream, seen: list[bytes] | None = None) -> None:
    """Behave like a correct server: acknowledge every message until EOF."""
    replies = Replies()
    while data := await stream.receive_some(65536):
        frames = replies.frames(data)
        if seen is not None:
            seen.extend(frames)
        if frames:
            await stream.send_all(b"".join(replies.ack(frame) for frame in frames))


class MemoryServer:
    """Fake servers reached over in-memory streams, for the library's timing tests.

    Each call of ``connect`` (the client's ``connect=`` hook) takes the next handler from
    ``handlers`` (the last one repeats) and runs it on the server end of a fresh memory
    stream pair; a handler of ``None`` refuses the connection instead.
    """

    def __init__(self, nursery: trio.Nursery, *handlers: Handler | None) -> None:
        self._nursery = nursery
        self._handlers = handlers
        self.attempts = 0
        self.connections = 0

    async def connect(self) -> trio.abc.Stream:
        self.attempts += 1
        await trio.lowlevel.checkpoint()
        handler = self._handlers[min(self.attempts, len(self._handlers)) - 1]
        if handler is None:
            raise ConnectionRefusedError(111, "Connection refused")
        self.connections += 1
        client_end, server_end = trio.testing.memory_stream_pair()
        self._nursery.start_soon(self._serve, handler, server_end)
        return client_end

    @staticmethod
    async def _serve(handler: Handler, stream: trio.abc.Stream) -> None:
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


class FlakyStore:
    """A fake server whose store cannot take some messages for a while.

    Each payload for which ``flaky(payload)`` holds is answered ``ERR <seq> unavailable``
    on its first ``times`` writes (``math.inf``: always), then acknowledged; every other
    payload is acknowledged at once; a payload starting with ``refused`` gets
    ``ERR <seq> rejected``. ``writes`` counts each payload's writes over all connections,
    ``acked`` lists the payloads acknowledged, in the order the server acknowledged them.
    """

    def __init__(self, flaky: Callable[[bytes], bool], times: float) -> None:
        self.flaky = flaky
        self.times = times
        self.writes: dict[bytes, int] = {}
        self.acked: list[bytes] = []
        self.connections = 0

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until EOF."""
        self.connections += 1
        replies = Replies()
        while data := await stream.receive_some(65536):
            lines = []
            for payload in replies.frames(data):
                writes = self.writes[payload] = self.writes.get(payload, 0) + 1
                if payload.startswith(b"refused"):
                    replies.seq += 1
                    lines.append(err_line(replies.seq, "rejected", "not wanted"))
                elif self.flaky(payload) and writes <= self.times:
                    replies.seq += 1
                    lines.append(err_line(replies.seq, "unavailable", "store is down"))
                else:
                    self.acked.append(payload)
                    lines.append(replies.ack(payload))
            if lines:
                await stream.send_all(b"".join(lines))
