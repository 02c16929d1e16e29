"""How fast the client CLI pipes a file: lines per second and client CPU per line.

Usage:
    .venv/bin/python scripts/bench_client.py [--lines 200000] [--rounds 5] \\
        [--args=-q] NAME=SRC [NAME=SRC ...]
    # this tree against another version of it:
    OLD=$(mktemp -d); git archive HEAD~1 src | tar -x -C $OLD
    .venv/bin/python scripts/bench_client.py before=$OLD/src now=src

One server (``python -m ackservice.server --store none`` from this tree, on a free port of
127.0.0.1, pinned to CPU 0) answers every client; each ``NAME=SRC`` is the client run from
the ``src`` directory SRC (``python -m ackservice.client``, pinned to CPU 1), fed a file of
``--lines`` 64-byte lines on stdin, its output to /dev/null. The clients take turns, the
order reversed every other round; each figure is the median of the rounds: the wall time
(lines per second) and the client's CPU (user + system, from ``os.wait4``) per line. A
measurement, not a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"the server did not listen on {HOST}:{port} within {timeout:g} s")


def run_client(src: str, port: int, lines: Path, args: list[str]) -> tuple[float, float]:
    """Pipe ``lines`` through the client of ``src``: wall seconds and CPU seconds."""
    argv = ["taskset", "-c", "1", sys.executable, "-m", "ackservice.client"]
    argv += ["--port", str(port), *args]
    env = {**os.environ, "PYTHONPATH": src}
    with lines.open("rb") as stdin:
        started = time.perf_counter()
        child = subprocess.Popen(
            argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"the client of {src} exited {child.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("clients", nargs="+", metavar="NAME=SRC")
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--args", default="-q", help="the client's flags (default: -q)")
    options = parser.parse_args()
    clients = [spec.split("=", 1) for spec in options.clients]
    if any(len(pair) != 2 for pair in clients):
        parser.error("each client is NAME=SRC")
    args = shlex.split(options.args)
    with tempfile.TemporaryDirectory() as tmp:
        lines = Path(tmp) / "lines.txt"
        with lines.open("wb") as out:
            for i in range(options.lines):
                out.write(b"line %09d %s\n" % (i, b"x" * 49))
        port = free_port()
        serve = ["--port", str(port), "--store", "none", "--log-level", "warning"]
        server = subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, "-m", "ackservice.server", *serve],
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        try:
            wait_for_port(port)
            results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in clients}
            for round_ in range(options.rounds):
                order = clients if round_ % 2 == 0 else clients[::-1]
                figures = []
                for name, src in order:
                    wall, cpu = run_client(src, port, lines, args)
                    results[name].append((wall, cpu))
                    figures.append(f"{name} {options.lines / wall:,.0f}/s")
                print(f"{round_:2d}  " + "  ".join(figures), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=20)
    print(f"\n{options.lines:,} lines, client flags {options.args!r}, medians of {options.rounds}:")
    for name, _ in clients:
        walls = [wall for wall, _ in results[name]]
        cpus = [cpu for _, cpu in results[name]]
        rate = options.lines / statistics.median(walls)
        per_line = statistics.median(cpus) / options.lines * 1e6
        print(f"{name:16s} {rate:10,.0f} lines/s  {per_line:6.2f} µs of client CPU per line")


if __name__ == "__main__":
    main()
