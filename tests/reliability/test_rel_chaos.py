"""Scenario 14, a chaos proxy between client and server: latency and jitter, the stream cut
into tiny fragments, some connections reset. Nothing lost, nothing unexpected, every CRC
correct."""

from __future__ import annotations

import random

import pytest
import trio
from rel_checker import History, check, filler_block, make_payload
from rel_harness import WireTap, deliver_all, pick
from rel_proxy import ChaosProxy, ChaosSettings

from conftest import Report, StartServer

CLIENTS = pick(20, 50)
MESSAGES = pick(100, 1_000)


@pytest.mark.slow
async def test_messages_survive_a_chaotic_network(
    start_server: StartServer, report: Report, nursery: trio.Nursery
) -> None:
    """Clients (``ackservice.client``, random windows) send through the chaos proxy: each
    chunk delayed 1-3 ms, cut into 1-7 byte fragments, one connection in five reset
    mid-stream. Every client ends with every message acknowledged and verified (length
    and CRC-32); the checker, fed by a tap on each client's side of the wire, finds
    nothing lost, nothing unexpected, no bad ACK, and duplicates only of messages that
    were written again after a reset."""
    server = await start_server(recording=True)
    proxy = ChaosProxy(server.port, ChaosSettings())
    proxy_port: int = await nursery.start(proxy.run)
    filler = filler_block()
    history = History()
    connections = 0
    resent = 0

    async def one_client(client: int) -> None:
        nonlocal connections, resent
        rng = random.Random(client)
        payloads = [
            make_payload(f"p{client}-{i}", rng.randint(16, 600), filler, rng.randrange(1 << 20))
            for i in range(MESSAGES)
        ]

        async def connect() -> trio.abc.Stream:
            return WireTap(await trio.open_tcp_stream("127.0.0.1", proxy_port), history)

        stats = await deliver_all(
            proxy_port,
            payloads,
            connect,
            window=rng.randint(1, 64),
            retries=10,
            backoff_base=0.02,
            backoff_cap=0.2,
            # The proxy delivers 1 to 7 bytes per 1 to 3 ms chunk: a window of 64 messages of
            # up to 600 bytes takes seconds to cross it, and the full run beside other
            # scenarios once took past the default 10 s for an ACK (the client then gives up,
            # by design: see ClientConfig.ack_timeout).
            ack_timeout=60,
        )
        connections += stats.connections
        resent += stats.resent

    with trio.fail_after(pick(60, 600)):
        async with trio.open_nursery() as clients:
            for client in range(CLIENTS):
                clients.start_soon(one_client, client)

    assert proxy.stats.resets > 0
    await server.assert_healthy()
    verdict = check(history, server.records())
    verdict.assert_valid()
    assert verdict.acked == CLIENTS * MESSAGES
    report(
        clients=CLIENTS,
        connections=connections,
        resets=proxy.stats.resets,
        fragments=proxy.stats.fragments,
        resent=resent,
        **verdict.summary(),
    )
