"""An HDR-style latency histogram: log-linear buckets, bounded memory, mergeable.

Recording a latency costs a few integer operations and one list update, whatever the number
of samples; memory is a fixed array of counters (about 4,700, under 40 KiB), so a benchmark
of a billion messages holds no more than one of a thousand. Like Gil Tene's HdrHistogram,
which wrk2 and most serious load generators use, the buckets are linear inside each power of
two: values below 256 get a bucket each (exact), and every octave above is split into 128
equal buckets, so any value is known to within 1/256 of itself (0.39%) when a bucket is
reported by its midpoint. Histograms with this layout merge by adding their counters, which
is how ``--procs`` combines its worker processes without shipping samples around.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["RELATIVE_ERROR", "LatencyHistogram"]

# 128 buckets per octave. 7 bits is HdrHistogram's "2 significant digits" setting: fine
# enough for p99.9 at microsecond latencies, coarse enough to stay a few KiB.
_SUB_BUCKET_BITS: Final = 7
_SUB_BUCKETS: Final = 1 << _SUB_BUCKET_BITS
_EXACT_LIMIT: Final = 2 * _SUB_BUCKETS  # values below this get a bucket each

# Largest value told apart from the others: 2**43 ns is about 2.4 hours, beyond any run
# (runs are capped at an hour). Larger values land in the top bucket; ``max`` stays exact.
_VALUE_BITS: Final = 43
_TOP_SHIFT: Final = _VALUE_BITS - _SUB_BUCKET_BITS - 1
_BUCKETS: Final = (_TOP_SHIFT << _SUB_BUCKET_BITS) + _EXACT_LIMIT

RELATIVE_ERROR: Final = 1 / _EXACT_LIMIT
"""Bound on |reported - true| / true for any percentile (values below 256 are exact)."""


def _bucket(value: int) -> int:
    """The index of the bucket that holds ``value`` (>= 0)."""
    if value < _EXACT_LIMIT:
        return value
    shift = value.bit_length() - _SUB_BUCKET_BITS - 1
    if shift > _TOP_SHIFT:
        return _BUCKETS - 1
    # value >> shift lies in [128, 256): the position inside the octave, offset by 128.
    return (shift << _SUB_BUCKET_BITS) + (value >> shift)


def _midpoint(index: int) -> int:
    """The value that stands for every value in bucket ``index``."""
    if index < _EXACT_LIMIT:
        return index
    shift = (index >> _SUB_BUCKET_BITS) - 1
    lowest = (index - (shift << _SUB_BUCKET_BITS)) << shift
    return lowest + (1 << shift >> 1)


class LatencyHistogram:
    """Counts of non-negative integer values (nanoseconds) in log-linear buckets.

    Percentiles are within ``RELATIVE_ERROR`` of the exact nearest-rank percentile of the
    recorded values; ``min`` and ``max`` are exact.
    """

    __slots__ = ("_counts", "count", "max", "min", "total")

    def __init__(self) -> None:
        self._counts = [0] * _BUCKETS
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def record(self, value: int, count: int = 1) -> None:
        """Add ``count`` samples of ``value``; negative values count as 0."""
        if value < 0:
            value = 0
        if self.count == 0 or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self._counts[_bucket(value)] += count
        self.count += count
        self.total += value * count

    def merge(self, other: LatencyHistogram) -> None:
        """Add every sample of ``other`` to this histogram."""
        if other.count == 0:
            return
        if self.count == 0 or other.min < self.min:
            self.min = other.min
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total
        self._counts = [a + b for a, b in zip(self._counts, other._counts, strict=True)]

    @property
    def mean(self) -> float:
        """The arithmetic mean of the recorded values (exact), 0.0 when empty."""
        return self.total / self.count if self.count else 0.0

    def percentile(self, percent: float) -> int:
        """The nearest-rank ``percent``-th percentile (0 to 100); 0 when empty.

        Reported as the midpoint of its bucket, clamped to the exact min and max, so
        ``percentile(100)`` is the exact maximum.
        """
        if not 0 <= percent <= 100:
            raise ValueError(f"percent must be from 0 to 100, got {percent}")
        if self.count == 0:
            return 0
        rank = max(1, math.ceil(percent / 100 * self.count))
        if rank >= self.count:
            return self.max  # the largest sample is known exactly
        seen = 0
        for index, bucket_count in enumerate(self._counts):
            seen += bucket_count
            if seen >= rank:
                return min(max(_midpoint(index), self.min), self.max)
        return self.max  # unreachable while count matches the buckets

    def to_dict(self) -> dict[str, Any]:
        """A JSON- and pickle-friendly form (only non-empty buckets), for ``from_dict``."""
        return {
            "count": self.count,
            "total": self.total,
            "min": self.min,
            "max": self.max,
            "buckets": {str(i): n for i, n in enumerate(self._counts) if n},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyHistogram:
        """Rebuild a histogram from ``to_dict`` output (possibly from another process)."""
        histogram = cls()
        histogram.count = int(data["count"])
        histogram.total = int(data["total"])
        histogram.min = int(data["min"])
        histogram.max = int(data["max"])
        for index, bucket_count in data["buckets"].items():
            histogram._counts[int(index)] = int(bucket_count)
        return histogram

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatencyHistogram):
            return NotImplemented
        summary = (self.count, self.total, self.min, self.max)
        return summary == (other.count, other.total, other.min, other.max) and (
            self._counts == other._counts
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by content

    def __repr__(self) -> str:
        return f"<LatencyHistogram count={self.count} min={self.min} max={self.max}>"
