"""CRC-32 implementations side by side, in process: the cost per 64-byte message and per
16 KiB buffer (docs/benchmarks.md, "CRC-32"). Each must give zlib's result; the ones not
installed are skipped (``pip install isal zlib-ng deflate`` to compare them all).

    taskset -c 0 .venv/bin/python scripts/bench_crc.py
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time
import zlib
from collections.abc import Callable

_CANDIDATES = {
    "zlib": ("zlib", "crc32"),
    "isal": ("isal.isal_zlib", "crc32"),
    "zlib_ng": ("zlib_ng.zlib_ng", "crc32"),
    "deflate": ("deflate", "crc32"),
}


def _seconds_per_call(function: Callable[[], object], calls: int, repeat: int) -> float:
    rounds = []
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        rounds.append((time.perf_counter() - started) / calls)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls per round")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the median is shown")
    args = parser.parse_args()
    lines = [os.urandom(64) for _ in range(64)]
    big = os.urandom(16384)
    for name, (module_name, attribute) in _CANDIDATES.items():
        try:
            crc32 = getattr(importlib.import_module(module_name), attribute)
        except ImportError:
            print(f"{name:8s} not installed")
            continue
        assert [crc32(line) for line in lines] == [zlib.crc32(line) for line in lines]
        assert crc32(big) == zlib.crc32(big)
        per_line = _seconds_per_call(
            lambda crc32=crc32: list(map(crc32, lines)), args.calls, args.repeat
        )
        per_big = _seconds_per_call(lambda crc32=crc32: crc32(big), args.calls, args.repeat)
        print(
            f"{name:8s} {per_line / len(lines) * 1e9:6.0f} ns per 64-byte message"
            f"   {per_big * 1e6:6.2f} µs per 16 KiB"
        )


if __name__ == "__main__":
    main()
