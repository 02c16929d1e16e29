"""How fast the SQLite store commits: messages/s and commits/s at a few batch sizes.

Usage: python3 scripts/bench_sqlite_store.py [--dir DIR] [--seconds S]

Each batch size runs for about S seconds (default 3) against a fresh store file in DIR
(default: a temporary directory under the working directory, so on the disk the server would
use, not a tmpfs). Batches of 1 show the cost of one durable commit (an fsync of the WAL);
larger batches show what group commit buys. A measurement, not a test: the figures depend
on the disk.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import zlib
from pathlib import Path

import trio

from ackservice.store.base import Message
from ackservice.store.sqlite import SQLiteStore

BATCH_SIZES = (1, 64, 1024)
PAYLOAD = b"x" * 64


def make_batch(size: int) -> list[Message]:
    """``size`` messages of 64 bytes, as the server would hand them over."""
    now = time.time()
    crc = zlib.crc32(PAYLOAD)
    return [Message(PAYLOAD, crc, now, "127.0.0.1:40000", 1, seq) for seq in range(size)]


async def measure(path: Path, size: int, seconds: float) -> tuple[int, int, float]:
    """Commit batches of ``size`` for about ``seconds``; return commits, messages, elapsed."""
    batch = make_batch(size)
    store = await SQLiteStore.open(path)
    commits = 0
    try:
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            await store.store(batch)
            commits += 1
        elapsed = time.perf_counter() - start
    finally:
        await store.aclose()
    return commits, commits * size, elapsed


async def run(directory: Path, seconds: float) -> None:
    """Measure every batch size and print one row each."""
    print(f"store files in {directory}, ~{seconds:g} s per batch size, 64-byte messages")
    print(f"{'batch':>6} {'commits':>8} {'messages':>9} {'commits/s':>10} {'messages/s':>11}")
    for size in BATCH_SIZES:
        commits, messages, elapsed = await measure(directory / f"bench-{size}.db", size, seconds)
        print(
            f"{size:>6} {commits:>8} {messages:>9} {commits / elapsed:>10.0f} "
            f"{messages / elapsed:>11.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to put the store files")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per batch size")
    args = parser.parse_args()
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        trio.run(run, args.dir, args.seconds)
        return
    with tempfile.TemporaryDirectory(prefix="bench-sqlite-", dir=".") as directory:
        trio.run(run, Path(directory).resolve(), args.seconds)


if __name__ == "__main__":
    main()
