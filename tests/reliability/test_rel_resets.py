"""Scenario 2, abrupt resets: 10,000 messages over 200 connections, 10% of the connections
reset (SO_LINGER 0) at a random point; the client reconnects and resends (scaled down to
2,500 over 50 in the normal suite)."""

from __future__ import annotations

import random

import pytest
import trio
from rel_checker import History, check, filler_block, make_payload
from rel_harness import WireTap, deliver_all, pick

from ackservice.protocol import message_line
from conftest import Report, StartServer

CONNECTIONS = 200
MESSAGES = 10_000
RESET_SHARE = 0.10


@pytest.mark.slow
async def test_connections_reset_at_random_points_lose_nothing(
    start_server: StartServer, report: Report
) -> None:
    """Each client sends its share through ``ackservice.client`` (a random window of 1 to
    32); one in ten has its first connection reset after a random number of bytes, often
    mid-message. Every client ends with every message acknowledged and verified; the
    checker finds nothing lost, nothing unexpected, and duplicates only of messages that
    were written again after the reset; the server logs the resets and carries on."""
    server = await start_server(recording=True)
    filler = filler_block()
    history = History()
    per_client = MESSAGES // CONNECTIONS
    resetting = set(random.Random(2).sample(range(CONNECTIONS), round(CONNECTIONS * RESET_SHARE)))
    taps: dict[int, list[WireTap]] = {client: [] for client in range(CONNECTIONS)}
    acked = 0

    async def one_client(client: int) -> None:
        nonlocal acked
        rng = random.Random(client)
        payloads = [
            make_payload(f"r{client}-{i}", rng.randint(16, 400), filler, rng.randrange(1 << 20))
            for i in range(per_client)
        ]
        wire_bytes = sum(len(message_line(payload)) for payload in payloads)

        async def connect() -> trio.abc.Stream:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            first = not taps[client]
            reset_after = rng.randrange(1, wire_bytes) if first and client in resetting else None
            tap = WireTap(stream, history, reset_after)
            taps[client].append(tap)
            return tap

        await deliver_all(
            server.port,
            payloads,
            connect,
            window=rng.randint(1, 32),
            retries=5,
            backoff_base=0.05,
            backoff_cap=0.5,
        )
        acked += len(payloads)

    with trio.fail_after(pick(60, 300)):
        async with trio.open_nursery() as nursery:
            for client in range(CONNECTIONS):
                nursery.start_soon(one_client, client)

    assert acked == per_client * CONNECTIONS
    for client in resetting:
        assert taps[client][0].was_reset
        assert len(taps[client]) == 2
    await server.assert_healthy()
    resets_logged = [
        event for event in server.events_named("connection_closed") if event["reason"] == "reset"
    ]
    assert len(resets_logged) == len(resetting)
    verdict = check(history, server.records())
    verdict.assert_valid()
    report(connections=CONNECTIONS, resets=len(resetting), **verdict.summary())
