"""What a run measured: ``LoadResult`` (mergeable across processes) and live ``Snapshot``s."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .histogram import LatencyHistogram
from .verify import ERROR_KINDS

__all__ = ["LoadResult", "Progress", "Snapshot"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Live counters for a progress line."""

    elapsed: float  # seconds since the load started (warm-up included)
    measuring: bool
    replies: int
    errors: int


@dataclass(slots=True)
class LoadResult:
    """What one run measured; results of several processes ``merge``.

    Attributes:
        histogram: latencies (ns) of the correctly answered messages sent in the window.
        elapsed: seconds the measurement window lasted (the longest, when merged).
        acks: correct replies received in the window.
        replies: correct replies received in the whole run (warm-up included).
        sent: messages sent in the whole run.
        connections: connections opened.
        errors: counts per kind (every kind of ``ERROR_KINDS`` is present).
        err_codes: ``ERR`` lines per code.
        cpu: CPU seconds each process used during its window.
        size: payload bytes per message.
    """

    histogram: LatencyHistogram
    elapsed: float
    acks: int
    replies: int
    sent: int
    connections: int
    errors: dict[str, int]
    err_codes: dict[str, int]
    cpu: list[float]
    size: int
    processes: int = 1
    interrupted: bool = False
    cpu_elapsed: list[float] = field(default_factory=list)

    @property
    def error_total(self) -> int:
        """Errors of every kind."""
        return sum(self.errors.values())

    @property
    def acks_per_second(self) -> float:
        return self.acks / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def megabytes_per_second(self) -> float:
        """Payload megabytes (10**6 bytes) acknowledged per second."""
        return self.acks_per_second * self.size / 1e6

    @property
    def busiest_cpu(self) -> float:
        """The largest share of one core a load generator process used in its window."""
        shares = [
            cpu / span for cpu, span in zip(self.cpu, self.cpu_elapsed, strict=True) if span > 0
        ]
        return max(shares, default=0.0)

    @classmethod
    def merge(cls, results: list[LoadResult]) -> LoadResult:
        """Combine the results of processes that ran side by side."""
        histogram = LatencyHistogram()
        errors = dict.fromkeys(ERROR_KINDS, 0)
        err_codes: dict[str, int] = {}
        for result in results:
            histogram.merge(result.histogram)
            for kind, count in result.errors.items():
                errors[kind] = errors.get(kind, 0) + count
            for code, count in result.err_codes.items():
                err_codes[code] = err_codes.get(code, 0) + count
        return cls(
            histogram=histogram,
            elapsed=max((r.elapsed for r in results), default=0.0),
            acks=sum(r.acks for r in results),
            replies=sum(r.replies for r in results),
            sent=sum(r.sent for r in results),
            connections=sum(r.connections for r in results),
            errors=errors,
            err_codes=err_codes,
            cpu=[cpu for r in results for cpu in r.cpu],
            cpu_elapsed=[span for r in results for span in r.cpu_elapsed],
            size=results[0].size if results else 0,
            processes=sum(r.processes for r in results),
            interrupted=any(r.interrupted for r in results),
        )

    def to_dict(self) -> dict[str, Any]:
        """A picklable, JSON-able form, for ``from_dict`` in another process."""
        return {
            "histogram": self.histogram.to_dict(),
            "elapsed": self.elapsed,
            "acks": self.acks,
            "replies": self.replies,
            "sent": self.sent,
            "connections": self.connections,
            "errors": dict(self.errors),
            "err_codes": dict(self.err_codes),
            "cpu": list(self.cpu),
            "cpu_elapsed": list(self.cpu_elapsed),
            "size": self.size,
            "processes": self.processes,
            "interrupted": self.interrupted,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadResult:
        fields = dict(data)
        fields["histogram"] = LatencyHistogram.from_dict(data["histogram"])
        return cls(**fields)


Progress = Callable[[Snapshot], None]
"""Receives live counters about once a second (the progress line)."""
