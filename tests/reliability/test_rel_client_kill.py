"""Scenario 3, the client killed: ``python -m ackservice.client`` SIGKILLed mid-stream, twice,
during a 100,000-message send (20,000 in the normal suite); the server stays up, logs no
traceback, and its memory goes back near the baseline."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from rel_checker import History, check, filler_block, make_payload, message_key, record_keys
from rel_harness import ServerUnderTest, pick, poll_until

from ackservice.protocol import message_line
from conftest import Report, StartServer

MESSAGES = pick(20_000, 100_000)
KILLS = 2
# Each killed run is stopped once the server has recorded this share of what it was given.
KILL_AFTER_SHARE = 0.3
# RSS after the run, against the baseline taken after start-up and one warm-up exchange.
# Python keeps freed memory in its allocator's arenas, so "near" is a few MiB, not zero.
RSS_GROWTH_LIMIT = 4 * 1024 * 1024


def client_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ACKSERVICE_")}


async def run_client(
    server: ServerUnderTest, payloads: list[bytes], workdir: Path, name: str, *, kill_at: int
) -> tuple[int | None, list[dict[str, object]]]:
    """Pipe ``payloads`` through ``python -m ackservice.client --json``; SIGKILL it once the
    server has recorded ``kill_at`` messages in all (0: let it finish). Returns its exit
    code (None when killed) and the JSON replies it printed before it ended."""
    stdin_path = workdir / f"{name}.in"
    stdout_path = workdir / f"{name}.out"
    stdin_path.write_bytes(b"".join(message_line(payload) for payload in payloads))
    with stdin_path.open("rb") as stdin, stdout_path.open("wb") as stdout:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "ackservice.client", "--port", str(server.port), "--json"],
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            env=client_env(),
        )
        try:
            with trio.fail_after(pick(60, 300)):
                if kill_at:
                    await poll_until(
                        lambda: len(server.records()) >= kill_at or process.poll() is not None,
                        0.005,
                    )
                    assert process.poll() is None, "the client finished before it was killed"
                    process.kill()
                    await process.wait()
                    code = None
                else:
                    code = await process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                await process.wait()
    replies = [json.loads(line) for line in stdout_path.read_text().splitlines() if line]
    return code, replies


@pytest.mark.slow
async def test_client_killed_mid_stream_twice(
    start_server: StartServer, report: Report, tmp_path: Path
) -> None:
    """A supervisor pipes every message not yet acknowledged to a fresh client process: the
    first two are SIGKILLed mid-stream (each once the server recorded 30% of its input),
    the third finishes with exit code 0. The server logs no traceback, its descriptors
    return to the baseline, and its RSS ends within 4 MiB of the baseline. The checker:
    every ACK a client printed is recorded, nothing unexpected, and a message recorded
    twice was handed to two clients (it was unacknowledged when its client died)."""
    server = await start_server(recording=True)
    filler = filler_block()
    rng = random.Random(3)
    payloads = {
        f"x{i}": make_payload(f"x{i}", rng.randint(16, 1500), filler, rng.randrange(1 << 20))
        for i in range(MESSAGES)
    }
    history = History()
    unacked = list(payloads)
    exit_codes: list[int | None] = []
    for run in range(KILLS + 1):
        given = [payloads[key] for key in unacked]
        for key in unacked:
            # The client writes what it is given, once (it never loses its connection here).
            history.written(key, payloads[key])
        kill_at = 0
        if run < KILLS:
            kill_at = len(server.records()) + int(len(given) * KILL_AFTER_SHARE)
        code, replies = await run_client(server, given, tmp_path, f"client{run}", kill_at=kill_at)
        exit_codes.append(code)
        acked = set()
        for reply in replies:
            assert reply["status"] == "acked", reply
            key = unacked[int(reply["message"]) - 1]  # type: ignore[call-overload]
            crc32 = int(reply["crc32"], 16)  # type: ignore[call-overload]
            history.acked(key, int(reply["nbytes"]), crc32)  # type: ignore[call-overload]
            acked.add(key)
        unacked = [key for key in unacked if key not in acked]

    assert exit_codes == [None, None, 0]
    assert not unacked
    await server.assert_healthy()
    rss_growth = server.rss() - server.baseline_rss
    assert rss_growth < RSS_GROWTH_LIMIT, f"RSS grew {rss_growth / 2**20:.1f} MiB"
    records = server.records()
    assert {message_key(p, "", 0) for p in payloads.values()} <= set(record_keys(records))
    verdict = check(history, records)
    # A client killed in the middle of a write leaves a partial last line, which the
    # protocol's end-of-stream rule (bytes before a clean EOF are a final message) hands
    # to the application; docs/reliability.md discusses it. Counted, reported, allowed.
    verdict.assert_valid(torn_allowed=True)
    report(
        messages=MESSAGES,
        kills=KILLS,
        rss_growth_kib=rss_growth // 1024,
        closed_reasons=sorted({e["reason"] for e in server.events_named("connection_closed")}),
        **verdict.summary(),
    )
