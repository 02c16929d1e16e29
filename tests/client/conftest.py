"""Fixtures for the client tests: the real server in-process, fake servers on loopback or
in memory, and the CLI as a real process."""

from __future__ import annotations

import functools
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable

import pytest
import trio
from client_fakes import Handler, MemoryServer, RunClient, StartFake, StartServer, client_env

from ackservice.server import MessageHook, Server, ServerConfig, serve

# A CLI run in these tests takes well under a second; this only stops a hung test.
PROCESS_TIMEOUT = 60


@pytest.fixture
async def start_server(nursery: trio.Nursery) -> StartServer:
    """Start the real server on a free loopback port, optionally with an application hook,
    and over TLS with a context from ``ackservice.server.server_tls_context``."""

    async def start(
        on_message: MessageHook | None = None, tls: ssl.SSLContext | None = None
    ) -> Server:
        server: Server = await nursery.start(
            functools.partial(serve, ServerConfig(port=0), on_message=on_message, tls=tls)
        )
        return server

    return start


@pytest.fixture
async def server(start_server: StartServer) -> AsyncIterator[Server]:
    """The real server, acknowledging everything."""
    server = await start_server()
    yield server
    server.shutdown()


@pytest.fixture
async def start_fake(nursery: trio.Nursery) -> StartFake:
    """Start a fake TCP server on 127.0.0.1 running ``handler`` per connection; its port."""

    async def start(handler: Handler) -> int:
        async def guarded(stream: trio.SocketStream) -> None:
            # The client closing its end is part of every fault scenario, not a failure.
            try:
                await handler(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(stream)

        listeners: list[trio.SocketListener] = await nursery.start(
            functools.partial(trio.serve_tcp, guarded, 0, host="127.0.0.1")
        )
        return int(listeners[0].socket.getsockname()[1])

    return start


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on (bound, then closed, so it was free just now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def run_client() -> RunClient:
    """Run ``python -m ackservice.client`` as a real process; returns the completed run."""

    async def run(
        *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        with trio.fail_after(PROCESS_TIMEOUT):
            return await trio.run_process(
                [sys.executable, "-m", "ackservice.client", *args],
                stdin=stdin,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env={**client_env(), **(env or {})},
            )

    return run


@pytest.fixture
def memory_server(nursery: trio.Nursery) -> Callable[..., MemoryServer]:
    """Make a ``MemoryServer`` whose handlers run in the test's nursery."""
    return lambda *handlers: MemoryServer(nursery, *handlers)
