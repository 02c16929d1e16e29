"""How fast the SQLite store commits: messages/s, commits/s and CPU per message.

Usage: python3 scripts/bench_sqlite_store.py [--dir DIR] [--seconds S]

Each batch shape runs for about S seconds (default 3) against a fresh store file in DIR
(default: a temporary directory under the working directory, so on the disk the server would
use, not a tmpfs). A shape is ``CONNS x PER_READ``: the batch holds, for each of CONNS
connections, one read's worth of PER_READ consecutive messages, as the server hands them
over. ``1 x 1`` shows the cost of one durable commit (an fsync of the WAL; the first line, a
bare ``fdatasync`` loop, is the disk's own floor under it); ``64 x 1`` a
request/response round over 64 connections; ``16 x 64`` pipelining clients. CPU is
``time.process_time`` (every thread of the process) per message stored. A measurement, not a
test: the figures depend on the disk and the CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import trio

from ackservice.store.batch import MessageBatch, MessageRun
from ackservice.store.sqlite import SQLiteStore

SHAPES = ((1, 1), (64, 1), (16, 64), (16, 256))
PAYLOAD = b"x" * 64


def make_batch(conns: int, per_read: int, first_seq: int) -> MessageBatch:
    """``conns`` runs of ``per_read`` 64-byte messages, as the server hands them over."""
    now = time.time()
    crc = zlib.crc32(PAYLOAD)
    return MessageBatch(
        [
            MessageRun(
                [PAYLOAD] * per_read,
                [crc] * per_read,
                now,
                f"127.0.0.1:{40000 + conn}",
                conn,
                first_seq,
            )
            for conn in range(1, conns + 1)
        ]
    )


async def measure(
    path: Path, conns: int, per_read: int, seconds: float
) -> tuple[int, int, float, float]:
    """Commit batches of one shape for about ``seconds``; return commits, messages, elapsed
    wall seconds and CPU seconds."""
    # Built once, outside the timing: the figures are the store's cost alone.
    batch = make_batch(conns, per_read, 1)
    store = await SQLiteStore.open(path)
    commits = 0
    try:
        start = time.perf_counter()
        cpu_start = time.process_time()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            await store.store(batch)
            commits += 1
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
    finally:
        await store.aclose()
    return commits, commits * conns * per_read, elapsed, cpu


def fsync_floor(path: Path, seconds: float) -> tuple[float, float]:
    """The disk's own limit under the 1x1 shape: 8 KiB appended and ``fdatasync``ed, in a
    loop; returns syncs per second and the median wait in milliseconds."""
    waits = []
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            os.write(descriptor, b"x" * 8192)
            started = time.perf_counter()
            os.fdatasync(descriptor)
            waits.append(time.perf_counter() - started)
    finally:
        os.close(descriptor)
        path.unlink()
    return len(waits) / seconds, statistics.median(waits) * 1e3


async def run(directory: Path, seconds: float) -> None:
    """Measure every shape and print one row each."""
    print(f"store files in {directory}, ~{seconds:g} s per shape, 64-byte messages")
    syncs, wait_ms = fsync_floor(directory / "fsync-floor", seconds)
    print(f"the disk: {syncs:.0f} fdatasyncs/s of 8 KiB appends, median {wait_ms:.2f} ms each")
    print(
        f"{'shape':>9} {'commits':>8} {'messages':>9} {'commits/s':>10} {'messages/s':>11}"
        f" {'CPU us/msg':>11}"
    )
    for conns, per_read in SHAPES:
        commits, messages, elapsed, cpu = await measure(
            directory / f"bench-{conns}x{per_read}.db", conns, per_read, seconds
        )
        print(
            f"{f'{conns}x{per_read}':>9} {commits:>8} {messages:>9} {commits / elapsed:>10.0f} "
            f"{messages / elapsed:>11.0f} {cpu / messages * 1e6:>11.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to put the store files")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per shape")
    args = parser.parse_args()
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        trio.run(run, args.dir, args.seconds)
        return
    with tempfile.TemporaryDirectory(prefix="bench-sqlite-", dir=".") as directory:
        trio.run(run, Path(directory).resolve(), args.seconds)


if __name__ == "__main__":
    main()
