"""Server CPU time per ACK (or per connection, for churn), servers interleaved, medians.

Usage:
    python3 scripts/cpu_per_ack.py --loadgen "$B/loadgen" --scenario rr64 --repeat 3 \\
        "ackservice=.venv/bin/python -m ackservice.server --port {port} --log-level info" \\
        "ref_asyncio_streams=$B/.venv/bin/python $B/ref_asyncio_streams.py --port {port}"
    # over TLS: the TLS loadgen, and the certificates in the commands
    python3 scripts/cpu_per_ack.py --loadgen "$B/loadgen_tls" \\
        --loadgen-args "--tls --ca $B/certs/ca.pem" --scenario rr64 \\
        "ackservice=.venv/bin/python -m ackservice.server --port {port} --store none \\
            --tls-cert $B/certs/server.pem --tls-key $B/certs/server.key"

Each server runs pinned to CPU 0 and the shared/bench load generator to CPU 1, on 127.0.0.1, for
a bounded time; the figure is the server's user + system CPU time (from /proc) divided by the
ACKs the load generator verified. Unlike throughput, it is not inflated by time stolen by other
work on a noisy machine, so it compares two versions of the server more reliably; the verdict on
issue 5's targets is still the same-run throughput ratio of shared/bench's run.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass

# The load of each of shared/bench's scenarios, as its run.py defines them.
SCENARIOS = {
    "rr64": ["--conns", "64", "--window", "1", "--size", "64"],
    "pipe": ["--conns", "16", "--window", "64", "--size", "64"],
    "big": ["--conns", "8", "--window", "8", "--size", "16384"],
    "churn": ["--churn", "--conns", "16", "--size", "64"],
}
HOST = "127.0.0.1"
START_TIMEOUT = 20.0


@dataclass
class Sample:
    rate: float
    user_us: float
    system_us: float
    errors: int

    @property
    def cpu_us(self) -> float:
        return self.user_us + self.system_us


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def wait_until_listening(server: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with status {server.returncode}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
        except OSError:
            time.sleep(0.05)
        else:
            return
    raise SystemExit(f"server did not listen on {HOST}:{port} within {START_TIMEOUT:g} s")


def measure(command: str, loadgen: str, scenario: str, duration: float, extra: list[str]) -> Sample:
    port = free_port()
    argv = ["taskset", "-c", "0", *command.replace("{port}", str(port)).split()]
    server = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until_listening(server, port)
        time.sleep(0.3)
        user_before, system_before = cpu_seconds(server.pid)
        load_argv = ["taskset", "-c", "1", loadgen, "--port", str(port)]
        load_argv += ["--duration", str(duration), "--warmup", "0", *SCENARIOS[scenario], *extra]
        load = subprocess.run(
            load_argv,
            capture_output=True,
            text=True,
            check=True,
            timeout=duration + 30,
        )
        user_after, system_after = cpu_seconds(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = json.loads(load.stdout.strip().splitlines()[-1])
    acks = result["acks"]
    return Sample(
        rate=acks / result["duration_s"],
        user_us=(user_after - user_before) / acks * 1e6,
        system_us=(system_after - system_before) / acks * 1e6,
        errors=result["errors"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loadgen", required=True, help="shared/bench's compiled loadgen")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="rr64")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over all servers")
    parser.add_argument(
        "--loadgen-args",
        default="",
        help='more loadgen flags, e.g. "--tls --ca $B/certs/ca.pem" with loadgen_tls',
    )
    parser.add_argument("servers", nargs="+", metavar="NAME=COMMAND")
    args = parser.parse_args()
    servers = dict(spec.split("=", 1) for spec in args.servers)
    samples: dict[str, list[Sample]] = {name: [] for name in servers}
    unit = "connection" if args.scenario == "churn" else "ACK"
    for _ in range(args.repeat):
        for name, command in servers.items():  # interleaved, so drifts hit all alike
            sample = measure(
                command, args.loadgen, args.scenario, args.duration, shlex.split(args.loadgen_args)
            )
            samples[name].append(sample)
            print(
                f"{name:24} {sample.rate:12,.0f}/s  {sample.cpu_us:7.2f} µs CPU per {unit} "
                f"(user {sample.user_us:.2f}, system {sample.system_us:.2f}), "
                f"errors {sample.errors}",
                flush=True,
            )
    print(f"\nmedians over {args.repeat} rounds, {args.scenario}:")
    for name, taken in samples.items():
        print(
            f"{name:24} {statistics.median(s.rate for s in taken):12,.0f}/s  "
            f"{statistics.median(s.cpu_us for s in taken):7.2f} µs CPU per {unit} "
            f"(user {statistics.median(s.user_us for s in taken):.2f})"
        )


if __name__ == "__main__":
    main()
