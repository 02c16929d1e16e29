"""Metrics and health: live counters rendered at scrape time, /healthz and /readyz, and an
HTTP endpoint that a silent, oversized or crowding client cannot disturb."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from server_support import ListStore, connect, run_cli, samples, scrape, value

from ackservice.server import AckHandler, ServerConfig
from ackservice.server.metrics import snapshot
from ackservice.server.monitoring import (
    MAX_CLIENTS,
    MAX_REQUEST_BYTES,
    REQUEST_TIMEOUT,
    BadRequest,
    MonitoringApp,
    parse_request_head,
    serve_monitoring,
)
from support import ServerProcess, poll_until, server_process, wait_until

# --- the sans-IO parts -------------------------------------------------------------------


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=10))
def test_a_request_head_in_any_fragments_parses_the_same(cuts: list[int]) -> None:
    """Fed in any split, a request head is incomplete until its blank line, then gives the
    method and the path without its query string."""
    raw = b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n"
    data = b""
    position = 0
    for cut in [*cuts, len(raw)]:
        if position >= len(raw):
            break
        data += raw[position : position + cut]
        position += cut
        if position < len(raw):
            assert parse_request_head(data) is None
    assert parse_request_head(raw) == ("GET", "/metrics")


def test_oversized_and_malformed_requests_are_refused() -> None:
    """A head past MAX_REQUEST_BYTES is 431 (even before its end arrives); a line that is not
    HTTP/1.x is 400."""
    with pytest.raises(BadRequest) as too_long:
        parse_request_head(b"GET /" + b"a" * MAX_REQUEST_BYTES)
    assert too_long.value.status == 431
    with pytest.raises(BadRequest) as garbage:
        parse_request_head(b"hello\n\n")
    assert garbage.value.status == 400


def test_health_paths_follow_the_server_state() -> None:
    """/healthz: 200 while accepting, 503 after; /readyz also 503 while the store is down;
    other methods 405, other paths 404."""
    state = {"accepting": True, "store": True}
    app = MonitoringApp(lambda: b"m\n", lambda: state["accepting"], lambda: state["store"])
    assert app.respond("GET", "/healthz").status == 200
    assert app.respond("GET", "/readyz").status == 200
    state["store"] = False
    assert app.respond("GET", "/healthz").status == 200
    assert app.respond("GET", "/readyz").body == b"store unavailable\n"
    state["accepting"] = False
    assert [app.respond("GET", path).status for path in ("/healthz", "/readyz")] == [503, 503]
    assert app.respond("POST", "/metrics").status == 405
    assert app.respond("GET", "/").status == 404


def test_a_supervisor_with_no_worker_serving_does_not_claim_to_be_shutting_down() -> None:
    """With --workers, /healthz and /readyz are 503 until a worker serves (start-up, or every
    worker restarting); the body says so, and "shutting down" only once a shutdown began:
    an operator reading a failed health check must not go looking for who stopped it."""
    state = {"accepting": False, "stopping": False}
    app = MonitoringApp(
        lambda: b"m\n",
        lambda: state["accepting"],
        lambda: True,
        stopping=lambda: state["stopping"],
    )
    for path in ("/healthz", "/readyz"):
        response = app.respond("GET", path)
        assert (response.status, response.body) == (503, b"no worker serving yet\n")
    state["stopping"] = True
    for path in ("/healthz", "/readyz"):
        response = app.respond("GET", path)
        assert (response.status, response.body) == (503, b"shutting down\n")


async def test_a_silent_client_is_dropped_and_does_not_block_scrapes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client that connects and never sends is closed after REQUEST_TIMEOUT, while a
    scrape made meanwhile is answered at once."""
    app = MonitoringApp(lambda: b"metrics\n", lambda: True, lambda: True)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            serve_monitoring, await trio.open_tcp_listeners(0, host="127.0.0.1"), app
        )
        port = listeners[0].socket.getsockname()[1]
        async with (
            await trio.open_tcp_stream("127.0.0.1", port) as silent,
            await trio.open_tcp_stream("127.0.0.1", port) as scraper,
        ):
            started = trio.current_time()
            await scraper.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            response = b""
            while chunk := await scraper.receive_some():
                response += chunk
            assert response.startswith(b"HTTP/1.1 200 OK\r\n")
            assert response.endswith(b"\r\n\r\nmetrics\n")
            assert trio.current_time() - started < REQUEST_TIMEOUT
            assert await silent.receive_some() == b""  # closed by the server
            assert trio.current_time() - started >= REQUEST_TIMEOUT
        nursery.cancel_scope.cancel()


async def test_silent_clients_cannot_shut_the_health_check_out() -> None:
    """With every slot held by clients that never send, a health check still gets its
    answer: it takes the place of the oldest silent client."""
    app = MonitoringApp(lambda: b"metrics\n", lambda: True, lambda: True)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            serve_monitoring, await trio.open_tcp_listeners(0, host="127.0.0.1"), app
        )
        port = listeners[0].socket.getsockname()[1]
        silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(MAX_CLIENTS)]
        await trio.sleep(0.1)  # all of them accepted and waiting for their request heads
        with trio.fail_after(2):
            async with await trio.open_tcp_stream("127.0.0.1", port) as checker:
                await checker.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                response = b""
                while chunk := await checker.receive_some():
                    response += chunk
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        assert await silent[0].receive_some() == b""  # the oldest made room
        for stream in silent:
            await stream.aclose()
        nursery.cancel_scope.cancel()


# --- live counts, in process ------------------------------------------------------------


async def test_snapshot_counts_open_connections_and_errors_by_kind(nursery: trio.Nursery) -> None:
    """A connection still open is counted now; messages waiting for a commit are not counted
    as acked before their verdict (a counter never goes down); errors are split by kind and
    a failing store shows as down with one outage."""
    store = ListStore()
    store.verdicts[b"spam"] = None
    handler = AckHandler(ServerConfig(max_message_bytes=8), store=store)
    client, reader = connect(nursery, handler)
    await client.send_all(b"one\ntwo\nmuch-too-long\n")
    assert await reader.lines(3)
    counts = snapshot(handler)
    assert counts["connections_active"] == 1
    assert counts["messages"]["acked"] == 2
    assert counts["messages"]["too_large"] == 1
    assert counts["bytes_received"] == len(b"one\ntwo\nmuch-too-long\n")
    store.gate = trio.Event()
    store.commit_started = trio.Event()
    await client.send_all(b"held\n")
    await store.commit_started.wait()
    assert snapshot(handler)["messages"]["acked"] == 2  # not yet answered
    store.failing = True
    store.gate.set()
    assert (await reader.line()).startswith(b"ERR 4 unavailable")
    counts = snapshot(handler)
    assert (counts["messages"]["acked"], counts["messages"]["unavailable"]) == (2, 1)
    assert counts["store"]["up"] is False
    assert counts["store"]["outages"] == 1
    assert sum(counts["store"]["latency_counts"]) == counts["store"]["commits"] == 2
    await client.send_eof()
    assert await reader.at_eof()
    await wait_until(lambda: handler.stats.active == 0)
    closed = snapshot(handler)  # the same, now from the totals of closed connections
    assert closed["messages"] == counts["messages"]
    assert closed["connections_active"] == 0


# --- a real server process --------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, int]]:
    """One server for the module, with metrics on a free port and a quick drain."""
    directory: Path = tmp_path_factory.mktemp("metrics")
    with server_process(
        directory / "log",
        "--metrics-port",
        "0",
        "--drain-timeout",
        "1",
        "--max-message-bytes",
        "16",
    ) as server:
        (metrics,) = server.wait_for_event("listening")["metrics"]
        yield server, int(metrics.rsplit(":", 1)[1])


def test_counters_are_live_and_match_what_clients_were_told(
    metrics_server: tuple[ServerProcess, int],
) -> None:
    """While a connection is still open, /metrics already counts every message it was
    answered: the ACKs, and the ERR too-large; bytes and connections too."""
    server, port = metrics_server
    before = scrape(port)[1]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        payload = b"".join(b"message %d\n" % n for n in range(200)) + b"x" * 40 + b"\n"
        client.sendall(payload)
        replies = client.makefile("rb")
        told = [replies.readline() for _ in range(201)]
        assert sum(line.startswith(b"ACK ") for line in told) == 200
        assert told[-1].startswith(b"ERR 201 too-large")
        status, text = scrape(port)
        assert status == 200
        assert value(text, "ackservice_connections_active") >= 1
        for name, grew in [
            ("ackservice_messages_total", {"result": "acked"}),
            ("ackservice_messages_total", {"result": "too_large"}),
        ]:
            delta = value(text, name, **grew) - value(before, name, **grew)
            assert delta == (200 if grew["result"] == "acked" else 1)
        assert value(text, "ackservice_bytes_received_total") - value(
            before, "ackservice_bytes_received_total"
        ) == len(payload)
        assert value(text, "ackservice_store_up") == 1
        assert value(text, "ackservice_store_commit_seconds_count") >= 1
        assert ("process_cpu_seconds_total", ()) in samples(text)
    assert scrape(port, "/readyz") == (200, "ready\n")


def test_healthz_turns_503_during_shutdown(metrics_server: tuple[ServerProcess, int]) -> None:
    """Once SIGTERM starts the graceful shutdown, /healthz and /readyz answer 503 (a load
    balancer stops sending) and /metrics still answers, until the server exits 0.
    (Ends the module's server: keep it last.)"""
    server, port = metrics_server
    assert scrape(port, "/healthz") == (200, "ok\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(b"hi\n")
        reader = client.makefile("rb")
        assert reader.readline().startswith(b"ACK 1")
        server.signal(signal.SIGTERM)
        # The connection is told and drains (up to --drain-timeout) while we scrape.
        assert reader.readline().startswith(b"ERR 0 shutting-down")
        assert scrape(port, "/healthz") == (503, "shutting down\n")
        assert scrape(port, "/readyz")[0] == 503
        assert value(scrape(port)[1], "ackservice_shutting_down") == 1
    assert server.wait() == 0
    poll_until(lambda: server.process.poll() is not None)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--metrics-port", "70000"], {}, "expected an integer from 0 to 65535"),
        ([], {"ACKSERVICE_METRICS_PORT": "x"}, "ACKSERVICE_METRICS_PORT"),
        (["--metrics-port", "0", "--metrics-host", ""], {}, "expected a host name"),
    ],
)
def test_bad_metrics_settings_are_one_line_errors(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    """Out-of-range or empty metrics settings: one line, exit 2."""
    done = run_cli(tmp_path, args, env)
    assert done.returncode == 2
    assert message in done.stderr


def test_a_metrics_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """A metrics port that cannot be bound stops the start-up: one line, exit 1."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = run_cli(tmp_path, ["--metrics-port", str(port)], {})
    assert done.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr
    assert len(done.stderr.splitlines()) == 1
