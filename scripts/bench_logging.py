"""CPU cost of one rendered log event in the logging thread: structlog's stock processors
(as logconfig had them) against logconfig's own.

Usage:
    taskset -c 0 .venv/bin/python scripts/bench_logging.py [--events 20000] [--repeats 7]

Logging is configured as the CLI does (``configure_logging``, JSON lines) onto /dev/null,
through the same queue and writer thread; "stock" then swaps in the former processor chain
(``TimeStamper(fmt="iso", utc=True)`` and ``JSONRenderer()``). Two events are measured, as the
server logs them for every connection, with a connection's context bound: a
``connection_opened`` (no fields of its own) and a ``connection_closed`` (its summary fields).
The figure is the calling thread's CPU time (``time.thread_time_ns``) per event, the part the
event loop's thread pays: the writer thread's writes are not in it. Each repeat alternates the
two chains; the median of the repeats is printed. Pin it to one CPU so that runs compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog

from ackservice.logconfig import configure_logging, flush_logging, log_events_dropped

# Everything fits the queue: a dropped event would cost less than a written one.
_QUEUE_BOUND = 10_000_000

_CLOSED: dict[str, Any] = {
    "reason": "eof",
    "messages": 120,
    "acked": 119,
    "errors": 1,
    "bytes": 7_680,
    "duration": 1.234567,
}


def _stock_processors() -> list[structlog.types.Processor]:
    """The chain logconfig configured before it rendered with orjson and cached timestamps."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(),
    ]


def _configure(chain: str, devnull: Any) -> None:
    configure_logging("info", "json", stream=devnull, max_queued_events=_QUEUE_BOUND)
    if chain == "stock":
        # Only the processors change: the same sink, queue and writer thread.
        structlog.configure(processors=_stock_processors())


def _microseconds_per_event(
    info: Callable[..., Any], event: str, fields: dict[str, Any], events: int
) -> float:
    started = time.thread_time_ns()
    for _ in range(events):
        info(event, **fields)
    return (time.thread_time_ns() - started) / events / 1_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="events timed per repeat")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    chains = ("stock", "logconfig")
    kinds = ("connection_opened", "connection_closed")
    results: dict[tuple[str, str], list[float]] = {(c, k): [] for c in chains for k in kinds}
    structlog.contextvars.bind_contextvars(conn_id=123_456, peer="127.0.0.1:54321")
    with open(os.devnull, "w") as devnull:
        for _ in range(args.repeats):
            for chain in chains:
                _configure(chain, devnull)
                log = structlog.get_logger("ackservice.server.connection")
                log.info("warm_up")  # the first call caches the configured logger
                for kind, fields in (("connection_opened", {}), ("connection_closed", _CLOSED)):
                    results[chain, kind].append(
                        _microseconds_per_event(log.info, kind, fields, args.events)
                    )
                flush_logging(5.0)
                if log_events_dropped():
                    print("events were dropped: the figures are too low", file=sys.stderr)
                    return 1

    print(f"us per event (thread CPU), median of {args.repeats} x {args.events} events")
    print(f"{'event':<20}{'stock':>9}{'logconfig':>11}{'saved':>9}")
    for kind in kinds:
        stock = statistics.median(results["stock", kind])
        ours = statistics.median(results["logconfig", kind])
        print(f"{kind:<20}{stock:>9.2f}{ours:>11.2f}{1 - ours / stock:>9.0%}")
    pair_stock = sum(statistics.median(results["stock", kind]) for kind in kinds)
    pair_ours = sum(statistics.median(results["logconfig", kind]) for kind in kinds)
    print(f"{'per connection (2)':<20}{pair_stock:>9.2f}{pair_ours:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
