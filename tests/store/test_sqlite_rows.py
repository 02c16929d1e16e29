"""The SQLite store's rows (schema version 3): a commit's runs packed into rows and read
back exactly, rows bounded in size, damaged rows refused; and version 2 files, one row per
run without the ``runs`` column, read and upgraded in place."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from store_support import (
    as_messages,
    as_stored,
    chunk_count,
    message,
    read_all,
    runs,
    store_batches,
)

from ackservice.store import sqlite as sqlite_module
from ackservice.store.base import Message, StoredMessage, StoreError, StoreUnavailable
from ackservice.store.batch import MessageBatch, MessageRun
from ackservice.store.sqlite import SQLiteReader, SQLiteStore
from ackservice.store.sqlite_rows import (
    _described,
    _runs_in,
    received_at_of,
    rows_of,
    stored_messages,
)


def read_rows(rows: list[tuple[object, ...]], after: int = 0) -> list[StoredMessage]:
    messages: list[StoredMessage] = []
    for row in rows:
        stored_messages(row, after, messages)
    return messages


@given(runs(), st.integers(1, 60), st.integers(1, 2**40), st.data())
def test_rows_read_back_as_the_messages_of_the_batch(
    made: list[MessageRun], row_bytes: int, first_id: int, data: st.DataObject
) -> None:
    """Whatever the runs and the row size: ids from ``first_id`` on, every field of every
    message as sent, and ``after`` anywhere skips exactly up to it."""
    rows, next_id = rows_of(MessageBatch(made), first_id, row_bytes=row_bytes)
    sent = as_messages(made)
    assert next_id == first_id + len(sent)
    expected = as_stored(first_id, sent)
    assert read_rows(rows) == expected
    skip = data.draw(st.integers(0, len(sent)))
    assert read_rows(rows, first_id - 1 + skip) == expected[skip:]


@given(runs(), st.integers(1, 60))
def test_a_row_holds_whole_runs_up_to_its_size(made: list[MessageRun], row_bytes: int) -> None:
    """A run is never split, a row of several runs stays within ``row_bytes`` of payloads,
    ids follow on from row to row, and a row's time is its newest run's (a prune by age
    then never takes a message younger than asked)."""
    rows, _ = rows_of(MessageBatch(made), 1, row_bytes=row_bytes)
    expected_id = 1
    for first_id, count, received_at, *_, payloads, runs_json in rows:
        assert first_id == expected_id
        expected_id += count
        if runs_json is None:
            continue
        described = _runs_in(runs_json)
        assert described is not None
        assert len(described) > 1
        assert len(payloads) <= row_bytes
        assert received_at == max(run[1] for run in described)
    assert sum(len(row[9]) for row in rows) == sum(len(p) for r in made for p in r.payloads)


def test_a_commit_of_many_connections_is_one_row() -> None:
    """Request/response over 64 connections: one row for the commit's 64 runs."""
    made = [MessageRun([b"x" * 64], [1], 5.0, f"p{n}", n, 9) for n in range(64)]
    rows, _ = rows_of(MessageBatch(made), 1)
    assert len(rows) == 1


def _two_runs(*counts: int, peer: str = "p") -> bytes:
    """The ``runs`` column of runs of ``counts`` messages."""
    return _described(
        [MessageRun([b"m"] * n, [1] * n, 5.0, peer, k, 1, "CN=x") for k, n in enumerate(counts)]
    )


_GOOD = _two_runs(1, 1)


@pytest.mark.parametrize(
    "runs_column",
    [
        b"not runs",
        _GOOD[:-1],  # cut short
        _GOOD + b"x",  # more than it describes
        _two_runs(1),  # one run, where the row holds two
        _two_runs(1, 2),  # three messages, where the row holds two
        _two_runs(2, 0),  # an empty run
        _two_runs(1, 1, peer="é").replace("é".encode(), b"\xff\xfe"),  # not UTF-8
        "text, not bytes",
    ],
)
def test_a_row_whose_runs_do_not_add_up_is_damaged(runs_column: object) -> None:
    """A reader refuses such a row with one line naming it, rather than guessing."""
    made = [MessageRun([b"a"], [1], 5.0, "p", 1, 1), MessageRun([b"b"], [2], 5.0, "p", 2, 1)]
    [row], _ = rows_of(MessageBatch(made), 7)
    assert row[10] == _described(made)
    damaged = (*row[:10], runs_column)
    with pytest.raises(StoreUnavailable, match="chunk 7 is damaged"):
        read_rows([damaged])
    with pytest.raises(StoreUnavailable, match="chunk 7 is damaged"):
        received_at_of((7, 2, 5.0, runs_column), last=False)


def test_first_and_last_received_at_are_the_messages_own() -> None:
    made = [MessageRun([b"a"], [1], 3.0, "p", 1, 1), MessageRun([b"b"], [2], 9.0, "p", 2, 1)]
    [row], _ = rows_of(MessageBatch([*made, MessageRun([b"c"], [3], 4.0, "q", 3, 1)]), 1)
    first_id, count, received_at, runs_json = row[0], row[1], row[2], row[10]
    assert received_at == 9.0
    assert received_at_of((first_id, count, received_at, runs_json), last=False) == 3.0
    assert received_at_of((first_id, count, received_at, runs_json), last=True) == 4.0


async def test_prune_by_age_keeps_a_chunk_holding_a_younger_message(tmp_path: Path) -> None:
    """A chunk of several runs goes only once its youngest message is older than asked; the
    stats name the first and last message's own times."""
    path = tmp_path / "store.db"
    ancient = message(b"ancient", 1, received_at=50.0)
    old, young = message(b"old", 2, received_at=100.0), message(b"young", 1, conn_id=8)
    young = young._replace(received_at=time.time())
    await store_batches(path, [[ancient], [old, young]])
    reader = await SQLiteReader.open(path)
    try:
        stats = await reader.stats()
        assert (stats.first_received_at, stats.last_received_at) == (50.0, young.received_at)
        assert await reader.prune(older_than=60) == 1
        assert await reader.prune(older_than=60) == 0
        assert await reader.prune(before_id=3) == 0  # ids 2-3: one chunk, straddling 3
    finally:
        await reader.aclose()
    assert [m.payload for m in await read_all(path)] == [b"old", b"young"]


# The schema of version 2, as those versions created it.
_VERSION_2 = (
    "CREATE TABLE chunks (first_id INTEGER PRIMARY KEY, count INTEGER NOT NULL,"
    " received_at REAL NOT NULL, peer TEXT NOT NULL, conn_id INTEGER NOT NULL,"
    " first_seq INTEGER NOT NULL, identity TEXT, lengths BLOB NOT NULL,"
    " crc32s BLOB NOT NULL, payloads BLOB NOT NULL)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT INTO meta (key, value) VALUES ('next_id', 4)",
    # Two chunks, as version 2 wrote them: ids 1-2 (conn 1, seqs 5-6) and 3 (conn 2).
    "INSERT INTO chunks VALUES (1, 2, 10.5, '127.0.0.1:1', 1, 5, NULL,"
    " x'0100000002000000', x'{crc_a}{crc_bc}', x'616263')",
    "INSERT INTO chunks VALUES (3, 1, 11.5, '127.0.0.1:2', 2, 1, 'CN=x',"
    " x'01000000', x'{crc_d}', x'64')",
    "PRAGMA user_version = 2",
)


def make_version_2_store(path: Path) -> list[StoredMessage]:
    """A store file as ackservice's schema version 2 left it; the messages it holds."""
    crcs = {
        "crc_a": zlib.crc32(b"a"),
        "crc_bc": zlib.crc32(b"bc"),
        "crc_d": zlib.crc32(b"d"),
    }
    hexed = {name: crc.to_bytes(4, "little").hex() for name, crc in crcs.items()}
    with contextlib.closing(sqlite3.connect(path)) as connection:
        for statement in _VERSION_2:
            connection.execute(statement.format(**hexed))
        connection.commit()
    return [
        StoredMessage(1, 10.5, "127.0.0.1:1", 1, 5, crcs["crc_a"], b"a"),
        StoredMessage(2, 10.5, "127.0.0.1:1", 1, 6, crcs["crc_bc"], b"bc"),
        StoredMessage(3, 11.5, "127.0.0.1:2", 2, 1, crcs["crc_d"], b"d", "CN=x"),
    ]


def user_version(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        version: int = connection.execute("PRAGMA user_version").fetchone()[0]
        return version


async def test_a_version_2_store_is_read_and_upgraded(tmp_path: Path) -> None:
    """A reader reads a version 2 file as it was (upgrading it, so that a server writing it
    meanwhile cannot be misread); a server appends to it; everything reads back."""
    path = tmp_path / "store.db"
    kept = make_version_2_store(path)
    assert await read_all(path) == kept
    assert user_version(path) == 3
    store = await SQLiteStore.open(path)
    try:
        batch = [message(b"e", 1, conn_id=3), message(b"f", 1, conn_id=4)]
        assert await store.store(batch) is None
    finally:
        await store.aclose()
    assert await read_all(path) == [*kept, *as_stored(4, batch)]
    assert chunk_count(path) == 3


async def test_a_server_upgrades_a_version_2_store_on_open(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    kept = make_version_2_store(path)
    store = await SQLiteStore.open(path)
    await store.aclose()
    assert user_version(path) == 3
    assert await read_all(path, after=1) == kept[1:]


async def test_ids_go_on_from_a_pruned_version_2_store(tmp_path: Path) -> None:
    """Version 2 kept the next id in ``meta`` only; one ahead of the newest chunk (its newest
    messages pruned) is still honoured, so no id is handed out twice."""
    path = tmp_path / "store.db"
    make_version_2_store(path)
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("UPDATE meta SET value = 10 WHERE key = 'next_id'")
        connection.commit()
    await store_batches(path, [[message(b"next", 1, conn_id=5)]])
    assert [m.id for m in await read_all(path)] == [1, 2, 3, 10]


async def test_a_reader_does_not_wait_for_the_write_lock_of_a_version_3_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a WAL file takes no write lock: a reader opens and reads while another
    connection holds it (a commit stuck in fsync, a prune, an SQL shell's open transaction)
    rather than failing with "database is locked" after the busy timeout."""
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT", 0.2)
    path = tmp_path / "store.db"
    await store_batches(path, [[message(b"kept", 1)]])
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        assert [m.payload for m in await read_all(path)] == [b"kept"]
    finally:
        blocker.close()


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` cannot be written, even by root (immutable), for the block."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(0o644)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", path], check=False).returncode:
        pytest.skip("cannot make a file read-only for root here (chattr +i)")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", path], check=True)


async def test_a_read_only_version_2_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """A version 2 file the reader may not write cannot be upgraded: one line saying so
    and what to do, not SQLite's bare "attempt to write a readonly database"."""
    path = tmp_path / "store.db"
    make_version_2_store(path)
    with read_only(path), pytest.raises(StoreError) as info:
        await read_all(path)
    message = str(info.value)
    assert "schema version 2" in message
    assert "read-only" in message
    assert "\n" not in message
    assert user_version(path) == 2


@pytest.mark.parametrize(
    ("column", "value"),
    [
        (7, b"\x01\x00\x00"),  # lengths: not a whole number of uint32s
        (8, b"\x01\x00\x00\x00\x00"),  # crc32s: the same
        (7, "\x01\x00\x00\x00"),  # lengths as text (an SQL tool's UPDATE)
        (9, "a"),  # payloads as text: would read back as str, not bytes
        (8, None),
    ],
)
def test_a_row_whose_columns_are_not_what_was_written_is_damaged(
    column: int, value: object
) -> None:
    """A reader refuses a row whose binary columns are not whole uint32s, or not blobs,
    with the one line naming it (``StoreUnavailable``), not a ValueError or TypeError
    traceback, nor a message whose payload is not bytes."""
    [row], _ = rows_of([Message(b"a", 1, 5.0, "p", 1, 1)], 7)
    damaged = (*row[:column], value, *row[column + 1 :])
    with pytest.raises(StoreUnavailable, match="chunk 7 is damaged"):
        read_rows([damaged])
