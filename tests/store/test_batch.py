"""MessageRun and MessageBatch: sequences of Message like a list of them, and the SQLite
store's rows for them the same as for that list."""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from store_support import as_messages, runs

from ackservice.store import Message, MessageBatch, MessageRun
from ackservice.store.batch import joined
from ackservice.store.sqlite_rows import rows_of


@given(runs(), st.data())
def test_a_batch_is_the_list_of_its_messages(made: list[MessageRun], data: st.DataObject) -> None:
    batch = MessageBatch(made)
    expected = as_messages(made)
    assert list(batch) == expected
    assert len(batch) == len(expected)
    index = data.draw(st.integers(-len(expected), len(expected) - 1))
    assert batch[index] == expected[index]
    start, stop = data.draw(st.integers(-10, 10)), data.draw(st.integers(-10, 10))
    assert batch[start:stop] == expected[start:stop]
    with pytest.raises(IndexError):
        batch[len(expected)]
    for run in made:  # a run slices like the list of its messages too
        assert run[start:stop] == list(run)[start:stop]
        assert run[::-1] == list(run)[::-1]


@given(runs())
def test_sqlite_rows_of_a_batch_are_those_of_its_messages(made: list[MessageRun]) -> None:
    """The store's shortcut (a row per run, from the columns) writes what its general path
    writes for the same messages as Message tuples."""
    assert rows_of(MessageBatch(made), 7) == rows_of(as_messages(made), 7)


def test_joined_keeps_runs_as_a_batch_and_lists_as_a_list() -> None:
    run = MessageRun([b"a", b"b"], [1, 2], 0.0, "p", 1, 1)
    other = MessageRun([b"c"], [3], 0.0, "q", 2, 1)
    both = joined([run, other])
    assert isinstance(both, MessageBatch)
    assert both.runs == [run, other]
    mixed = joined([run, [Message(b"c", 3, 0.0, "q", 2, 1)]])
    assert isinstance(mixed, list)
    assert mixed == [*run, Message(b"c", 3, 0.0, "q", 2, 1)]


def test_a_run_needs_a_crc_per_payload() -> None:
    with pytest.raises(ValueError, match="one CRC-32 per payload"):
        MessageRun([b"a"], [], 0.0, "p", 1, 1)


def test_what_the_store_docs_promise_of_a_batch() -> None:
    """Store.store's docstring: iterate as often as needed, index from the end, slices are
    lists; not a list itself (== and + need list(batch)); messages equal, made anew."""
    run = MessageRun([b"a", b"b"], [1, 2], 0.0, "p", 1, 1)
    batch = MessageBatch([run, MessageRun([b"c"], [3], 0.0, "q", 2, 5, "CN=c")])
    expected = as_messages(batch.runs)
    assert list(batch) == list(batch) == expected
    assert batch[-1] == expected[-1]
    assert batch[::-1] == expected[::-1]
    with pytest.raises(IndexError):
        batch[-4]
    assert batch != expected
    assert list(batch) == expected
    with pytest.raises(TypeError):
        batch + expected  # type: ignore[operator]
    assert list(batch) + expected == expected * 2
    assert batch[0] == batch[0]
    assert batch[0] is not batch[0]
    assert list(pickle.loads(pickle.dumps(batch))) == expected


class _NotToBeIterated(list[bytes]):
    def __iter__(self) -> Iterator[bytes]:
        raise AssertionError("a run before the slice was iterated")


def test_a_slice_starts_at_its_own_run() -> None:
    """A store's chunks (JetStream slices a batch by 1,000) start where they start: making
    one must not make every Message before it (a batch of N was sliced in O(N^2): 400k
    messages took seconds of CPU, past a store timeout)."""
    skipped = MessageRun(_NotToBeIterated([b"a", b"b", b"c"]), [1, 2, 3], 0.0, "p", 1, 1)
    later = MessageRun([b"d", b"e", b"f"], [4, 5, 6], 0.0, "q", 2, 1)
    last = MessageRun([b"g"], [7], 0.0, "r", 3, 9)
    batch = MessageBatch([skipped, MessageRun([], [], 0.0, "s", 4, 1), later, last])
    expected = [*later, *last]
    assert batch[3:7] == expected
    assert batch[4:6] == expected[1:3]
    assert batch[-2:] == expected[-2:]
    assert batch[5:100] == expected[2:]
    assert batch[6:4] == []
