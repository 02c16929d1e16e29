"""Scenario 1, load: 200 connections x 500 messages, sizes 0 B to the limit, every reply
correct and in order (scaled down to 100 x 100 in the normal suite)."""

from __future__ import annotations

import random
import time

import pytest
import trio
from rel_checker import History, check, filler_block, make_payload
from rel_harness import ClientRun, percentile, pick, pipelined_client

from ackservice.protocol import DEFAULT_MAX_MESSAGE_BYTES
from conftest import Report, StartServer

CONNECTIONS = pick(100, 200)
MESSAGES = pick(100, 500)
WINDOW = 64


def message_size(rng: random.Random, limit: int) -> int:
    """0 and the limit itself often; in between log-uniform, so small and large sizes are
    both common (a uniform draw would make almost every message tens of KiB)."""
    draw = rng.random()
    if draw < 0.05:
        return 0
    if draw < 0.10:
        return limit
    return int(limit ** rng.random())


@pytest.mark.slow
@pytest.mark.parametrize("recording", [True, False], ids=["hook", "no-hook"])
async def test_many_pipelining_connections_get_every_reply_right_and_in_order(
    start_server: StartServer, report: Report, recording: bool
) -> None:
    """Every connection pipelines its messages (0 B to the limit, random bytes, a window of
    64) and gets exactly one reply per message, in order, each ACK carrying that message's
    length and CRC-32; the checker finds every acknowledged message recorded exactly once.
    Run with the application hook (payloads framed and recorded) and without it (the
    acknowledger's running checksums)."""
    server = await start_server(recording=recording)
    filler = filler_block()
    history = History()
    runs: list[ClientRun] = []
    sizes: list[int] = []

    def payloads(client: int) -> list[bytes]:
        rng = random.Random(client)
        out = []
        for index in range(MESSAGES):
            size = message_size(rng, DEFAULT_MAX_MESSAGE_BYTES)
            sizes.append(size)
            out.append(make_payload(f"c{client}-{index}", size, filler, rng.randrange(1 << 20)))
        return out

    async def one_client(client: int) -> None:
        runs.append(await pipelined_client(server.port, payloads(client), history, window=WINDOW))

    started = time.monotonic()
    with trio.fail_after(pick(60, 600)):
        async with trio.open_nursery() as nursery:
            for client in range(CONNECTIONS):
                nursery.start_soon(one_client, client)
    elapsed = time.monotonic() - started

    assert len(runs) == CONNECTIONS
    assert all(run.end == "eof" for run in runs), {run.end for run in runs}
    assert all(run.acked == MESSAGES and run.refused == 0 for run in runs)
    assert min(sizes) == 0
    assert max(sizes) == DEFAULT_MAX_MESSAGE_BYTES
    await server.assert_healthy()
    figures: dict[str, object] = {}
    if recording:
        verdict = check(history, server.records())
        verdict.assert_valid()
        assert verdict.recorded == CONNECTIONS * MESSAGES
        assert verdict.duplicates == 0
        figures = verdict.summary()
    rtts = [rtt for run in runs for rtt in run.rtts]
    report(
        connections=CONNECTIONS,
        messages=CONNECTIONS * MESSAGES,
        megabytes=round(sum(sizes) / 1e6, 1),
        seconds=round(elapsed, 2),
        messages_per_second=round(CONNECTIONS * MESSAGES / elapsed),
        p99_reply_ms=round(percentile(rtts, 0.99) * 1000, 1),
        **figures,
    )
