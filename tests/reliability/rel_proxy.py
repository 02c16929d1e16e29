"""A chaos proxy for scenario 14: a Trio TCP proxy that delays, fragments and resets.

Between a client and the server it forwards both directions in order, but each chunk it
reads waits a latency with jitter, then goes out in tiny fragments (1 to 7 bytes, with
TCP_NODELAY, now and then a pause between them so they arrive as separate reads). Some
connections are reset (SO_LINGER 0 on both sides) after a random number of client bytes,
usually in the middle of a message.
"""

from __future__ import annotations

import contextlib
import functools
import random
import socket
from dataclasses import dataclass

import trio
from rel_harness import reset_socket


@dataclass
class ChaosSettings:
    """How hostile the network is."""

    latency: float = 0.001
    jitter: float = 0.002
    max_fragment: int = 7
    pause_chance: float = 0.1
    reset_chance: float = 0.2
    reset_within: int = 4000
    """A reset connection is cut after a uniform 1 to this many client bytes."""


@dataclass
class ChaosStats:
    connections: int = 0
    resets: int = 0
    fragments: int = 0


class ChaosProxy:
    """``port = await nursery.start(proxy.run)``; then clients connect to ``port``."""

    def __init__(self, upstream_port: int, settings: ChaosSettings, seed: int = 14) -> None:
        self.upstream_port = upstream_port
        self.settings = settings
        self.rng = random.Random(seed)
        self.stats = ChaosStats()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            task_status.started(int(listeners[0].socket.getsockname()[1]))

    async def _handle(self, downstream: trio.SocketStream) -> None:
        # A failure here must end this connection only (it would crash serve_listeners).
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            async with downstream:
                await self._proxy(downstream)

    async def _proxy(self, downstream: trio.SocketStream) -> None:
        self.stats.connections += 1
        settings = self.settings
        reset_after = None
        if self.rng.random() < settings.reset_chance:
            reset_after = self.rng.randint(1, settings.reset_within)
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        except OSError:
            reset_socket(downstream.socket)
            return
        for stream in (upstream, downstream):
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with upstream, trio.open_nursery() as nursery:
            cut = functools.partial(self._reset_both, downstream, upstream, nursery)
            nursery.start_soon(self._pump, downstream, upstream, reset_after, cut)
            nursery.start_soon(self._pump, upstream, downstream, None, cut)

    def _reset_both(
        self, downstream: trio.SocketStream, upstream: trio.SocketStream, nursery: trio.Nursery
    ) -> None:
        for stream in (downstream, upstream):
            with contextlib.suppress(OSError):
                reset_socket(stream.socket)
        nursery.cancel_scope.cancel()

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        reset_after: int | None,
        cut: functools.partial[None],
    ) -> None:
        settings = self.settings
        rng = self.rng
        forwarded = 0
        try:
            while data := await source.receive_some(65536):
                await trio.sleep(settings.latency + rng.uniform(0, settings.jitter))
                if reset_after is not None and forwarded + len(data) >= reset_after:
                    # Forward up to the cut (often mid-message), then reset both sides.
                    data = data[: reset_after - forwarded]
                    await self._send_fragments(sink, data)
                    self.stats.resets += 1
                    cut()
                    return
                await self._send_fragments(sink, data)
                forwarded += len(data)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            cut()

    async def _send_fragments(self, sink: trio.SocketStream, data: bytes) -> None:
        settings = self.settings
        rng = self.rng
        offset = 0
        while offset < len(data):
            size = rng.randint(1, settings.max_fragment)
            await sink.send_all(data[offset : offset + size])
            offset += size
            self.stats.fragments += 1
            if rng.random() < settings.pause_chance:
                await trio.sleep(0.0002)
