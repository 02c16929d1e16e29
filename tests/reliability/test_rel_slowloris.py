"""Scenario 6, slowloris: 500 connections trickling a byte at a time without a newline and
500 silent ones, beside 50 normal clients. Each slow one is closed at the idle timeout;
the normal clients' round-trip p99 stays within 2x the unloaded figure."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from rel_checker import History, check, filler_block, make_payload
from rel_harness import ClientRun, ServerUnderTest, percentile, pick, pipelined_client

from conftest import Report, StartServer
from support import LineReader

SLOW_CLIENTS = Path(__file__).with_name("slow_clients.py")

IDLE_TIMEOUT = pick(3.0, 10.0)
# "A byte every few seconds" against a 300 s timeout; the same proportion here.
TRICKLE_INTERVAL = IDLE_TIMEOUT / 4
TRICKLING = 500
SILENT = 500
NORMAL = 50
UNLOADED_SECONDS = pick(0.75, 3.0)
# The slow connections all time out together; closing 1,000 connections (a final line, a
# half-close and a drain each) takes the server a moment, so "at the idle timeout" is
# judged with this much slack.
CLOSE_SLACK = 1.0
STORM_STALL_BOUND = 0.5
# A bound on the whole scenario.
WITHIN = 60.0


async def normal_clients(
    server: ServerUnderTest, history: History, stop: trio.Event, tag: str
) -> list[ClientRun]:
    """50 clients doing one round trip after another (window 1) until ``stop``."""
    filler = filler_block()
    runs: list[ClientRun] = []

    def payloads(client: int) -> Iterator[bytes]:
        for index in range(1_000_000):  # bounded; stop comes first
            if stop.is_set():
                return
            yield make_payload(f"{tag}{client}-{index}", 64, filler, index)

    async def one(client: int) -> None:
        runs.append(await pipelined_client(server.port, payloads(client), history, window=1))

    async with trio.open_nursery() as nursery:
        for client in range(NORMAL):
            nursery.start_soon(one, client)
    return runs


async def unloaded_round_trips(server: ServerUnderTest, history: History, tag: str) -> list[float]:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, UNLOADED_SECONDS)
        runs: list[ClientRun] = []

        async def measure() -> None:
            runs.extend(await normal_clients(server, history, stop, tag))

        nursery.start_soon(measure)
        await trio.sleep(UNLOADED_SECONDS)
        stop.set()
    return [rtt for run in runs for rtt in run.rtts]


async def _measure(
    server: ServerUnderTest, history: History
) -> tuple[list[dict[str, Any]], list[float], list[ClientRun], float]:
    """Round trips before, beside and after the slow crowd: the crowd's results, the
    unloaded round trips, the clients' runs beside the crowd, and when the crowd started."""
    with trio.fail_after(WITHIN):
        unloaded = await unloaded_round_trips(server, history, "before")
        spawned_at = trio.current_time()
        crowd = await trio.lowlevel.open_process(
            [
                sys.executable,
                str(SLOW_CLIENTS),
                *("--port", str(server.port), "--trickling", str(TRICKLING)),
                *("--silent", str(SILENT), "--interval", str(TRICKLE_INTERVAL)),
                *("--within", str(WITHIN)),
            ],
            stdout=subprocess.PIPE,
        )
        assert crowd.stdout is not None
        crowd_output = LineReader(crowd.stdout)
        try:
            assert await crowd_output.line() == b"ready"
            stop = trio.Event()
            loaded_runs: list[ClientRun] = []
            async with trio.open_nursery() as nursery:

                async def measure() -> None:
                    loaded_runs.extend(await normal_clients(server, history, stop, "during"))

                nursery.start_soon(measure)
                slow_results = json.loads(await crowd_output.line())
                stop.set()
            assert await crowd.wait() == 0
        finally:
            if crowd.poll() is None:
                crowd.kill()
        unloaded += await unloaded_round_trips(server, history, "after")
    return slow_results, unloaded, loaded_runs, spawned_at


def _held_and_storm(runs: list[ClientRun], storm_from: float) -> tuple[list[float], list[float]]:
    """The round trips answered while the slow connections were held (and trickled), and
    those from ``storm_from``, when they can all time out together: the time-out storm."""
    held: list[float] = []
    storm: list[float] = []
    for run in runs:
        for rtt, at in zip(run.rtts, run.replied_at, strict=True):
            (held if at < storm_from else storm).append(rtt)
    return held, storm


@pytest.mark.slow
@pytest.mark.timing
async def test_slow_connections_are_closed_at_the_idle_timeout(
    start_server: StartServer, report: Report
) -> None:
    """While 500 trickling and 500 silent connections hold slots, 50 normal clients keep
    doing round trips. Every slow connection is told ``ERR 0 idle-timeout`` and closed
    between the idle timeout and a second after it (trickled bytes do not count as
    activity). Beside the slow connections, the normal clients' p99 round trip is at most
    2x their p99 without them (measured before and after; once more if a first measurement
    misses, as a host hiccup can make it); when all 1,000 time out at
    once, no round trip takes 0.5 s. The checker validates the normal clients' messages."""
    server = await start_server(
        recording=True, flags=["--idle-timeout", str(IDLE_TIMEOUT), "--max-connections", "2000"]
    )
    history = History()
    # No garbage collection in this process while round trips are timed: a full collection
    # takes longer as the history grows, so it would fall on the later measurements (beside
    # the slow connections) more than on the first, unloaded ones, and time this process,
    # not the server.
    gc.disable()
    try:
        slow_results, unloaded, loaded_runs, spawned_at = await _measure(server, history)
    finally:
        gc.enable()

    assert len(slow_results) == TRICKLING + SILENT
    for result in slow_results:
        assert result["told"].startswith("ERR 0 idle-timeout "), result
        assert result["end"] == "eof", result
    # As the clients saw it (their clock starts when their connect returned, which can
    # lag the server's accept by a few ms in a process opening 1,000 connections) ...
    closed_after = sorted(result["after"] for result in slow_results)
    assert closed_after[0] >= IDLE_TIMEOUT - 0.1, closed_after[0]
    assert closed_after[-1] <= IDLE_TIMEOUT + CLOSE_SLACK, closed_after[-1]
    # The slow connections are held (and trickle) until the first of them can time out,
    # no earlier than IDLE_TIMEOUT after the crowd started; then they all time out
    # within a fraction of a second: the time-out storm.
    held, storm = _held_and_storm(loaded_runs, spawned_at + IDLE_TIMEOUT)
    loaded = held + storm
    # Closing 1,000 connections at once is a burst of work (a final line, a half-close,
    # a drain and a log event each) that delays everyone for a moment; docs/reliability.md
    # has the figures. Bounded generously here, so that only a real stall fails.
    assert max(storm) < STORM_STALL_BOUND, f"{max(storm) * 1000:.0f} ms round trip"
    await server.assert_healthy()
    # ... and as the server did: from its accept to the end of the drain.
    idle_closed = sorted(
        event["duration"]
        for event in server.events_named("connection_closed")
        if event["reason"] == "idle-timeout"
    )
    assert len(idle_closed) == TRICKLING + SILENT
    assert idle_closed[0] >= IDLE_TIMEOUT
    assert idle_closed[-1] <= IDLE_TIMEOUT + CLOSE_SLACK
    p99_unloaded = percentile(unloaded, 0.99)
    p99_held = percentile(held, 0.99)
    attempts = 1
    if p99_held > 2 * p99_unloaded:
        # Milliseconds on a shared 2-core host: one hiccup can be the 1% of a measurement.
        # A server that slows its other clients does so every time; measured once more
        # (the first crowd is gone: every slow connection was closed above), the same bound.
        attempts = 2
        gc.disable()
        try:
            _, unloaded, loaded_runs, spawned_at = await _measure(server, history)
        finally:
            gc.enable()
        held, _ = _held_and_storm(loaded_runs, spawned_at + IDLE_TIMEOUT)
        p99_unloaded = percentile(unloaded, 0.99)
        p99_held = percentile(held, 0.99)
    assert p99_held <= 2 * p99_unloaded, (
        f"p99 {p99_held * 1000:.2f} ms beside the slow connections, "
        f"{p99_unloaded * 1000:.2f} ms without (measured {attempts} times)"
    )
    verdict = check(history, server.records())
    verdict.assert_valid()
    report(
        idle_timeout_s=IDLE_TIMEOUT,
        slow_connections=TRICKLING + SILENT,
        closed_after_min_s=closed_after[0],
        closed_after_max_s=closed_after[-1],
        server_duration_min_s=idle_closed[0],
        server_duration_max_s=idle_closed[-1],
        attempts=attempts,
        round_trips_unloaded=len(unloaded),
        round_trips_beside=len(held),
        round_trips_storm=len(storm),
        p50_unloaded_ms=round(percentile(unloaded, 0.5) * 1000, 3),
        p99_unloaded_ms=round(p99_unloaded * 1000, 3),
        p50_beside_ms=round(percentile(held, 0.5) * 1000, 3),
        p99_beside_ms=round(p99_held * 1000, 3),
        p99_with_storm_ms=round(percentile(loaded, 0.99) * 1000, 3),
        max_in_storm_ms=round(max(storm) * 1000, 3),
        **verdict.summary(),
    )
