"""How much the Trio-to-asyncio bridge of the JetStream store costs, on loopback.

(a) a plain asyncio nats-py program publishes N 64-byte messages as atomic batches of B
messages with K in flight; (b) the same messages go through ``JetStreamStore.store()`` from
Trio, in calls of B*K messages (the store keeps K atomic batches of B in flight per call,
as in (a)). Both send the same headers, so the difference is the bridge and the store's
bookkeeping. Prints msgs/s for each and the ratio (store / plain; the target is >= 0.9).

Starts its own nats-server (from the venv, JetStream, ``sync_interval: always``, a
temporary directory) unless given ``--nats-url``. Each variant runs at most ``--seconds``.

    .venv/bin/python scripts/bench_jetstream.py
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import secrets
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import nats
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ackservice.store import Message
from ackservice.store import jetstream as jetstream_module
from ackservice.store.jetstream import JetStreamStore
from ackservice.store.url import JetStreamURL, parse_store_url
from nats_support import NatsServer  # type: ignore[import-not-found]

PAYLOAD = bytes(range(64))


def make_messages(count: int) -> list[Message]:
    now = time.time()
    crc = zlib.crc32(PAYLOAD)
    return [Message(PAYLOAD, crc, now, "127.0.0.1:40000", 1, seq) for seq in range(1, count + 1)]


async def plain_asyncio(
    url: JetStreamURL, messages: Sequence[Message], batch: int, in_flight: int, seconds: float
) -> tuple[int, float]:
    """(a): atomic batches straight from asyncio; returns (messages stored, elapsed)."""
    nc = await nats.connect(servers=[url.servers])
    run_id = secrets.token_hex(8)
    numbers = itertools.count(1)
    slots = asyncio.Semaphore(in_flight)
    deadline = time.monotonic() + seconds

    async def publish(chunk: Sequence[Message]) -> int:
        async with slots:
            if time.monotonic() > deadline:
                return 0
            batch_id = f"{run_id}-{next(numbers)}"
            for number, message in enumerate(chunk, 1):
                headers = jetstream_module._message_headers(
                    message, f"{run_id}.{message.conn_id}.{message.seq}"
                )
                headers["Nats-Batch-Id"] = batch_id
                headers["Nats-Batch-Sequence"] = str(number)
                if number < len(chunk):
                    await nc.publish(url.subject, message.payload, headers=headers)
                else:
                    headers["Nats-Batch-Commit"] = "1"
                    reply = await nc.request(
                        url.subject, message.payload, timeout=10, headers=headers
                    )
                    error = json.loads(reply.data).get("error")
                    if error is not None:
                        raise RuntimeError(f"batch refused: {error}")
            return len(chunk)

    start = time.perf_counter()
    counts = await asyncio.gather(
        *(publish(messages[i : i + batch]) for i in range(0, len(messages), batch))
    )
    elapsed = time.perf_counter() - start
    await nc.close()
    return sum(counts), elapsed


async def through_store(
    url: JetStreamURL, messages: Sequence[Message], call_size: int, seconds: float
) -> tuple[int, float]:
    """(b): ``JetStreamStore.store()`` from Trio; returns (messages stored, elapsed)."""
    store = await JetStreamStore.open(url, ack_timeout=10)
    stored = 0
    try:
        deadline = time.monotonic() + seconds
        start = time.perf_counter()
        for i in range(0, len(messages), call_size):
            if time.monotonic() > deadline:
                break
            chunk = messages[i : i + call_size]
            await store.store(chunk)
            stored += len(chunk)
        elapsed = time.perf_counter() - start
    finally:
        await store.aclose()
    return stored, elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", help="an existing JetStream server (loopback only)")
    parser.add_argument("--messages", type=int, default=40_000, help="per variant and run")
    parser.add_argument("--seconds", type=float, default=5.0, help="cap per variant and run")
    parser.add_argument("--runs", type=int, default=2, help="runs per variant; best one counts")
    parser.add_argument(
        "--variants",
        default="1000x1,1000x4,1000x8,100x8",
        help="comma-separated BATCHxIN_FLIGHT",
    )
    args = parser.parse_args(argv)
    server = None
    if args.nats_url is None:
        server = NatsServer(Path(tempfile.mkdtemp(prefix="bench-jetstream-")) / "nats")
        server.start()
        nats_url = server.url
    else:
        nats_url = args.nats_url
    try:
        parsed = parse_store_url(f"{nats_url}/BENCH")
        assert isinstance(parsed, JetStreamURL)
        # The store creates the stream; the plain program then publishes into it.
        trio.run(through_store, parsed, make_messages(1), 1, 1.0)
        print(f"nats-server {nats_url}, {args.messages} x 64-byte messages, best of {args.runs}")
        print(f"{'B x K':>9} {'plain asyncio':>15} {'store (Trio)':>14} {'ratio':>6}")
        for variant in args.variants.split(","):
            batch, in_flight = (int(part) for part in variant.split("x"))
            plain_rate = store_rate = 0.0
            for _ in range(args.runs):
                messages = make_messages(args.messages)
                count, elapsed = asyncio.run(
                    plain_asyncio(parsed, messages, batch, in_flight, args.seconds)
                )
                plain_rate = max(plain_rate, count / elapsed)
                messages = make_messages(args.messages)
                count, elapsed = trio.run(
                    through_store, parsed, messages, batch * in_flight, args.seconds
                )
                store_rate = max(store_rate, count / elapsed)
            print(
                f"{variant:>9} {plain_rate:>11,.0f} m/s {store_rate:>10,.0f} m/s "
                f"{store_rate / plain_rate:>6.2f}"
            )
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
