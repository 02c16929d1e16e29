"""Scenario 17, crashes with a store: the server SIGKILLed mid-run and restarted on the same
store (SQLite, JetStream), and the nats-server SIGKILLed mid-run under a running server;
every message any client saw acknowledged is in the store afterwards."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from rel_checker import History, check
from rel_harness import poll_until
from store_harness import (
    all_ids,
    check_store_outage_logged,
    run_clients,
    running_nats,
    sqlite_integrity,
    start_store_server,
    stored_records,
)

from conftest import Report, StartServer

MESSAGES_PER_CLIENT = 2_500
# The fault strikes once the clients hold this many receipts in all (of 10,000).
FAULT_AT = 3_000
RUN_TIMEOUT = 60


@pytest.mark.slow
async def test_server_killed_mid_run_keeps_every_acknowledged_message(
    start_server: StartServer, store_url: str, report: Report
) -> None:
    """Four ``ackservice.client`` clients pipeline 2,500 messages each into ``python -m
    ackservice.server --store URL``; after 3,000 receipts, with messages in flight, the
    server is SIGKILLed and a new one started on the same port and the same store. The
    clients reconnect, resend what was unanswered and end with every message acknowledged.
    Read back with ``export``, the store holds every message; the checker finds nothing
    acknowledged missing (lost 0), nothing never sent, no message stored more often than
    written. A SQLite file passes ``PRAGMA integrity_check`` after the kill."""
    first = await start_store_server(start_server, store_url)
    port = first.port
    history = History()
    servers = [first]
    in_flight_at_kill = 0
    killed_at = back_at = 0.0

    async def kill_and_restart(receipts: Callable[[], int], in_flight: Callable[[], int]) -> None:
        nonlocal in_flight_at_kill, killed_at, back_at
        await poll_until(lambda: receipts() >= FAULT_AT and in_flight() > 0, 0.0005)
        in_flight_at_kill = in_flight()
        first.kill()
        killed_at = time.monotonic()
        servers.append(await start_store_server(start_server, store_url, port=port, boot=2))
        back_at = time.monotonic()

    with trio.fail_after(RUN_TIMEOUT):
        counts = await run_clients(port, history, kill_and_restart, MESSAGES_PER_CLIENT)
    second = servers[1]
    await second.assert_healthy()
    assert not first.log_problems()

    records = await stored_records(store_url)
    assert {record.pid for record in records} == all_ids(MESSAGES_PER_CLIENT)
    verdict = check(history, records)
    verdict.assert_valid()
    if store_url.startswith("sqlite:"):
        assert sqlite_integrity(Path(store_url.removeprefix("sqlite:"))) == "ok"
    report(
        store=store_url.split(":", 1)[0],
        in_flight_at_kill=in_flight_at_kill,
        restart_seconds=round(back_at - killed_at, 2),
        **counts,
        **verdict.summary(),
    )


@pytest.mark.slow
async def test_nats_killed_mid_run_acknowledges_only_what_the_stream_keeps(
    start_server: StartServer, tmp_path: Path, report: Report
) -> None:
    """The same four clients against one server on a JetStream store; after 3,000 receipts
    the nats-server is SIGKILLed (the ackservice server stays up) and started again 1 s
    later on the same port and store directory. Meanwhile the clients are answered
    ``unavailable`` (or lose a connection) and resend; they end with every message
    acknowledged. Read back after NATS's restart, the stream holds every message any client
    saw acknowledged (lost 0), nothing unexpected; the server logged ``store_unavailable``
    once and ``store_recovered``, and no crash."""
    with running_nats(tmp_path / "nats") as nats:
        store_url = f"{nats.url}/NATSKILL"
        server = await start_store_server(start_server, store_url)
        history = History()
        down_for = 0.0

        async def kill_nats(receipts: Callable[[], int], in_flight: Callable[[], int]) -> None:
            nonlocal down_for
            await poll_until(lambda: receipts() >= FAULT_AT and in_flight() > 0, 0.0005)
            killed = time.monotonic()
            await trio.to_thread.run_sync(nats.kill)
            await trio.sleep(1.0)
            await trio.to_thread.run_sync(nats.start)
            down_for = time.monotonic() - killed

        with trio.fail_after(RUN_TIMEOUT):
            counts = await run_clients(server.port, history, kill_nats, MESSAGES_PER_CLIENT)
        await check_store_outage_logged(server)
        records = await stored_records(store_url)
        refused = sum(history.refused.values())
        verdict = check(history, records)
        verdict.assert_valid()
        assert {record.pid for record in records} == all_ids(MESSAGES_PER_CLIENT)
        assert refused > 0, "no client was answered unavailable while NATS was down"
        recovered = server.events_named("store_recovered")[0]
        # Not asserted (see docs/reliability.md, findings): messages answered unavailable
        # that the stream kept anyway, because the connection broke with a PubAck pending.
        times_stored = Counter(record.pid for record in records)
        stored_though_unavailable = sum(
            max(0, count - (history.sent[pid].writes - history.refused[pid]))
            for pid, count in times_stored.items()
            if pid is not None
        )
        report(
            stored_though_unavailable=stored_though_unavailable,
            nats_down_seconds=round(down_for, 2),
            unavailable_answers=refused,
            server_refused=recovered["messages_refused"],
            unavailable_for=recovered["unavailable_for"],
            **counts,
            **verdict.summary(),
        )
