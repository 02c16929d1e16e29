"""Ctrl-C (SIGINT) and SIGTERM on the command-line client, as real processes: the summary
counts only what was printed, says it was interrupted, and the exit code names the signal."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from client_fakes import Replies, StartFake, client_env

from ackservice.server import Server
from support import unread_pipe_is_filling, wait_until

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
SUMMARY = re.compile(
    r"interrupted: sent (\d+), acked (\d+), rejected (\d+), unacked (\d+)(, .*)? in "
)


async def start_client(*args: str) -> trio.Process:
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "ackservice.client", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=client_env(),
    )


async def read_all(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
    while chunk := await stream.receive_some():
        into += chunk


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_signal_during_a_piped_flood_counts_only_printed_acks(
    server: Server, signum: signal.Signals
) -> None:
    """Stopped in the middle of a fast piped run: every ACK the summary counts was printed
    on stdout, the summary says it was interrupted, and the exit code is 128 + signal."""
    process = await start_client("--port", str(server.port), "--window", "512")
    stdout, stderr = bytearray(), bytearray()
    try:
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all, process.stdout, stdout)
            nursery.start_soon(read_all, process.stderr, stderr)

            async def feed() -> None:
                chunk = b"".join(b"line %d\n" % i for i in range(2000))
                for _ in range(2000):  # bounded: at most 4 million lines
                    try:
                        await process.stdin.send_all(chunk)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return

            nursery.start_soon(feed)
            with trio.fail_after(20):
                await wait_until(lambda: stdout.count(b"\n") >= 20_000)  # well under way
            process.send_signal(signum)
            with trio.fail_after(20):
                assert await process.wait() == EXIT_CODES[signum]
            nursery.cancel_scope.cancel()
    finally:
        process.kill()
        await process.wait()
    # What the pipes still held when the feeder stopped.
    for stream, into in ((process.stdout, stdout), (process.stderr, stderr)):
        assert stream is not None
        with trio.move_on_after(5):
            await read_all(stream, into)
    printed_acks = sum(1 for line in stdout.decode().splitlines() if ": ACK " in line)
    match = SUMMARY.match(stderr.decode().splitlines()[-1])
    assert match is not None, stderr[-300:]
    sent, acked, rejected, unacked = map(int, match.groups()[:4])
    assert acked == printed_acks
    assert sent == acked + rejected + unacked


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_a_second_signal_ends_a_client_whose_output_nobody_reads(
    server: Server, tmp_path: Path, signum: signal.Signals
) -> None:
    """The client's stdout is a pipe nobody reads, so it blocks writing replies: the first
    signal cannot stop it cleanly (that needs the event loop, stuck in the write), a second
    one ends it at once, by the signal, after one line saying so. Both did nothing before:
    only SIGKILL ended it (systemd's stop waited for its timeout)."""
    lines = tmp_path / "lines"
    lines.write_bytes(b"".join(b"line %d\n" % i for i in range(200_000)))
    with lines.open("rb") as stdin:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "ackservice.client", "--port", str(server.port)],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=client_env(),
        )
    stderr = bytearray()
    try:
        assert process.stdout is not None
        assert process.stderr is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all, process.stderr, stderr)
            with trio.fail_after(20):
                await wait_until(lambda: unread_pipe_is_filling(process.stdout.fileno()))
            await trio.sleep(0.5)  # writing on: blocked now
            process.send_signal(signum)
            await trio.sleep(0.2)
            process.send_signal(signum)
            with trio.fail_after(20):
                assert await process.wait() == -signum
    finally:
        process.kill()
        await process.wait()
    assert b"Traceback" not in stderr
    assert stderr.decode().splitlines()[-1] == (
        "python -m ackservice.client: error: stopped at once by a signal; "
        "replies not yet written, and the summary, are not shown"
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_signal_in_arguments_mode_reports_what_was_acknowledged(
    start_fake: StartFake, signum: signal.Signals
) -> None:
    """A server that answers the first message only: Ctrl-C (or SIGTERM) prints the first
    reply and a summary saying one message was acknowledged and one was not."""

    async def answer_first_only(stream: trio.abc.Stream) -> None:
        replies = Replies()
        answered = False
        while data := await stream.receive_some(65536):
            for frame in replies.frames(data):
                if not answered:
                    await stream.send_all(replies.ack(frame))
                    answered = True

    port = await start_fake(answer_first_only)
    process = await start_client("--port", str(port), "--ack-timeout", "60", "first", "second")
    stdout, stderr = bytearray(), bytearray()
    try:
        assert process.stdout is not None
        assert process.stderr is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all, process.stdout, stdout)
            nursery.start_soon(read_all, process.stderr, stderr)
            with trio.fail_after(20):
                await wait_until(lambda: b"\n" in stdout)
            process.send_signal(signum)
            with trio.fail_after(20):
                assert await process.wait() == EXIT_CODES[signum]
    finally:
        process.kill()
        await process.wait()
    assert stdout.decode().startswith("message 1: ACK 1 5 ")
    (summary,) = stderr.decode().splitlines()
    assert summary.startswith("interrupted: sent 2, acked 1, rejected 0, unacked 1 in ")
