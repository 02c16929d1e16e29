"""The load tester, ``python -m ackservice.bench``: verifying load, honest latencies.

In-process use: ``result = await run_load(LoadSpec(port=9876, connections=8, window=16))``;
``render_text`` and ``to_json`` present it. docs/bench.md explains what is measured.
"""

from __future__ import annotations

from .histogram import LatencyHistogram
from .load import LoadGenerator, run_load
from .report import render_text, to_json
from .result import LoadResult
from .spec import LoadSpec

__all__ = [
    "LatencyHistogram",
    "LoadGenerator",
    "LoadResult",
    "LoadSpec",
    "render_text",
    "run_load",
    "to_json",
]
