#!/usr/bin/env python3
"""Run the reliability scenarios (tests/reliability) and print their figures.

    .venv/bin/python scripts/reliability.py                 # the scaled-down suite (~40 s)
    .venv/bin/python scripts/reliability.py --full          # the issue's full figures
    .venv/bin/python scripts/reliability.py --full --fuzz-runs 1000000
    .venv/bin/python scripts/reliability.py -k slowloris    # extra arguments go to pytest

The normal test suite (``scripts/check``) already runs every scenario scaled down;
``--full`` runs them at the figures of the issue (200 x 500 messages, 100,000-message
kills, 10,000 hostile streams, a 10 s slowloris timeout, ...). ``--fuzz-runs N`` then
runs the atheris harness (scripts/fuzz_framer.py; ``pip install atheris`` first) for N
executions. Everything is bounded: pytest is stopped after ``--timeout`` seconds (30
minutes by default with ``--full``), the fuzzer after ``--fuzz-seconds``. Only loopback
addresses are used.

The figures each scenario measured are appended, one JSON object per test, to
``--results`` (default: reliability-results.jsonl in a temporary directory) and
printed as a table at the end. The exit code is pytest's, or 1 if fuzzing failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUZZ_HARNESS = ROOT / "scripts" / "fuzz_framer.py"


def run_bounded(command: list[str], env: dict[str, str], timeout: float) -> int:
    """Run ``command`` in its own process group; stop the whole group after ``timeout``."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"reliability: stopping after {timeout:g} s (--timeout)", file=sys.stderr)
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        return 124
    except KeyboardInterrupt:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise


def run_scenarios(args: argparse.Namespace, pytest_args: list[str], results: Path) -> int:
    env = {
        **os.environ,
        "RELIABILITY_SCALE": "full" if args.full else "quick",
        "RELIABILITY_RESULTS": str(results),
    }
    command = [sys.executable, "-m", "pytest", "tests/reliability", "-p", "no:cacheprovider"]
    command += ["-q", "-rfEx", *pytest_args]
    timeout = args.timeout or (1800.0 if args.full else 600.0)
    return run_bounded(command, env, timeout)


def run_fuzzer(runs: int, seconds: float, workdir: Path) -> tuple[int, str]:
    """The atheris harness for ``runs`` executions (or ``seconds``); its exit code and a
    one-line summary."""
    corpus = workdir / "fuzz-corpus"
    corpus.mkdir(exist_ok=True)
    log = workdir / "fuzz.log"
    command = [
        sys.executable,
        str(FUZZ_HARNESS),
        str(corpus),
        f"-atheris_runs={runs + 1}",  # atheris counts the initial empty input as one
        "-max_len=2048",
        f"-max_total_time={int(seconds)}",
        "-print_final_stats=1",
        f"-artifact_prefix={workdir}/",
    ]
    started = time.monotonic()
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=workdir, stdout=output, stderr=subprocess.STDOUT)
        try:
            code = process.wait(seconds + 120)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
    elapsed = time.monotonic() - started
    text = log.read_text(errors="replace")
    # libFuzzer's last line: "Done 1000001 in 1570 second(s)".
    finished = re.findall(r"^Done (\d+) in (\d+) second", text, re.MULTILINE)
    done = finished[-1][0] if finished else "?"
    crashes = "no crash" if code == 0 else f"FAILED (exit {code}): see {log}"
    return code, f"fuzz_framer: {done} executions in {elapsed:.0f} s, {crashes}"


def print_table(results: Path) -> None:
    if not results.exists():
        print("reliability: no figures were reported", file=sys.stderr)
        return
    print(f"\nFigures by scenario (also in {results}):")
    for line in results.read_text().splitlines():
        entry = json.loads(line)
        test = entry.pop("test").removeprefix("tests/reliability/")
        for key in ("scale", "time"):
            entry.pop(key, None)
        figures = ", ".join(f"{key} {value}" for key, value in entry.items())
        print(f"- {test}\n    {figures}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="run the issue's full figures")
    parser.add_argument(
        "--timeout", type=float, default=0.0, help="stop pytest after this many seconds"
    )
    parser.add_argument("--results", type=Path, help="file to append the figures to")
    parser.add_argument(
        "--fuzz-runs", type=int, default=0, help="then fuzz the framer this many executions"
    )
    parser.add_argument(
        "--fuzz-seconds", type=float, default=3600.0, help="stop fuzzing after this long"
    )
    args, pytest_args = parser.parse_known_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="ackservice-reliability-"))
    results = args.results or workdir / "reliability-results.jsonl"
    code = run_scenarios(args, pytest_args, results)
    print_table(results)
    if args.fuzz_runs:
        fuzz_code, summary = run_fuzzer(args.fuzz_runs, args.fuzz_seconds, workdir)
        print(summary)
        code = code or (1 if fuzz_code else 0)
    return code


if __name__ == "__main__":
    sys.exit(main())
