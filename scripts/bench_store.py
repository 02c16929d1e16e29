"""The server with each store under the shared/bench C load generator, and JetStream's ceiling.

Usage:
    .venv/bin/python scripts/bench_store.py --loadgen "$B/loadgen" --rounds 3

For each round, servers interleaved: ``python -m ackservice.server`` with ``--store none``,
``--store sqlite:<tmp>/store.db`` and ``--store nats://127.0.0.1:<port>/BENCH`` (a real
nats-server from the venv, JetStream with ``sync_interval: always``), each under the
request/response load (64 connections x 1 in flight) and the pipelined one (16 x 64), as
shared/bench's rr64 and pipe define them. Then a plain asyncio nats-py program publishes the
same 64-byte messages as atomic batches of 1,000 to the same nats-server for the same time,
one batch in flight (what the pipelined load, 1,024 messages in flight, allows the server)
and eight (the most JetStream takes from one publisher here): the server's pipelined figure
is compared with the first. The server runs pinned to CPU 0 and the load generator to
CPU 1, on 127.0.0.1; every run is bounded by ``--duration``. Prints one line per run and the
medians; ``store commits/s`` is the server's own count (``store_commits`` in its
``shutdown_complete`` event): with SQLite (WAL, synchronous=FULL) each commit is one fsync of
the log.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ackservice.bench.spawn import start_server
from ackservice.store.url import JetStreamURL, parse_store_url
from bench_jetstream import make_messages, plain_asyncio  # type: ignore[import-not-found]
from nats_support import NatsServer  # type: ignore[import-not-found]

HOST = "127.0.0.1"
LOADS = {
    "rr64": ["--conns", "64", "--window", "1", "--size", "64"],
    "pipe": ["--conns", "16", "--window", "64", "--size", "64"],
}


def run_server(store: str, scenario: str, loadgen: str, duration: float) -> dict:
    # The bench's own spawner: a free port learned from --port-file, a temporary working
    # directory (where a relative sqlite: path lands), removed by stop().
    server = start_server(HOST, ["--store", store, "--log-level", "info"])
    try:
        for task in os.listdir(f"/proc/{server.pid}/task"):  # every thread, the store's too
            os.sched_setaffinity(int(task), {0})
        started = time.monotonic()
        load = [*LOADS[scenario], "--duration", str(duration), "--warmup", "1"]
        out = subprocess.run(
            ["taskset", "-c", "1", loadgen, "--port", str(server.port), *load],
            capture_output=True,
            text=True,
            timeout=duration + 30,
            check=True,
        ).stdout
        elapsed = time.monotonic() - started
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)
        log = server.log_path.read_text()  # before stop(), which removes it
    finally:
        server.stop()
    result = json.loads(out.strip().splitlines()[-1])
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    done = next(e for e in events if e["event"] == "shutdown_complete")
    result["commits_per_s"] = done.get("store_commits", 0) / elapsed
    return result


def plain_publisher(url: JetStreamURL, duration: float, in_flight: int) -> float:
    """Messages per second of the plain asyncio publisher (pinned to CPU 0, like the server),
    atomic batches of 1,000 with ``in_flight`` of them at once."""
    import asyncio

    os.sched_setaffinity(0, {0})
    try:
        messages = make_messages(2_000_000)
        stored, elapsed = asyncio.run(plain_asyncio(url, messages, 1000, in_flight, duration))
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return stored / elapsed


_SHOWN = ("acks_per_s", "p50_us", "p99_us", "commits_per_s")


def _line(result: dict) -> str:
    return (
        f"{result['acks_per_s']:>10,.0f} acks/s  p50 {result['p50_us']:>7,.0f} us"
        f"  p99 {result['p99_us']:>7,.0f} us  commits/s {result['commits_per_s']:>6,.0f}"
        f"  errors {result['errors']}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loadgen", required=True, help="shared/bench's compiled loadgen")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="ackservice-bench-store-") as tmp:
        nats = NatsServer(Path(tmp) / "nats")
        nats.start()
        try:
            nats_url = f"nats://127.0.0.1:{nats.port}/BENCH"
            stores = {"none": "none", "sqlite": "", "nats": nats_url}
            for round_number in range(1, args.rounds + 1):
                for name, store in stores.items():
                    for scenario in LOADS:
                        # A relative path: a fresh file in the spawned server's own directory.
                        url = store or "sqlite:store.db"
                        result = run_server(url, scenario, args.loadgen, args.duration)
                        results.setdefault(f"{name} {scenario}", []).append(result)
                        print(f"round {round_number} {name:6s} {scenario:4s} {_line(result)}")
                parsed = parse_store_url(nats_url)
                assert isinstance(parsed, JetStreamURL)
                # 1 in flight: what the pipelined load's 1,024 messages in flight allow; 8 in
                # flight: the most this JetStream server takes from one publisher.
                for in_flight in (1, 8):
                    rate = plain_publisher(parsed, args.duration, in_flight)
                    key = f"plain publisher 1000x{in_flight}"
                    results.setdefault(key, []).append({"acks_per_s": rate})
                    print(f"round {round_number} {key} {rate:>10,.0f} msgs/s")
        finally:
            nats.stop()
    print("\nmedians:")
    for key, runs in results.items():
        medians = {k: statistics.median(run[k] for run in runs) for k in runs[0] if k in _SHOWN}
        print(f"{key:28s} " + "  ".join(f"{k} {v:,.0f}" for k, v in medians.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
