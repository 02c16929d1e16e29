"""The latency histogram: precision, merging, serialisation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ackservice.bench.histogram import RELATIVE_ERROR, LatencyHistogram

# Up to 2**42 ns (over an hour): the range the histogram tells apart.
latencies = st.lists(st.integers(min_value=0, max_value=1 << 42), min_size=1, max_size=300)
percents = st.sampled_from([0.0, 1.0, 50.0, 90.0, 99.0, 99.9, 100.0]) | st.floats(0, 100)


def exact_percentile(values: list[int], percent: float) -> int:
    """The nearest-rank percentile, the definition the histogram approximates."""
    ordered = sorted(values)
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


def histogram_of(values: list[int]) -> LatencyHistogram:
    histogram = LatencyHistogram()
    for value in values:
        histogram.record(value)
    return histogram


@given(latencies, percents)
def test_percentiles_are_within_the_relative_error_of_exact_ones(
    values: list[int], percent: float
) -> None:
    """Any percentile of any sample is within RELATIVE_ERROR (1/256) of the exact
    nearest-rank percentile; values below 256 are exact."""
    reported = histogram_of(values).percentile(percent)
    exact = exact_percentile(values, percent)
    assert abs(reported - exact) <= exact * RELATIVE_ERROR
    if exact < 256:
        assert reported == exact


@given(latencies)
def test_min_max_count_and_mean_are_exact(values: list[int]) -> None:
    """min, max (= the 100th percentile), count and mean are exact, not bucketed."""
    histogram = histogram_of(values)
    assert histogram.min == min(values)
    assert histogram.max == max(values) == histogram.percentile(100)
    assert histogram.count == len(values)
    assert histogram.mean == pytest.approx(sum(values) / len(values))


@given(latencies, latencies)
def test_merging_equals_recording_everything_in_one(first: list[int], second: list[int]) -> None:
    """Merging two histograms gives exactly the histogram of the combined samples."""
    merged = histogram_of(first)
    merged.merge(histogram_of(second))
    assert merged == histogram_of(first + second)


@given(latencies)
def test_round_trips_through_its_dict_form(values: list[int]) -> None:
    """to_dict/from_dict (how worker processes ship histograms) loses nothing."""
    histogram = histogram_of(values)
    assert LatencyHistogram.from_dict(histogram.to_dict()) == histogram


def test_record_with_a_count_is_that_many_samples() -> None:
    """record(value, n) counts as n samples of value (a batch of replies at once)."""
    batched = LatencyHistogram()
    batched.record(5_000, 3)
    assert batched == histogram_of([5_000, 5_000, 5_000])


def test_empty_histogram_reports_zero() -> None:
    """With no samples every percentile is 0 and the mean is 0.0."""
    histogram = LatencyHistogram()
    assert histogram.percentile(99) == 0
    assert histogram.mean == 0.0
    assert histogram.count == 0


def test_values_beyond_the_range_keep_an_exact_max() -> None:
    """A value too large for the buckets lands in the top one; max stays exact."""
    histogram = histogram_of([10, 1 << 50])
    assert histogram.max == 1 << 50
    assert histogram.percentile(100) == 1 << 50


def test_negative_values_count_as_zero() -> None:
    """A negative latency (impossible with a monotonic clock) is clamped, not an error."""
    assert histogram_of([-5]).max == 0


def test_memory_is_bounded() -> None:
    """A million samples take no more buckets than one."""
    histogram = LatencyHistogram()
    for value in range(0, 1 << 40, (1 << 40) // 1_000):
        histogram.record(value, 1_000)
    assert len(histogram.to_dict()["buckets"]) <= 5_000


def test_percent_out_of_range_is_refused() -> None:
    """Percentiles are from 0 to 100."""
    with pytest.raises(ValueError, match="from 0 to 100"):
        LatencyHistogram().percentile(101)
