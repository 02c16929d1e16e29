"""The command-line client as a real process against fake servers on loopback that fail
in every way the issue lists: the exit code and one-line error are the contract."""

from __future__ import annotations

import zlib

import trio
from client_fakes import Replies, RunClient, StartFake, ack_everything
from client_support import STARTUP_SLACK, assert_one_line_error

from ackservice.protocol import err_line

FAST_RETRY = ["--retries", "2", "--backoff-base", "0.05", "--backoff-cap", "0.2"]


async def test_nothing_listening_exits_3_within_the_retry_budget(
    unused_port: int, run_client: RunClient
) -> None:
    """No server: the attempts the budget allows, then exit 3 and one clear line."""
    started = trio.current_time()
    run = await run_client("--port", str(unused_port), *FAST_RETRY, "hello")
    elapsed = trio.current_time() - started
    assert run.returncode == 3
    assert_one_line_error(
        run, f"cannot connect to 127.0.0.1:{unused_port}: connection refused (tried 3 times over"
    )
    assert run.stdout == b""
    assert elapsed < 0.05 + 0.1 + STARTUP_SLACK


async def test_retrying_an_unreachable_server_is_said_once_at_the_first_failure(
    unused_port: int, run_client: RunClient
) -> None:
    """While it retries (30 s by default) the client says at once, in one warning, what
    failed and for how long it will go on; it used to say nothing until it gave up."""
    run = await run_client(
        "--port", str(unused_port), "--retry-for", "1", "--backoff-base", "0.05", "hello"
    )
    assert run.returncode == 3
    stderr = run.stderr.decode()
    warnings = [line for line in stderr.splitlines() if "connect_failed" in line]
    assert len(warnings) == 1, stderr
    assert "connection refused" in warnings[0]
    assert "retrying_for=1.0" in warnings[0]
    assert_one_line_error(run, "connection refused (tried ")


async def test_nothing_listening_exits_3_for_piped_input_too(
    unused_port: int, run_client: RunClient
) -> None:
    """Piped mode reports the unreachable server the same way, with no summary."""
    run = await run_client("--port", str(unused_port), *FAST_RETRY, stdin=b"a\nb\n")
    assert run.returncode == 3
    assert_one_line_error(run, "cannot connect to")
    assert "sent" not in run.stderr.decode()


async def test_silent_server_trips_the_ack_timeout(
    start_fake: StartFake, run_client: RunClient
) -> None:
    """A server that accepts but never replies: exit 1 within ``--ack-timeout`` + slack."""

    async def silent(stream: trio.abc.Stream) -> None:
        while await stream.receive_some():
            pass

    port = await start_fake(silent)
    started = trio.current_time()
    run = await run_client("--port", str(port), "--ack-timeout", "0.5", "one", "two")
    elapsed = trio.current_time() - started
    assert run.returncode == 1
    assert_one_line_error(run, "no reply to message 1 within 0.5 s; 2 messages not acknowledged")
    assert 0.5 <= elapsed < 0.5 + STARTUP_SLACK


async def test_server_closing_mid_stream_gets_everything_resent(
    start_fake: StartFake, run_client: RunClient
) -> None:
    """The first connection drops after 100 ACKs: the client reconnects, resends the
    rest, every line ends up acknowledged, exit 0."""
    connections = 0

    async def drop_first_connection(stream: trio.abc.Stream) -> None:
        nonlocal connections
        connections += 1
        if connections > 1:
            await ack_everything(stream)
            return
        replies = Replies()
        seen: list[bytes] = []
        while len(seen) < 200:
            seen.extend(replies.frames(await stream.receive_some()))
        await stream.send_all(b"".join(replies.ack(p) for p in seen[:100]))

    port = await start_fake(drop_first_connection)
    stdin = b"".join(b"%d\n" % i for i in range(1000))
    run = await run_client("--port", str(port), "--quiet", *FAST_RETRY, stdin=stdin)
    assert run.returncode == 0, run.stderr
    summary = run.stderr.decode().splitlines()[-1]
    assert summary.startswith("sent 1000, acked 1000, rejected 0, unacked 0, resent ")
    assert connections == 2


async def test_wrong_crc32_is_detected(start_fake: StartFake, run_client: RunClient) -> None:
    """An ACK whose crc32 does not match what was sent: exit 1, the mismatch explained."""

    async def wrong_crc(stream: trio.abc.Stream) -> None:
        await stream.receive_some()
        await stream.send_all(b"ACK 1 5 deadbeef\n")
        await trio.sleep_forever()

    port = await start_fake(wrong_crc)
    run = await run_client("--port", str(port), "hello")
    assert run.returncode == 1
    assert_one_line_error(
        run,
        "message 1: acknowledged as 5 bytes with crc32 deadbeef, "
        "but 5 bytes with crc32 3610a686 were sent",
    )
    assert b"ACK" not in run.stdout


async def test_err_replies_are_reported_and_exit_1(
    start_fake: StartFake, run_client: RunClient
) -> None:
    """Every message refused with ``ERR <seq>``: each reported, exit 1, nothing resent."""
    received: list[bytes] = []

    async def refuse_everything(stream: trio.abc.Stream) -> None:
        replies = Replies()
        while data := await stream.receive_some():
            frames = replies.frames(data)
            received.extend(frames)
            first = replies.seq + 1
            replies.seq += len(frames)
            await stream.send_all(
                b"".join(err_line(seq, "rejected", "nope") for seq in range(first, replies.seq + 1))
            )

    port = await start_fake(refuse_everything)
    run = await run_client("--port", str(port), "a", "b")
    assert run.returncode == 1
    assert run.stdout.decode().splitlines() == [
        "message 1: ERR 1 rejected nope",
        "message 2: ERR 2 rejected nope",
    ]
    assert received == [b"a", b"b"]


async def test_shutting_down_server_is_left_for_a_new_connection(
    start_fake: StartFake, run_client: RunClient
) -> None:
    """``ERR 0 shutting-down`` before any reply: reconnect, resend, all acknowledged."""
    connections = 0

    async def shut_down_first(stream: trio.abc.Stream) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            await stream.receive_some()
            await stream.send_all(err_line(0, "shutting-down", "server is shutting down"))
            assert isinstance(stream, trio.SocketStream)
            await stream.send_eof()
            with trio.move_on_after(1):
                while await stream.receive_some():
                    pass
            return
        await ack_everything(stream)

    port = await start_fake(shut_down_first)
    run = await run_client("--port", str(port), *FAST_RETRY, "one", "two", "three")
    assert run.returncode == 0, run.stderr
    assert [line.split(" (")[0] for line in run.stdout.decode().splitlines()] == [
        f"message 1: ACK 1 3 {zlib.crc32(b'one'):08x}",
        f"message 2: ACK 2 3 {zlib.crc32(b'two'):08x}",
        f"message 3: ACK 3 5 {zlib.crc32(b'three'):08x}",
    ]
    assert connections == 2
    # The loss is a logged warning with the server's reason, not an error.
    assert b"shutting-down" in run.stderr
    assert b"error:" not in run.stderr


async def test_server_gone_for_good_after_connecting_exits_1(
    nursery: trio.Nursery, run_client: RunClient
) -> None:
    """Connected once, then the server vanishes: exit 1 (not 3), and the unacknowledged
    messages are counted."""
    port = await vanishing_server(nursery)
    run = await run_client("--port", str(port), *FAST_RETRY, "one", "two")
    assert run.returncode == 1
    assert_one_line_error(
        run,
        f"lost the connection to 127.0.0.1:{port} (closed) and cannot reconnect: "
        "connection refused (tried 3 times over ",
        "; 2 messages not acknowledged",
    )


async def test_a_piped_run_that_gives_up_says_where_its_input_stopped(
    nursery: trio.Nursery, run_client: RunClient
) -> None:
    """The server vanishes for good partway through a piped run: the summary counts what
    was sent and says after which input line nothing more was read, so the user knows
    exactly which lines never left."""
    port = await vanishing_server(nursery)
    stdin = b"".join(b"line %d\n" % i for i in range(10_000))
    run = await run_client("--port", str(port), *FAST_RETRY, "--window", "4", stdin=stdin)
    assert run.returncode == 1
    [summary] = [line for line in run.stderr.decode().splitlines() if line.startswith("sent ")]
    assert "input not read after line " in summary, run.stderr.decode()
    read_to = int(summary.split("input not read after line ")[1].split(" ")[0])
    assert 0 < read_to < 10_000
    sent = int(summary.split("sent ")[1].split(",")[0])
    assert sent <= read_to


async def vanishing_server(nursery: trio.Nursery) -> int:
    """A loopback port whose server accepts one connection, reads once, then closes it and
    stops listening for good; returns the port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def accept_once_then_vanish() -> None:
        stream = await listeners[0].accept()
        await listeners[0].aclose()
        await stream.receive_some()
        await stream.aclose()

    nursery.start_soon(accept_once_then_vanish)
    return int(listeners[0].socket.getsockname()[1])
