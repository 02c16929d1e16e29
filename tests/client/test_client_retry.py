"""The retry policy: full-jitter backoff bounds, the consecutive-failure budget, and how a
failed connection attempt is described."""

from __future__ import annotations

import errno
import random
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ackservice.client.retry import RetryBudget, backoff_delay, describe_connect_error


@given(
    retry=st.integers(min_value=0, max_value=10_000),
    base=st.floats(min_value=1e-3, max_value=10),
    cap=st.floats(min_value=1e-3, max_value=100),
    seed=st.integers(),
)
def test_backoff_is_uniform_below_the_doubling_bound(
    retry: int, base: float, cap: float, seed: int
) -> None:
    """Each delay lies in ``[0, min(cap, base * 2**retry)]``, even after endless failures."""
    delay = backoff_delay(retry, base, cap, random.Random(seed))
    assert 0 <= delay <= min(cap, base * 2.0 ** min(retry, 64))


def test_backoff_bound_doubles_until_the_cap() -> None:
    """The largest possible delay goes 0.1, 0.2, 0.4, ... and stops at the cap."""

    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    bounds = [backoff_delay(retry, 0.1, 5.0, Top()) for retry in range(8)]
    assert bounds == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])


def test_budget_allows_retries_after_the_first_attempt() -> None:
    """``retries=3``: the first attempt and three more; the fourth failure ends the run."""
    budget = RetryBudget(3)
    budget.attempt_starting(10.0)
    assert [budget.failed(10.0 + i) for i in range(4)] == [True, True, True, False]
    assert budget.summary(13.14) == "tried 4 times over 3.1 s"


def test_progress_resets_the_budget() -> None:
    """A connection that made progress starts the count (and its clock) over."""
    budget = RetryBudget(1, retry_for=10.0)
    budget.attempt_starting(0.0)
    assert budget.failed(0.0)
    budget.succeeded()
    budget.attempt_starting(50.0)
    assert budget.remaining(50.0) == 10.0
    assert budget.failed(50.0)
    assert not budget.failed(50.5)
    assert budget.summary(51.0) == "tried 2 times over 1.0 s"


def test_no_retries_means_one_attempt() -> None:
    """``retries=0`` gives up after the first failure, and says so in words."""
    budget = RetryBudget(0)
    budget.attempt_starting(0.0)
    assert not budget.failed(0.0)
    assert budget.summary(0.5) == "tried once over 0.5 s"


def test_without_a_count_the_time_budget_decides() -> None:
    """``retries=None``: any number of failures is retried until ``retry_for`` seconds
    have passed since the first one of the run, and no retry after that."""
    budget = RetryBudget(None, retry_for=30.0)
    budget.attempt_starting(100.0)
    assert all(budget.failed(100.0 + t / 10) for t in range(299))
    assert budget.remaining(129.5) == pytest.approx(0.5)
    assert not budget.failed(130.0)


def test_the_count_and_the_time_budget_both_apply() -> None:
    """With both set, whichever runs out first ends the run."""
    by_count = RetryBudget(2, retry_for=30.0)
    assert [by_count.failed(t) for t in (0.0, 0.1, 0.2)] == [True, True, False]
    by_time = RetryBudget(100, retry_for=1.0)
    assert [by_time.failed(t) for t in (0.0, 0.5, 1.0)] == [True, True, False]


def test_zero_retry_time_never_retries() -> None:
    """``retry_for=0``: the first failure ends the run, whatever ``retries`` says."""
    assert not RetryBudget(None, retry_for=0.0).failed(5.0)


@pytest.mark.parametrize(
    ("error", "description"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Error connecting to x"), "connection refused"),
        (socket.gaierror(-2, "Name or service not known"), "cannot resolve host (Name or"),
        (OSError(errno.ENETUNREACH, "whatever"), "network is unreachable"),
        (OSError("no errno at all"), "no errno at all"),
    ],
)
def test_connect_errors_are_described_in_a_few_words(error: OSError, description: str) -> None:
    """The reason names the failure, not the address (the message says that already)."""
    assert describe_connect_error(error).startswith(description)


def test_trio_multi_address_failure_is_described_by_its_first_cause() -> None:
    """``trio.open_tcp_stream`` wraps per-address errors; the first one tells the story."""
    error = OSError("all attempts to connect to localhost:1 failed")
    error.__cause__ = ExceptionGroup("attempts", [ConnectionRefusedError(errno.ECONNREFUSED, "x")])
    assert describe_connect_error(error) == "connection refused"
