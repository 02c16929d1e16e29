"""Median same-run ratios of ackservice against the references, from shared/bench run.py results.

Usage: python3 scripts/bench_ratios.py run1.json run2.json run3.json

Prints the tables of docs/benchmarks.md: each run's ratio against each target of issue 5 with
the median, then every server's median figure per scenario. Only ratios within one run are
compared, since the machine is too noisy for absolute figures to carry across runs.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

# (scenario, reference server, least ratio ackservice / reference), from issue 5.
TARGETS = [
    ("pipe", "ref_asyncio_uvloop", 1.2),
    ("pipe", "ref_epoll", 0.5),
    ("big", "ref_asyncio_uvloop", 1.0),
    ("rr64", "ref_asyncio_streams", 1.0),
    ("rr64", "ref_trio", 1.5),
    ("churn", "ref_trio", 1.0),
]
IDLE_KIB_TARGET = 4.0
SCENARIOS = ["rr1", "rr64", "pipe", "big", "churn", "idle"]


def figure(scenario: str, result: dict[str, Any]) -> float:
    """The scenario's headline figure: KiB per connection, connections/s or acks/s."""
    key = {"idle": "kib_per_conn", "churn": "connections_per_s"}.get(scenario, "acks_per_s")
    return float(result[key])


def main(paths: list[str]) -> None:
    runs = [json.loads(Path(path).read_text()) for path in paths]

    def of(run: dict[str, Any], server: str, scenario: str) -> float:
        return figure(scenario, run["servers"][server]["scenarios"][scenario])

    header = " | ".join(f"run {i}" for i in range(1, len(runs) + 1))
    print(f"| scenario | against | target | {header} | median | met |")
    print("|---|---|---|" + "---|" * len(runs) + "---|---|")
    for scenario, reference, target in TARGETS:
        ratios = [of(run, "ackservice", scenario) / of(run, reference, scenario) for run in runs]
        median = statistics.median(ratios)
        cells = " | ".join(f"{ratio:.2f}" for ratio in ratios)
        met = "yes" if median >= target else "no"
        print(f"| {scenario} | {reference} | ≥ {target} | {cells} | **{median:.2f}** | {met} |")
    idle = [of(run, "ackservice", "idle") for run in runs]
    median_idle = statistics.median(idle)
    cells = " | ".join(f"{value:.1f}" for value in idle)
    met = "yes" if median_idle <= IDLE_KIB_TARGET else "no"
    target = f"≤ {IDLE_KIB_TARGET:g}"
    print(f"| idle | KiB/connection | {target} | {cells} | **{median_idle:.1f}** | {met} |")

    servers = list(runs[0]["servers"])
    print()
    print("| server | " + " | ".join(SCENARIOS) + " |")
    print("|---|" + "---|" * len(SCENARIOS))
    for server in servers:
        medians = [statistics.median(of(run, server, sc) for run in runs) for sc in SCENARIOS]
        print(f"| {server} | " + " | ".join(f"{value:,.1f}" for value in medians) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
