"""Scenario 18, store outages: the SQLite store's disk full (a small real tmpfs, filled up),
and the nats-server stopped for 3 s, each in the middle of a client CLI run with default
settings; the server stays up and answers ``unavailable``, the client rides the outage out,
and the store ends up with every line."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from rel_harness import ServerUnderTest
from store_harness import (
    ClientCLI,
    open_client_cli,
    running_nats,
    sqlite_integrity,
    start_store_server,
    stored_frames,
    wait_for_replies,
)

from ackservice.protocol import message_line
from conftest import Report, StartServer
from support import LineReader, small_tmpfs

LINES = 4_000
# Lines sent and acknowledged before the outage starts; the rest are sent during it.
BEFORE_OUTAGE = 1_000
# How long the store stays out once the server has reported it.
OUTAGE_SECONDS = 1.5
NATS_DOWN_SECONDS = 3.0
# A whole scenario: the outage, then the client's backoff (at most 5 s by default) and the
# rest of the run.
SCENARIO_TIMEOUT = 40
TMPFS_BYTES = 8 * 1024 * 1024


def outage_payloads(prefix: str) -> list[bytes]:
    return [b"@%s%d|line %d of the outage run" % (prefix.encode(), n, n) for n in range(LINES)]


def fill(path: Path) -> int:
    """Write ``path`` until its file system is full (ENOSPC even for one byte); its size."""
    written = 0
    chunk = 1 << 20
    block = b"\xaa" * chunk
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # Bounded: each round writes at least one byte of a bounded file system or halves
        # the chunk, which reaches 0 after 21 halvings.
        while chunk:
            try:
                written += os.write(fd, block[:chunk])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    finally:
        os.close(fd)
    return written


async def run_through_outage(
    server: ServerUnderTest,
    workdir: Path,
    payloads: list[bytes],
    start_outage: Callable[[], Awaitable[None]],
    end_outage: Callable[[], Awaitable[None]],
) -> tuple[ClientCLI, int, float]:
    """Pipe ``payloads`` through ``python -m ackservice.client --json`` (default retry
    settings): the first ``BEFORE_OUTAGE`` are acknowledged, then ``start_outage``, the
    rest are sent and stdin closed; once the server has logged ``store_unavailable``,
    ``end_outage``. Returns the finished client, its exit code and its run time."""
    with trio.fail_after(SCENARIO_TIMEOUT):
        started = time.monotonic()
        async with open_client_cli(workdir, "client", server.port, ["--json"]) as client:
            await client.stdin.send_all(b"".join(message_line(p) for p in payloads[:BEFORE_OUTAGE]))
            await wait_for_replies(client, BEFORE_OUTAGE)
            await start_outage()
            await client.stdin.send_all(b"".join(message_line(p) for p in payloads[BEFORE_OUTAGE:]))
            await client.stdin.aclose()
            await server.wait_for_event("store_unavailable", within=10)
            await end_outage()
            code = await client.exited()
        return client, code, time.monotonic() - started


def check_client_rode_it_out(client: ClientCLI, code: int) -> dict[str, int]:
    """Exit 0, every line acknowledged (some only after resends: ``unavailable`` answers),
    and a summary that counts those resends. Returns figures."""
    assert code == 0, client.stderr()
    replies = client.replies()
    assert [reply["message"] for reply in replies] == list(range(1, LINES + 1))
    assert all(reply["status"] == "acked" for reply in replies)
    resent = [reply for reply in replies if reply["attempts"] > 1]
    assert resent, "no line was answered unavailable and sent again"
    # With --json every stderr line is JSON, the summary last.
    summary = json.loads(client.stderr().strip().splitlines()[-1])
    assert summary["event"] == "summary"
    assert (summary["sent"], summary["acked"], summary["rejected"], summary["unacked"]) == (
        LINES,
        LINES,
        0,
        0,
    )
    assert summary["resent"] >= len(resent)
    return {
        "lines_resent": len(resent),
        "most_attempts": max(reply["attempts"] for reply in replies),
    }


async def check_server_rode_it_out(server: ServerUnderTest) -> dict[str, float]:
    """``store_unavailable`` logged once, then ``store_recovered``; alive, no crash."""
    recovered = await server.wait_for_event("store_recovered", within=10)
    assert server.count_events("store_unavailable") == 1
    assert recovered["messages_refused"] > 0
    await server.assert_healthy(allowed_errors=["store_unavailable"])
    return {
        "server_refused": recovered["messages_refused"],
        "unavailable_for": recovered["unavailable_for"],
    }


@pytest.mark.slow
async def test_disk_full_then_freed_loses_no_line(
    start_server: StartServer, tmp_path: Path, report: Report
) -> None:
    """The SQLite store lives on an 8 MiB tmpfs. After 1,000 lines of a 4,000-line client
    CLI run (default settings), a filler file takes every free byte, so commits fail
    (``database or disk is full``): the server stays up, answers ``ERR <seq> unavailable``
    and logs ``store_unavailable`` once. 1.5 s later the filler is deleted while the client
    is still running: the client exits 0 with every line acknowledged (the refused ones
    resent), the server logs ``store_recovered``, and the store holds every line exactly
    once (a failed commit is rolled back) and passes ``PRAGMA integrity_check``."""
    payloads = outage_payloads("disk")
    with small_tmpfs(tmp_path / "disk", TMPFS_BYTES) as disk:
        store_path = disk / "s.db"
        store_url = f"sqlite:{store_path}"
        filler = disk / "filler"
        server = await start_store_server(start_server, store_url)
        filled = 0
        try:

            async def disk_full() -> None:
                nonlocal filled
                filled = fill(filler)

            async def space_freed() -> None:
                await trio.sleep(OUTAGE_SECONDS)
                filler.unlink()

            client, code, seconds = await run_through_outage(
                server, tmp_path, payloads, disk_full, space_freed
            )
            client_figures = check_client_rode_it_out(client, code)
            server_figures = await check_server_rode_it_out(server)
            assert "full" in server.events_named("store_unavailable")[0]["detail"]
            stored = await stored_frames(store_url)
            assert Counter(stored) == Counter(payloads)
            assert sqlite_integrity(store_path) == "ok"
        finally:
            server.kill()  # before the unmount: the server holds the store open
    report(
        lines=LINES,
        filler_bytes=filled,
        client_seconds=round(seconds, 2),
        **client_figures,
        **server_figures,
    )


@pytest.mark.slow
async def test_nats_stopped_for_three_seconds_loses_no_line(
    start_server: StartServer, tmp_path: Path, report: Report
) -> None:
    """A server on a JetStream store; after 1,000 lines of a 4,000-line client CLI run
    (default settings) the nats-server is stopped, and started again 3 s later on the same
    port and store directory. Meanwhile the server stays up, answers ``unavailable`` and
    logs ``store_unavailable`` once; the client exits 0 with every line acknowledged, the
    server logs ``store_recovered``, and the stream holds every line."""
    payloads = outage_payloads("nats")
    with running_nats(tmp_path / "nats") as nats:
        store_url = f"{nats.url}/OUTAGE"
        server = await start_store_server(start_server, store_url)
        stopped_at = 0.0

        async def nats_stopped() -> None:
            nonlocal stopped_at
            await trio.to_thread.run_sync(nats.stop)
            stopped_at = time.monotonic()

        async def nats_restarted() -> None:
            await trio.sleep(max(0.0, stopped_at + NATS_DOWN_SECONDS - time.monotonic()))
            await trio.to_thread.run_sync(nats.start)

        client, code, seconds = await run_through_outage(
            server, tmp_path, payloads, nats_stopped, nats_restarted
        )
        client_figures = check_client_rode_it_out(client, code)
        server_figures = await check_server_rode_it_out(server)
        stored = await stored_frames(store_url)
        assert set(stored) == set(payloads)
    report(
        lines=LINES,
        stored=len(stored),
        client_seconds=round(seconds, 2),
        **client_figures,
        **server_figures,
    )


@pytest.mark.slow
async def test_unavailable_after_a_store_timeout_means_not_stored(
    start_server: StartServer, tmp_path: Path, report: Report
) -> None:
    """A commit cut off by ``--store-timeout`` while it waits for SQLite's write lock is
    interrupted and rolled back, so its messages, answered ``ERR <seq> unavailable``, are
    not stored behind the client's back (a resend would duplicate them). Another process
    holds the write lock for 2 s while the server has ``--store-timeout 0.5``: ten
    messages sent meanwhile are answered ``unavailable`` after 0.5 s; once the lock is
    released, none of them is in the store."""
    store_path = tmp_path / "s.db"
    store_url = f"sqlite:{store_path}"
    server = await start_store_server(start_server, store_url, flags=["--store-timeout", "0.5"])
    payloads = [b"@timeout%d|answered unavailable" % n for n in range(10)]
    with trio.fail_after(20):
        with contextlib.closing(sqlite3.connect(store_path, isolation_level=None)) as locker:
            locker.execute("BEGIN IMMEDIATE")  # the write lock, as a long prune chunk takes it
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(b"".join(message_line(p) for p in payloads))
                replies = await LineReader(stream).lines(len(payloads))
            await trio.sleep(1.5)
            locker.execute("ROLLBACK")
        assert all(b" unavailable " in reply for reply in replies), replies
        # The abandoned commit, if any, finishes as soon as the lock is free.
        await trio.sleep(1.0)
        stored = await stored_frames(store_url)
    report(answered_unavailable=len(replies), stored_anyway=len(set(stored) & set(payloads)))
    assert not set(stored) & set(payloads), "messages answered unavailable were stored"
