"""Prometheus metrics, counted in plain integers and rendered only when scraped.

The hot path counts nothing for metrics: connections already keep their own counts (for the
``connection_closed`` summary), the handler sums them when a connection closes, and the
committer records one latency per commit. A scrape reads those integers, adds the counts of
the connections still open (so a connection that has pipelined for an hour is counted now),
and renders them with prometheus-client's exposition code. A ``Counter.inc()`` per message
would cost ~300 ns each, half the CPU of a pipelined ACK (measured for issue #12).

A ``Snapshot`` is plain data (JSON-able), so a supervisor can gather the snapshots of its
workers and render them all in one scrape, each labelled with its ``worker``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import trio
from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from ..logconfig import log_events_dropped
from .committing import GroupCommitter
from .handler import AckHandler
from .monitoring import MonitoringApp, serve_monitoring

__all__ = ["AckServiceCollector", "Snapshot", "metrics_registry", "serve_metrics", "snapshot"]

Snapshot = dict[str, Any]
"""What one worker's metrics hold at one moment; see ``snapshot``."""

# messages_total's result label, in the order of Connection.error_kinds.
_ERROR_RESULTS = ("too_large", "rejected", "unavailable", "internal_error")


def snapshot(handler: AckHandler) -> Snapshot:
    """The handler's counts now: totals of closed connections plus the open ones' counts."""
    stats = handler.stats
    messages = stats.messages
    errors = stats.errors
    received = stats.bytes_received
    kinds = [stats.too_large, stats.rejected, stats.unavailable, stats.internal_error]
    for connection in handler._connections:
        messages += connection.messages
        errors += connection.errors
        received += connection.bytes_received
        if connection.error_kinds is not None:
            for index, count in enumerate(connection.error_kinds):
                kinds[index] += count
    results = {"acked": messages - errors, **dict(zip(_ERROR_RESULTS, kinds, strict=True))}
    committer = handler.committer
    store: dict[str, Any] | None = None
    if isinstance(committer, GroupCommitter):
        latency = committer.latency
        store = {
            "up": committer.available,
            "commits": committer.commits,
            "outages": committer.outages,
            "latency_bounds": list(latency.bounds),
            "latency_counts": list(latency.counts),
            "latency_sum": latency.total,
        }
    return {
        "connections_active": stats.active,
        "connections_total": stats.connections,
        "messages": results,
        "bytes_received": received,
        "refused": {
            "busy": stats.refused_busy,
            "forbidden": stats.refused_forbidden,
            "shutting_down": stats.refused_shutting_down,
        },
        "store": store,
        "log_events_dropped": log_events_dropped(),
        "shutting_down": handler.shutting_down,
        "process": _process_usage(),
    }


def _process_usage() -> dict[str, float]:
    """This process's CPU seconds and resident memory, so that a supervisor can show each
    worker's (prometheus-client's ProcessCollector describes only the process it runs in)."""
    times = os.times()
    usage = {"cpu_seconds": times.user + times.system, "resident_bytes": 0.0}
    try:
        with open("/proc/self/statm", "rb") as statm:
            usage["resident_bytes"] = float(
                int(statm.read().split()[1]) * os.sysconf("SC_PAGESIZE")
            )
    except (OSError, ValueError, IndexError):  # not Linux
        pass
    return usage


class AckServiceCollector(Collector):
    """Renders ``ackservice_*`` metric families from snapshots taken at scrape time.

    Args:
        snapshots: called at each scrape; ``(worker, snapshot)`` pairs, one per worker.
    """

    def __init__(self, snapshots: Any) -> None:
        self._snapshots = snapshots

    def describe(self) -> list[Metric]:
        return []  # not known before a scrape; the registry then does not call collect early

    def collect(self) -> Iterator[Metric]:
        yield from render(self._snapshots())


def render(workers: Sequence[tuple[str, Snapshot]]) -> Iterable[Metric]:
    """The metric families of ``workers``' snapshots, each sample labelled ``worker``."""
    prefix = "ackservice_"
    active = GaugeMetricFamily(
        prefix + "connections_active", "Connections being served now.", labels=["worker"]
    )
    total = CounterMetricFamily(
        prefix + "connections", "Connections accepted and served.", labels=["worker"]
    )
    messages = CounterMetricFamily(
        prefix + "messages",
        "Messages answered, by result: acked, or the ERR code (too_large, rejected, "
        "unavailable, internal_error).",
        labels=["worker", "result"],
    )
    received = CounterMetricFamily(
        prefix + "bytes_received", "Bytes read from clients.", labels=["worker"]
    )
    refused = CounterMetricFamily(
        prefix + "refused_connections",
        "Connections refused with ERR 0, by reason (busy, forbidden, shutting_down).",
        labels=["worker", "reason"],
    )
    dropped = CounterMetricFamily(
        prefix + "log_events_dropped",
        "Log events dropped because the log output was full or failing.",
        labels=["worker"],
    )
    shutting_down = GaugeMetricFamily(
        prefix + "shutting_down", "1 once a graceful shutdown began.", labels=["worker"]
    )
    store_up = GaugeMetricFamily(
        prefix + "store_up",
        "1 while the store takes messages, 0 during an outage.",
        labels=["worker"],
    )
    commits = CounterMetricFamily(
        prefix + "store_commits", "Store commits (each holds many messages).", labels=["worker"]
    )
    outages = CounterMetricFamily(
        prefix + "store_outages",
        "Store outages: runs of failed commits (each logged once as store_unavailable).",
        labels=["worker"],
    )
    latency = HistogramMetricFamily(
        prefix + "store_commit_seconds",
        "How long each store commit took (the store's time, not the ACKs written after it).",
        labels=["worker"],
    )
    cpu = CounterMetricFamily(
        prefix + "process_cpu_seconds",
        "User and system CPU time of the worker's process.",
        labels=["worker"],
    )
    memory = GaugeMetricFamily(
        prefix + "process_resident_memory_bytes",
        "Resident memory of the worker's process.",
        labels=["worker"],
    )
    has_store = False
    for worker, snap in workers:
        labels = [worker]
        active.add_metric(labels, snap["connections_active"])
        total.add_metric(labels, snap["connections_total"])
        for result, count in snap["messages"].items():
            messages.add_metric([worker, result], count)
        received.add_metric(labels, snap["bytes_received"])
        for reason, count in snap["refused"].items():
            refused.add_metric([worker, reason], count)
        dropped.add_metric(labels, snap["log_events_dropped"])
        shutting_down.add_metric(labels, int(snap["shutting_down"]))
        cpu.add_metric(labels, snap["process"]["cpu_seconds"])
        memory.add_metric(labels, snap["process"]["resident_bytes"])
        store = snap["store"]
        if store is None:
            continue
        has_store = True
        store_up.add_metric(labels, int(store["up"]))
        commits.add_metric(labels, store["commits"])
        outages.add_metric(labels, store["outages"])
        buckets = []
        cumulative = 0
        for bound, count in zip(
            [*store["latency_bounds"], float("inf")], store["latency_counts"], strict=True
        ):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        latency.add_metric(labels, buckets, store["latency_sum"])
    families: list[Metric] = [
        active,
        total,
        messages,
        received,
        refused,
        dropped,
        shutting_down,
        cpu,
        memory,
    ]
    if has_store:
        families += [store_up, commits, outages, latency]
    return families


def metrics_registry(collector: Collector, *, process: bool = True) -> CollectorRegistry:
    """A registry of its own (never the global one an embedding application may use) with
    ``collector`` and, if ``process``, this process's CPU, memory and descriptors."""
    from prometheus_client import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
    return registry


async def serve_metrics(
    listeners: list[trio.SocketListener],
    handler: AckHandler,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` (``handler``'s counts, as worker 0), ``/healthz`` and ``/readyz``
    on ``listeners`` until cancelled."""
    registry = metrics_registry(AckServiceCollector(lambda: [("0", snapshot(handler))]))
    committer = handler.committer

    def store_available() -> bool:
        return committer.available if isinstance(committer, GroupCommitter) else True

    app = MonitoringApp(
        lambda: generate_latest(registry),
        accepting=lambda: not handler.shutting_down,
        store_available=store_available,
    )
    await serve_monitoring(listeners, app, task_status=task_status)
