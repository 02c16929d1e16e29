"""Scenario 4, the server killed: SIGKILL at message ~2,000 of 10,000, restarted on the same
port; the client, retrying, finishes and every message is recorded at least once."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable

import pytest
import trio
from rel_checker import History, check, filler_block, make_payload
from rel_harness import WireTap, pick, poll_until

from ackservice.client import Client, open_client
from conftest import Report, StartServer

MESSAGES = 10_000
KILL_AT = 2_000

Restart = Callable[[Client, Callable[[], int]], Awaitable[None]]


def numbered_payloads(prefix: str, seed: int) -> list[bytes]:
    """MESSAGES payloads with ids ``<prefix><n>`` and varied sizes."""
    filler = filler_block()
    rng = random.Random(seed)
    return [
        make_payload(f"{prefix}{i}", rng.randint(16, 200), filler, rng.randrange(1 << 20))
        for i in range(MESSAGES)
    ]


async def deliver_across_restart(
    port: int,
    connect: Callable[[], Awaitable[trio.abc.Stream]],
    payloads: list[bytes],
    restart: Restart,
) -> tuple[int, int]:
    """Send every payload with a retrying client while ``restart(client, receipts)`` replaces
    the server beside it; every receipt must be an ACK. Returns (receipts, messages resent)."""
    receipts = 0
    with trio.fail_after(pick(60, 120)):
        async with (
            trio.open_nursery() as nursery,
            open_client(
                "127.0.0.1", port, connect=connect, retries=20, backoff_base=0.05, backoff_cap=0.5
            ) as client,
        ):
            nursery.start_soon(restart, client, lambda: receipts)
            async for receipt in client.send_many(payloads):
                assert receipt.acked
                receipts += 1
            return receipts, client.stats.resent


@pytest.mark.slow
async def test_server_killed_and_restarted_loses_nothing(
    start_server: StartServer, report: Report
) -> None:
    """The first server is SIGKILLed after the client's 2,000th receipt, with messages in
    flight; a second one
    starts on the same port, appending to the same record. The client (``ackservice.client``
    with retries) reconnects, resends what was unacknowledged and ends with every message
    acknowledged; every message is recorded at least once, nothing acknowledged is lost,
    and only messages written twice were recorded twice. Neither server logged a crash."""
    first = await start_server(recording=True)
    port = first.port
    payloads = numbered_payloads("k", seed=4)
    history = History()
    connections: list[WireTap] = []
    servers = [first]
    killed_at = back_at = 0.0
    in_flight_at_kill = 0

    async def connect() -> trio.abc.Stream:
        tap = WireTap(await trio.open_tcp_stream("127.0.0.1", port), history)
        connections.append(tap)
        return tap

    async def kill_mid_stream(client: Client, receipts: Callable[[], int]) -> None:
        """At the 2,000th receipt, once messages are in flight (unanswered): SIGKILL, then
        start the second server on the same port."""
        nonlocal killed_at, back_at, in_flight_at_kill
        await poll_until(lambda: receipts() >= KILL_AT and client.in_flight > 0, 0.0002)
        in_flight_at_kill = client.in_flight
        first.kill()
        killed_at = time.monotonic()
        servers.append(await start_server(recording=True, port=port, boot=2))
        back_at = time.monotonic()

    receipts, resent = await deliver_across_restart(port, connect, payloads, kill_mid_stream)
    assert killed_at, "never saw messages in flight after receipt 2,000 to kill on"

    assert receipts == MESSAGES
    assert len(servers) == 2
    assert len(connections) >= 2
    second = servers[1]
    await second.assert_healthy()
    assert not first.log_problems()
    records = second.records()
    assert {record.boot for record in records} == {1, 2}
    assert {record.pid for record in records} == {f"k{i}" for i in range(MESSAGES)}
    verdict = check(history, records)
    verdict.assert_valid()
    report(
        killed_at_receipt=KILL_AT,
        in_flight_at_kill=in_flight_at_kill,
        restart_seconds=round(back_at - killed_at, 2),
        resent=resent,
        connections=len(connections),
        **verdict.summary(),
    )


@pytest.mark.slow
async def test_server_restarted_gracefully_loses_nothing(
    start_server: StartServer, report: Report
) -> None:
    """The same run with a graceful restart (SIGTERM, then a new server on the port): the
    client is told ``ERR 0 shutting-down`` after the last ACK of what the server had read,
    reconnects once the new server is up, and resends only what was unacknowledged; the
    checker finds every message recorded, nothing lost, no unexpected duplicate, and the
    first server exited 0."""
    first = await start_server(recording=True)
    port = first.port
    payloads = numbered_payloads("g", seed=5)
    history = History()
    servers = [first]
    exit_code = -1

    async def connect() -> trio.abc.Stream:
        return WireTap(await trio.open_tcp_stream("127.0.0.1", port), history)

    async def restart_mid_stream(client: Client, receipts: Callable[[], int]) -> None:
        nonlocal exit_code
        await poll_until(lambda: receipts() >= KILL_AT and client.in_flight > 0, 0.0002)
        exit_code = await first.stop()
        servers.append(await start_server(recording=True, port=port, boot=2))

    receipts, resent = await deliver_across_restart(port, connect, payloads, restart_mid_stream)
    assert exit_code != -1, "never saw messages in flight after receipt 2,000"

    assert receipts == MESSAGES
    assert exit_code == 0
    assert servers[0].events_named("shutdown_complete")[0]["forced"] is False
    await servers[1].assert_healthy()
    records = servers[1].records()
    assert {record.pid for record in records} == {f"g{i}" for i in range(MESSAGES)}
    verdict = check(history, records)
    verdict.assert_valid()
    assert verdict.duplicates == 0  # a graceful stop answers everything it has read
    report(resent=resent, **verdict.summary())
