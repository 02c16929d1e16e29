"""How long ``python -m ackservice.store export`` takes to read a JetStream stream back, and
how much memory it holds meanwhile: one source tree against another, interleaved, in one run.

    .venv/bin/python scripts/bench_export.py --tree /tmp/old/src --tree src
    .venv/bin/python scripts/bench_export.py --tree src --messages 200 --size 900000
    .venv/bin/python scripts/bench_export.py --tree /tmp/old/src --tree src --follow

Starts its own nats-server (from the venv, JetStream, a temporary directory), stores
``--messages`` messages of ``--size`` bytes through ``JetStreamStore``, then runs the export
(``--format lines`` into /dev/null) once per tree per round, the trees in turn, so that a
noisy machine slows both alike. With ``--follow`` it runs ``export --follow`` instead, timed
until the last stored message is written, then interrupts it. Each tree is a directory
holding the ``ackservice`` package (a checkout's ``src``, or ``git archive REV src``
unpacked); the export runs with it first on ``PYTHONPATH``. Prints each run's wall time
and peak RSS (the export process's ``ru_maxrss``) and each tree's medians. A measurement,
not a test.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ackservice.store import Message
from ackservice.store.jetstream import JetStreamStore
from ackservice.store.url import JetStreamURL, parse_store_url
from nats_support import NatsServer  # type: ignore[import-not-found]

STREAM = "BENCH"


async def fill(url: JetStreamURL, count: int, size: int) -> None:
    """Store ``count`` messages of ``size`` bytes, in calls of at most ~8 MB."""
    payload = bytes(index % 251 for index in range(size)).replace(b"\n", b" ")
    crc = zlib.crc32(payload)
    per_call = max(1, min(8000, 8_000_000 // max(size, 1)))
    store = await JetStreamStore.open(url, ack_timeout=30)
    try:
        now = time.time()
        for first in range(1, count + 1, per_call):
            last = min(count, first + per_call - 1)
            batch = [
                Message(payload, crc, now, "127.0.0.1:40000", 1, seq)
                for seq in range(first, last + 1)
            ]
            await store.store(batch)
    finally:
        await store.aclose()


def export_once(tree: Path, store_url: str) -> tuple[float, float]:
    """One export into /dev/null with ``tree`` on PYTHONPATH: (seconds, peak RSS in MiB)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "ackservice.store", "export", "--store", store_url]
    with open(os.devnull, "wb") as devnull:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=devnull, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"export with {tree} exited {process.returncode}")
    return elapsed, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def follow_once(tree: Path, store_url: str, count: int) -> tuple[float, float]:
    """``export --follow`` until ``count`` lines came out, then Ctrl-C: (seconds to the
    last line, peak RSS in MiB)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "ackservice.store", "export", "--store", store_url]
    started = time.perf_counter()
    process = subprocess.Popen([*command, "--follow"], stdout=subprocess.PIPE, env=env)
    assert process.stdout is not None
    lines = 0
    while lines < count:
        data = process.stdout.read1(1 << 20)
        if not data:
            raise RuntimeError(f"export --follow with {tree} ended after {lines} lines")
        lines += data.count(b"\n")
    elapsed = time.perf_counter() - started
    os.kill(process.pid, signal.SIGINT)
    _, _, usage = os.wait4(process.pid, 0)
    process.returncode = 0  # reaped by wait4
    process.stdout.close()
    return elapsed, usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tree", action="append", required=True, type=Path, help="a src directory (repeat)"
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=64, help="payload bytes per message")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--follow", action="store_true", help="time export --follow")
    args = parser.parse_args(argv)
    server = NatsServer(Path(tempfile.mkdtemp(prefix="bench-export-")) / "nats")
    server.start()
    try:
        store_url = f"{server.url}/{STREAM}"
        parsed = parse_store_url(store_url)
        assert isinstance(parsed, JetStreamURL)
        trio.run(fill, parsed, args.messages, args.size)
        mode = "export --follow" if args.follow else "export"
        print(f"{mode}: {args.messages} messages of {args.size} bytes, {args.rounds} rounds")
        times: dict[Path, list[float]] = {tree: [] for tree in args.tree}
        peaks: dict[Path, list[float]] = {tree: [] for tree in args.tree}
        for round_number in range(1, args.rounds + 1):
            for tree in args.tree:
                if args.follow:
                    elapsed, peak = follow_once(tree, store_url, args.messages)
                else:
                    elapsed, peak = export_once(tree, store_url)
                times[tree].append(elapsed)
                peaks[tree].append(peak)
                print(f"round {round_number} {tree}: {elapsed:.2f} s, peak RSS {peak:.0f} MiB")
        for tree in args.tree:
            print(
                f"median {tree}: {statistics.median(times[tree]):.2f} s, "
                f"peak RSS {statistics.median(peaks[tree]):.0f} MiB"
            )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
