"""Scaling over cores: acks/s and server CPU per ACK with --workers 1 and 2, same run, medians.

Usage:
    python3 scripts/bench_workers.py --loadgen "$B/loadgen" --scenarios pipe,rr64 \\
        --store none --repeat 3 --workers 1,2

Unlike cpu_per_ack.py nothing is pinned: the workers must be free to use every core (the load
generator shares them, as it would on any 2-core machine). The server is started with
``--port-file``, which the supervisor writes once every worker serves; the CPU is that of
the whole process tree (supervisor and workers, from psutil), divided by the ACKs the load
generator verified. Rounds interleave the worker counts, so drifts of this shared machine hit
both alike; the ratio of each round is taken before the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from cpu_per_ack import SCENARIOS, free_port

START_TIMEOUT = 30.0


def tree_cpu(process: psutil.Process) -> float:
    """User + system CPU seconds of ``process`` and its children now."""
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def measure(
    workers: int, store: str, loadgen: str, scenario: str, duration: float
) -> tuple[float, float]:
    """(acks/s, server CPU µs per ACK) of one run."""
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        port_file = Path(directory) / "port"
        store_url = store.replace("{dir}", directory)
        argv = [
            sys.executable, "-m", "ackservice.server", "--port", str(port), "--workers",
            str(workers), "--store", store_url, "--port-file", str(port_file),
            "--log-level", "warning",
        ]  # fmt: skip
        server = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not port_file.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"server did not start: {argv}")
                time.sleep(0.05)
            time.sleep(0.3)
            tree = psutil.Process(server.pid)
            before = tree_cpu(tree)
            load = subprocess.run(
                [loadgen, "--port", str(port), "--duration", str(duration), "--warmup", "0",
                 *SCENARIOS[scenario]],
                capture_output=True, text=True, check=True, timeout=duration + 30,
            )  # fmt: skip
            after = tree_cpu(tree)
        finally:
            server.terminate()
            server.wait(timeout=30)
    result = json.loads(load.stdout.strip().splitlines()[-1])
    if result["errors"] if isinstance(result["errors"], int) else any(result["errors"].values()):
        print(f"  loadgen errors: {result['errors']}", flush=True)
    acks = result["acks"]
    return acks / result["duration_s"], (after - before) / acks * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loadgen", required=True)
    parser.add_argument("--scenarios", default="pipe,rr64")
    parser.add_argument("--workers", default="1,2", help="worker counts, compared to the first")
    parser.add_argument("--store", default="none", help="--store of the server ({dir}: a tmp dir)")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    for scenario in args.scenarios.split(","):
        runs: dict[int, list[tuple[float, float]]] = {n: [] for n in counts}
        for _ in range(args.repeat):
            for n in counts:
                rate, cpu = measure(n, args.store, args.loadgen, scenario, args.duration)
                runs[n].append((rate, cpu))
                print(f"{scenario} store={args.store} workers={n}: {rate:,.0f} acks/s, "
                      f"{cpu:.2f} µs CPU per ACK", flush=True)  # fmt: skip
        base = counts[0]
        for n in counts[1:]:
            speed = [r[0] / b[0] for r, b in zip(runs[n], runs[base], strict=True)]
            cost = [r[1] / b[1] for r, b in zip(runs[n], runs[base], strict=True)]
            print(
                f"== {scenario} store={args.store}: workers {n} vs {base}: acks/s x "
                f"{statistics.median(speed):.2f} (runs {', '.join(f'{s:.2f}' for s in speed)}), "
                f"CPU per ACK x {statistics.median(cost):.2f} "
                f"(runs {', '.join(f'{c:.2f}' for c in cost)}); medians "
                f"{statistics.median(r[0] for r in runs[base]):,.0f} -> "
                f"{statistics.median(r[0] for r in runs[n]):,.0f} acks/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
