"""Presenting a run: the human summary, the ``--json`` document, the live progress line."""

from __future__ import annotations

from typing import Any, Final, TextIO

from .result import LoadResult, Snapshot
from .spawn import SpawnedServer
from .spec import LoadSpec

__all__ = ["PERCENTILES", "ProgressLine", "render_text", "to_json"]

# (label, JSON key, percent)
PERCENTILES: Final = (
    ("p50", "p50", 50.0),
    ("p90", "p90", 90.0),
    ("p99", "p99", 99.0),
    ("p99.9", "p99_9", 99.9),
)

# Above this share of one core, a load generator process is probably what limits the run.
_BUSY_CPU: Final = 0.9


def to_json(
    result: LoadResult, spec: LoadSpec, *, procs: int, server: SpawnedServer | None = None
) -> dict[str, Any]:
    """The machine-readable report (``--json``); docs/bench.md describes every field."""
    histogram = result.histogram
    latency: dict[str, Any] = {
        "count": histogram.count,
        "min": _us(histogram.min),
        "mean": round(histogram.mean / 1e3, 3),
    }
    for _, key, percent in PERCENTILES:
        latency[key] = _us(histogram.percentile(percent))
    latency["max"] = _us(histogram.max)
    return {
        "tool": "ackservice.bench",
        "target": {
            "host": spec.host,
            "port": spec.port,
            "spawned": server is not None,
        },
        "settings": {
            "connections": spec.connections,
            "window": spec.window,
            "size": spec.size,
            "duration": spec.duration,
            "messages": spec.messages,
            "warmup": spec.warmup,
            "rate": spec.rate,
            "churn": spec.churn,
            "procs": procs,
            "timeout": spec.reply_timeout,
            "connect_timeout": spec.connect_timeout,
            "tls": spec.tls is not None,
        },
        "mode": "closed-loop" if spec.rate is None else "open-loop",
        "interrupted": result.interrupted,
        "elapsed_s": round(result.elapsed, 6),
        "acks": result.acks,
        "acks_per_s": round(result.acks_per_second, 1),
        "mb_per_s": round(result.megabytes_per_second, 3),
        "connections_per_s": round(result.acks_per_second, 1) if spec.churn else None,
        "sent": result.sent,
        "replies": result.replies,
        "connections": result.connections,
        "latency_us": latency,
        "errors": {"total": result.error_total, **result.errors},
        "err_codes": dict(sorted(result.err_codes.items())),
        "client_cpu": {
            "seconds": round(sum(result.cpu), 3),
            "busiest_process": round(result.busiest_cpu, 3),
        },
        "server": None
        if server is None
        else {
            "pid": server.pid,
            "exit_code": server.exit_code,
            "log": None if server.exit_code == 0 else str(server.log_path),
        },
    }


def render_text(
    result: LoadResult, spec: LoadSpec, *, procs: int, server: SpawnedServer | None = None
) -> str:
    """The human summary printed at the end of a run."""
    where = f"{spec.host}:{spec.port}"
    if server is not None:
        where += f" (spawned server, pid {server.pid})"
    if spec.churn:
        load = f"{spec.connections:,} at a time: connect, one {spec.size:,}-byte message, close"
    else:
        load = (
            f"{spec.connections:,} connections x {spec.window:,} in flight, "
            f"{spec.size:,}-byte messages"
        )
    load += ", closed loop" if spec.rate is None else f", open loop at {spec.rate:,.0f} msg/s"
    load += f", {procs} process" + ("es" if procs > 1 else "")
    if spec.tls is not None:
        load += ", TLS"
    measured = f"{result.elapsed:.2f} s"
    if spec.warmup:
        measured += f" after a {spec.warmup:g} s warm-up"
    if result.interrupted:
        measured += " (interrupted)"
    rate = result.acks_per_second
    throughput = f"{rate:,.0f} acks/s   {result.megabytes_per_second:,.2f} MB/s"
    throughput += f"   {result.acks:,} acks"
    if spec.churn:
        throughput += f"   ({rate:,.0f} connections/s)"
    histogram = result.histogram
    if histogram.count:
        latency = "   ".join(
            f"{label} {_duration(histogram.percentile(percent))}"
            for label, _, percent in PERCENTILES
        )
        latency += f"   max {_duration(histogram.max)}"
    else:
        latency = "no samples"
    lines = [
        f"ackservice bench: {where}",
        _row("load", load),
        _row("measured", measured),
        _row("throughput", throughput),
        _row("latency", latency),
        _row("errors", _errors(result)),
    ]
    if result.busiest_cpu >= _BUSY_CPU:
        lines.append(
            _row(
                "note",
                f"a load generator process used {result.busiest_cpu:.0%} of a core, so it may "
                f"be what limits these numbers: try --procs {procs + 1}",
            )
        )
    if server is not None and server.exit_code not in (None, 0):
        lines.append(
            _row("server", f"exited with code {server.exit_code}; its log: {server.log_path}")
        )
    return "\n".join(lines) + "\n"


class ProgressLine:
    """A one-line live status on a terminal, rewritten in place (``\\r``)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last: Snapshot | None = None
        self._shown = False

    def update(self, snapshot: Snapshot) -> None:
        """Show ``snapshot``, with the reply rate since the previous one."""
        last = self._last
        self._last = snapshot
        rate = 0.0
        if last is not None and snapshot.elapsed > last.elapsed:
            rate = (snapshot.replies - last.replies) / (snapshot.elapsed - last.elapsed)
        phase = "measuring" if snapshot.measuring else "warming up / finishing"
        self._stream.write(
            f"\r{snapshot.elapsed:6.1f} s  {rate:>12,.0f} replies/s  "
            f"{snapshot.errors:,} errors  ({phase})\x1b[K"
        )
        self._stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Erase the line, before the summary is printed."""
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False


def _row(label: str, text: str) -> str:
    return f"  {label:<11} {text}"


def _errors(result: LoadResult) -> str:
    if not result.error_total:
        return "none"
    parts = []
    for kind, count in result.errors.items():
        if not count:
            continue
        if kind == "err_reply" and result.err_codes:
            codes = ", ".join(f"{code} {n:,}" for code, n in sorted(result.err_codes.items()))
            parts.append(f"err_reply {count:,} ({codes})")
        else:
            parts.append(f"{kind} {count:,}")
    return f"{result.error_total:,}: " + ", ".join(parts)


def _us(nanoseconds: int) -> float:
    return round(nanoseconds / 1e3, 3)


def _duration(nanoseconds: int) -> str:
    """A latency with a unit that keeps about three significant digits."""
    if nanoseconds < 10_000:
        return f"{nanoseconds / 1e3:.1f} µs"
    if nanoseconds < 1_000_000:
        return f"{nanoseconds / 1e3:.0f} µs"
    if nanoseconds < 1_000_000_000:
        return f"{nanoseconds / 1e6:.2f} ms"
    return f"{nanoseconds / 1e9:.2f} s"
