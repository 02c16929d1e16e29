"""Server CPU per ACK of several servers started once, measured round after round side by side.

Usage:
    .venv/bin/python scripts/cpu_per_ack_paired.py --bench "$B" --scenario pipe --rounds 10 \\
        "plain=src" "tls=src:tls"
    # two versions of one kind, both loaded at the same time:
    .venv/bin/python scripts/cpu_per_ack_paired.py --bench "$B" --scenario rr64 --together \\
        "before=$OLD/src:tls" "now=src:tls"

Each ``NAME=SOURCE[:tls]`` is ``python -m ackservice.server --store none`` (or ``--store``'s)
run from the ``src`` directory SOURCE (``:tls``: with the bench's certificates, loaded by
``loadgen_tls``). Every server is pinned to CPU 0 and every loadgen to CPU 1. The server's CPU
time (``/proc/PID/task/*/schedstat``, nanoseconds, all its threads) is taken at its loadgen's
own "# measure" and "# end" markers, so start-up and TLS handshakes are left out (except in
``churn``, where every connection is a handshake and one ACK: its figure is CPU per
connection).

By default each server is loaded alone in turn (bursts of ``--duration`` seconds, the order
reversed every other round). With ``--together`` all are loaded at once, sharing CPU 0: the
host's drift (20-50% on this shared machine within minutes) then hits all of them alike, and
the per-round ratio of two versions of the same server varies by a few percent instead of tens.
Compare only servers of one kind that way: servers sharing a core also share its caches, which
costs the one with the larger working set more (TLS against plain).

Printed: each round, then each server's median CPU per ACK and, for every server after the
first, the median of its per-round ratio to the first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cpu_per_ack import SCENARIOS, free_port, wait_until_listening


class Server:
    """One server process and the loadgen command that loads it."""

    def __init__(self, spec: str, bench: Path, store: str) -> None:
        self.name, source = spec.split("=", 1)
        source, _, kind = source.partition(":")
        self.port = free_port()
        argv = ["taskset", "-c", "0", "env", f"PYTHONPATH={source}", sys.executable]
        argv += ["-m", "ackservice.server", "--port", str(self.port)]
        argv += ["--store", store.format(name=self.name)]
        argv += ["--log-level", "info"]
        self.loadgen = [str(bench / "loadgen")]
        if kind == "tls":
            argv += ["--tls-cert", str(bench / "certs" / "server.pem")]
            argv += ["--tls-key", str(bench / "certs" / "server.key")]
            self.loadgen = [
                str(bench / "loadgen_tls"),
                "--tls",
                "--ca",
                str(bench / "certs/ca.pem"),
            ]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.samples: list[float] = []

    def on_cpu_ns(self) -> int:
        """Nanoseconds the server has run so far (user and system), all its threads (a
        store's worker thread too; a thread that ended meanwhile is not counted)."""
        total = 0
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
        return total

    def start_load(self, args: argparse.Namespace) -> subprocess.Popen[str]:
        argv = ["taskset", "-c", "1", *self.loadgen, "--port", str(self.port)]
        argv += ["--duration", str(args.duration), "--warmup", str(args.warmup)]
        argv += SCENARIOS[args.scenario]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def measure(servers: list[Server], args: argparse.Namespace) -> list[tuple[float, float]]:
    """Load ``servers`` at once: (server CPU µs per ACK, ACKs per second) of each."""
    loads = [server.start_load(args) for server in servers]
    marks: list[dict[str, int]] = [{} for _ in servers]
    # Each marker as soon as its loadgen writes it (stderr is unbuffered, a line a write).
    with selectors.DefaultSelector() as selector:
        for index, load in enumerate(loads):
            selector.register(load.stderr, selectors.EVENT_READ, index)  # type: ignore[arg-type]
        while selector.get_map():
            for key, _ in selector.select():
                line = key.fileobj.readline()  # type: ignore[union-attr]
                if not line:
                    selector.unregister(key.fileobj)
                elif line.startswith(("# measure", "# end")):
                    marks[key.data][line.strip()] = servers[key.data].on_cpu_ns()
    results = []
    for server, load, taken in zip(servers, loads, marks, strict=True):
        stdout, _ = load.communicate(timeout=args.duration + args.warmup + 30)
        result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
        if result["errors"] or len(taken) != 2:
            raise SystemExit(f"loadgen of {server.name}: {result}")
        cpu_us = (taken["# end"] - taken["# measure"]) / 1000 / result["acks"]
        results.append((cpu_us, result["acks"] / result["duration_s"]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", required=True, type=Path, help="shared/bench (built)")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="pipe")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--duration", type=float, default=2.0, help="measured seconds a load")
    parser.add_argument("--warmup", type=float, default=0.3, help="unmeasured seconds first")
    parser.add_argument("--together", action="store_true", help="load all servers at once")
    parser.add_argument(
        "--store",
        default="none",
        help="each server's --store, {name} and {dir} replaced (default none; e.g. "
        "'sqlite:{dir}/{name}.db', {dir} a temporary directory removed afterwards)",
    )
    parser.add_argument("servers", nargs="+", metavar="NAME=SOURCE[:tls]")
    args = parser.parse_args()
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="cpu-per-ack-") as directory:
        store = args.store.replace("{dir}", directory)
        run(servers, store, args)


def run(servers: list[Server], store: str, args: argparse.Namespace) -> None:
    try:
        servers.extend(Server(spec, args.bench, store) for spec in args.servers)
        for server in servers:
            wait_until_listening(server.process, server.port)
        for round_ in range(args.rounds):
            order = servers if round_ % 2 == 0 else servers[::-1]
            if args.together:
                results = measure(order, args)
            else:
                results = [measure([server], args)[0] for server in order]
            for server, (cpu_us, _) in zip(order, results, strict=True):
                server.samples.append(cpu_us)
            shown = (
                f"{server.name} {cpu_us:.3f} µs ({rate:,.0f}/s)"
                for server, (cpu_us, rate) in zip(order, results, strict=True)
            )
            print(f"{round_:2}  " + "  ".join(shown), flush=True)
    finally:
        for server in servers:
            server.process.terminate()
            server.process.wait(timeout=30)
    how = "together" if args.together else "each alone"
    print(f"\n{args.scenario}, {args.rounds} rounds of {args.duration:g} s ({how}), CPU per ACK:")
    first = servers[0]
    for server in servers:
        line = f"{server.name:16} median {statistics.median(server.samples):.3f} µs"
        if server is not first:
            ratios = [a / b for a, b in zip(server.samples, first.samples, strict=True)]
            line += f"; / {first.name} median {statistics.median(ratios):.3f}"
            line += f" [{' '.join(f'{ratio:.2f}' for ratio in ratios)}]"
        print(line)


if __name__ == "__main__":
    main()
