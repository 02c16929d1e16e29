"""Fixtures shared by every test module."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import structlog
import trio
from structlog.testing import capture_logs

from ackservice.server import Server
from support import Connect
from tls_support import OPENED_SOCKETS, TLSFiles, write_tls_files

# pytest explains a failed ``assert`` only in test modules and conftest files; these helper
# modules hold assertions of their own (assert_one_line_error, assert_drained_cleanly, ...),
# so they are rewritten too. This must run before any of them is imported.
pytest.register_assert_rewrite("client_support", "rel_harness", "store_support")

# The suite started with SIGINT ignored (run as ``cmd &`` by a non-interactive shell, or under
# nohup) would hand that on to every process it starts, and the CLIs keep an ignored stop
# signal ignored, as Python does: the Ctrl-C tests would then test nothing. Default
# handling here is what a user's terminal gives them (exec resets a handled signal).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Open loopback TCP connections that are closed when the test ends."""
    streams: list[trio.SocketStream] = []

    async def open_connection(port: int) -> trio.SocketStream:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        streams.append(stream)
        return stream

    yield open_connection
    for stream in streams:
        await trio.aclose_forcefully(stream)


def _drop(logger: object, method: str, event_dict: object) -> object:
    raise structlog.DropEvent


@pytest.fixture(autouse=True)
def quiet_structlog() -> Iterator[None]:
    """Log calls run (at debug, so every event is built) but print nothing; tests that look
    at events use structlog.testing.capture_logs, which replaces these processors."""
    structlog.configure(processors=[_drop])
    yield
    structlog.reset_defaults()


@pytest.fixture
def info_level() -> None:
    """Log at info, the CLI's default: without per-message debug events a connection answers
    from lengths and checksums (the Acknowledger), and request/response messages in the
    readiness hub's dispatcher, which the debug level of the other tests never reaches."""
    structlog.configure(
        processors=[_drop], wrapper_class=structlog.make_filtering_bound_logger(logging.INFO)
    )


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """The events logged during the test, with the connection's context merged in."""
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as entries:
        yield entries


@pytest.fixture(params=["debug", "info"])
def either_level(request: pytest.FixtureRequest) -> str:
    """Run the test at debug level (the framer, every message through the task) and at info
    level (the acknowledger, and the readiness hub's dispatcher answering whole reads)."""
    if request.param == "info":
        request.getfixturevalue("info_level")
    return str(request.param)


@pytest.fixture
def accept_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers started in this test accept no connection: they stay in the listen queue."""

    async def never_accept(self: Server, *args: object) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(Server, "_accept_loop", never_accept)


@pytest.fixture
async def close_tls_test_sockets() -> AsyncIterator[None]:
    """Close the client sockets a TLS test opened (tls_support.OPENED_SOCKETS); Trio
    sockets are closed in the Trio run, hence an async fixture, for async test modules."""
    yield
    while OPENED_SOCKETS:
        OPENED_SOCKETS.pop().close()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """CAs, server and client certificates as PEM files (tests/tls_support.py), made once."""
    return write_tls_files(tmp_path_factory.mktemp("tls"))
