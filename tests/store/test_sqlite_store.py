"""The SQLite store against real files: durability settings, ids, refusals, failures."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_support import as_stored, chunk_count, message, read_all, store_batches

import support
from ackservice.store import sqlite as sqlite_module
from ackservice.store.base import Message, StoredMessage, StoreError, StoreUnavailable
from ackservice.store.batch import MessageBatch, MessageRun
from ackservice.store.sqlite import SQLiteReader, SQLiteStore


def batch_of(payloads: list[bytes], first_seq: int = 1) -> list[Message]:
    """One message per payload, numbered from ``first_seq``."""
    return [message(p, first_seq + i) for i, p in enumerate(payloads)]


def integrity(path: Path) -> str:
    """SQLite's own verdict on the file ("ok" when sound)."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        result: str = connection.execute("PRAGMA integrity_check").fetchone()[0]
        return result


async def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    """What is stored comes back byte for byte, with its metadata, in id order, even
    payloads that are empty, end in a carriage return or are not UTF-8."""
    path = tmp_path / "store.db"
    sent = [
        message(b"hello", 1),
        message(b"", 2),
        message(b"ends in cr\r", 3),
        message(b"\xff\x00\xfe binary", 4, identity="CN=client-1"),
    ]
    store = await SQLiteStore.open(path)
    try:
        assert await store.store(sent[:2]) is None
        assert await store.store(sent[2:]) is None
    finally:
        await store.aclose()

    stored = await read_all(path)
    assert [m.id for m in stored] == [1, 2, 3, 4]
    for original, back in zip(sent, stored, strict=True):
        assert back.payload == original.payload
        assert type(back.payload) is bytes
        assert back.crc32 == original.crc32
        assert back.received_at == original.received_at
        assert (back.peer, back.conn_id, back.seq) == (original.peer, 7, original.seq)
        assert back.identity == original.identity


async def test_open_creates_missing_directories_and_describes_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative path in a directory that does not exist yet is created, and the
    description names the absolute path."""
    monkeypatch.chdir(tmp_path)
    store = await SQLiteStore.open(Path("deep/er/store.db"))
    try:
        assert store.description == f"sqlite:{tmp_path / 'deep/er/store.db'}"
    finally:
        await store.aclose()
    assert (tmp_path / "deep/er/store.db").is_file()


async def test_commits_are_durable_wal_with_full_sync(tmp_path: Path) -> None:
    """The file is in WAL mode and the store's connection fsyncs the log at every commit
    (synchronous=FULL, 2; NORMAL would not)."""
    path = tmp_path / "store.db"
    store = await SQLiteStore.open(path)
    try:
        synchronous = store._connection.execute("PRAGMA synchronous").fetchone()[0]
        assert synchronous == 2
    finally:
        await store.aclose()
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA user_version").fetchone()[0] == 3


async def test_ids_increase_and_are_not_reused_after_prune(tmp_path: Path) -> None:
    """Pruning every message, the newest included, does not make its id available again:
    a reader resuming after that id misses nothing."""
    path = tmp_path / "store.db"
    store = await SQLiteStore.open(path)
    try:
        await store.store(batch_of([b"a", b"b", b"c"]))
        reader = await SQLiteReader.open(path)
        try:
            assert await reader.prune(before_id=4) == 3
            assert (await reader.stats()).messages == 0
        finally:
            await reader.aclose()
        await store.store(batch_of([b"d"]))
    finally:
        await store.aclose()
    assert [(m.id, m.payload) for m in await read_all(path)] == [(4, b"d")]


async def test_prune_by_id_and_age(tmp_path: Path) -> None:
    """``before_id`` deletes the messages below it; ``older_than`` those received longer
    ago than that; each returns how many went."""
    path = tmp_path / "store.db"
    old = message(b"old", received_at=time.time() - 3600)
    now = time.time()
    others = [
        message(p, n, conn_id=n, received_at=now) for n, p in [(2, b"x"), (3, b"y"), (4, b"z")]
    ]
    # One commit each: the messages are separate chunks.
    await store_batches(path, [[m] for m in [old, *others]])
    reader = await SQLiteReader.open(path)
    try:
        assert await reader.prune(older_than=60) == 1
        assert await reader.prune(before_id=3) == 1
        assert await reader.prune(before_id=3) == 0
        stats = await reader.stats()
        with pytest.raises(ValueError, match="before_id or older_than"):
            await reader.prune()
    finally:
        await reader.aclose()
    assert (stats.messages, stats.stored_bytes, stats.first_id, stats.last_id) == (2, 2, 3, 4)


async def test_stats_of_an_empty_and_a_filled_store(tmp_path: Path) -> None:
    """Stats count messages and payload bytes and name the first and last."""
    path = tmp_path / "store.db"
    store = await SQLiteStore.open(path)
    reader = await SQLiteReader.open(path)
    try:
        empty = await reader.stats()
        assert (empty.messages, empty.stored_bytes, empty.first_id, empty.last_received_at) == (
            0,
            0,
            None,
            None,
        )
        sent = [message(b"12345", 1, received_at=1.0), *batch_of([b"", b"678"], 2)]
        await store.store(sent)
        stats = await reader.stats()
    finally:
        await reader.aclose()
        await store.aclose()
    assert (stats.messages, stats.stored_bytes, stats.first_id, stats.last_id) == (3, 8, 1, 3)
    assert stats.first_received_at == sent[0].received_at
    assert stats.last_received_at == sent[2].received_at


async def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    """A file that is not SQLite is left alone, with an error that says so."""
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are not the pages you are looking for\n" * 200)
    with pytest.raises(StoreError, match=r"notes\.txt is not a SQLite database") as info:
        await SQLiteStore.open(path)
    assert "\n" not in str(info.value)
    with pytest.raises(StoreError, match="not a SQLite database"):
        await SQLiteReader.open(path)
    assert path.read_bytes().startswith(b"these are not")


async def test_another_applications_database_is_refused(tmp_path: Path) -> None:
    """A SQLite file with someone else's tables is not taken over."""
    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE accounts (id INTEGER)")
        connection.commit()
    with pytest.raises(StoreError, match="not an ackservice store"):
        await SQLiteStore.open(path)


async def test_a_newer_schema_version_is_refused(tmp_path: Path) -> None:
    """A store written by a newer ackservice (higher user_version) is neither written nor
    read, and the message says which versions are involved."""
    path = tmp_path / "store.db"
    store = await SQLiteStore.open(path)
    await store.aclose()
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("PRAGMA user_version = 4")
        connection.commit()
    with pytest.raises(StoreError, match=r"schema version 4.*only 3"):
        await SQLiteStore.open(path)
    with pytest.raises(StoreError, match="schema version 4"):
        await SQLiteReader.open(path)


async def test_a_version_1_store_is_refused_with_a_hint(tmp_path: Path) -> None:
    """A file in the per-message schema of the first development versions is neither
    written nor read; the one-line error says what to do, and the file is left as it was."""
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL,"
            " peer TEXT, conn_id INTEGER, seq INTEGER, nbytes INTEGER, crc32 INTEGER,"
            " payload BLOB, identity TEXT)"
        )
        connection.execute("PRAGMA user_version = 1")
        connection.commit()
    before = path.read_bytes()
    for opener in (SQLiteStore.open, SQLiteReader.open):
        with pytest.raises(StoreError, match="older development version") as info:
            await opener(path)
        assert "export it with that version or remove it" in str(info.value)
        assert "\n" not in str(info.value)
    assert path.read_bytes() == before


async def test_a_path_that_cannot_be_created_names_the_path(tmp_path: Path) -> None:
    """When the directory cannot be made (a file is in the way), the error names the path."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError, match=r"afile/store\.db") as info:
        await SQLiteStore.open(tmp_path / "afile" / "store.db")
    assert "\n" not in str(info.value)


async def test_a_directory_in_place_of_the_file_names_the_path(tmp_path: Path) -> None:
    """A directory where the file should be is reported as one, with the path and what to
    give instead (SQLite says only "unable to open database file")."""
    (tmp_path / "store.db").mkdir()
    with pytest.raises(
        StoreError, match=r"store\.db is a directory; sqlite:PATH names the database file"
    ):
        await SQLiteStore.open(tmp_path / "store.db")
    with pytest.raises(StoreError, match=r"store\.db is a directory"):
        await SQLiteReader.open(tmp_path / "store.db")


@pytest.mark.parametrize("opener", [SQLiteStore.open, SQLiteReader.open])
async def test_a_path_that_cannot_be_looked_at_is_a_store_error(
    tmp_path: Path, opener: Callable[[Path], Awaitable[object]]
) -> None:
    """A path that ``stat`` refuses (as it does in a directory one may not search, EACCES,
    which root never meets; here a name too long, ENAMETOOLONG) is a ``StoreError`` naming
    it: the check for a directory raised ``OSError`` from the open's error handler, and the
    server ended with a traceback."""
    with pytest.raises(StoreError, match=r"cannot open store .*xxx"):
        await opener(tmp_path / ("x" * 300))


async def test_a_file_name_that_is_not_utf8_is_opened_by_its_bytes(tmp_path: Path) -> None:
    """A name whose bytes are not UTF-8 (Latin-1 ``caf\xe9.db``): the store is that file,
    written and read back; the URI SQLite is given was built from text and raised
    ``UnicodeEncodeError`` (a traceback for the server and the store CLI)."""
    path = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.db"))
    await store_batches(path, [[message(b"kept")]])
    assert b"caf\xe9.db" in os.listdir(os.fsencode(tmp_path))  # that name, not a re-encoding
    assert [m.payload for m in await read_all(path)] == [b"kept"]


async def test_reader_of_a_missing_file_creates_nothing(tmp_path: Path) -> None:
    """Reading a store that does not exist fails with "no store at PATH" and leaves no
    empty file behind."""
    path = tmp_path / "missing.db"
    with pytest.raises(StoreError, match=r"no store at .*missing\.db"):
        await SQLiteReader.open(path)
    assert not path.exists()


async def test_locked_database_is_unavailable_then_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another connection holds the write lock past the busy timeout, a batch is
    refused as unavailable (nothing stored); once the lock is gone the next batch goes in."""
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT", 0.05)
    path = tmp_path / "store.db"
    store = await SQLiteStore.open(path)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match="database is locked") as info:
            await store.store(batch_of([b"refused"]))
        assert info.value.detail == "database is locked"
        blocker.execute("ROLLBACK")
        assert await store.store(batch_of([b"accepted"])) is None
    finally:
        blocker.close()
        await store.aclose()
    assert [m.payload for m in await read_all(path)] == [b"accepted"]


async def test_a_batch_sqlite_cannot_hold_leaves_no_open_transaction(tmp_path: Path) -> None:
    """A batch failing outside SQLite (a seq too large for its 64-bit integers, in the
    chunk's own column) is rolled back, so the next batch is stored as usual."""
    path = tmp_path / "store.db"
    store = await SQLiteStore.open(path)
    try:
        with pytest.raises(OverflowError):
            await store.store([message(b"too big", 2**64), message(b"kept out", 1, conn_id=8)])
        assert await store.store(batch_of([b"next"])) is None
    finally:
        await store.aclose()
    assert [m.payload for m in await read_all(path)] == [b"next"]


async def test_abandoned_commit_rolls_back_before_the_next_one(tmp_path: Path) -> None:
    """A commit cancelled by a timeout while its thread waits for the write lock stops
    waiting and rolls back (its messages were answered "unavailable" and will be resent),
    and the next batch waits for that thread: only the next batch is stored, with the
    next id, and the file is sound."""
    path = tmp_path / "store.db"
    store = await SQLiteStore.open(path)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with trio.move_on_after(0.2) as timeout:
            await store.store(batch_of([b"first-1", b"first-2"]))
        assert timeout.cancelled_caught
        blocker.execute("COMMIT")  # the lock is free again
        await store.store(batch_of([b"second"], 3))
    finally:
        blocker.close()
        await store.aclose()
    assert [(m.id, m.payload) for m in await read_all(path)] == [(1, b"second")]
    assert integrity(path) == "ok"


@contextlib.contextmanager
def writer_lock_held(path: Path) -> Iterator[None]:
    """The store's writer lock file (``PATH.lock``) held by this process, as another
    server's writer (or a stuck one) would hold it."""
    import fcntl

    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


async def test_a_held_lock_file_is_unavailable_and_closing_does_not_wait_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another process holds the writers' lock file, a commit is refused as
    unavailable after the busy timeout, one cut off by the server's store timeout stops
    waiting, and closing the store (the graceful shutdown) returns at once rather than
    waiting for the lock; once the lock is free a batch goes in."""
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT", 0.2)
    path = tmp_path / "store.db"
    store = await SQLiteStore.open(path)
    try:
        with writer_lock_held(path):
            with trio.fail_after(2), pytest.raises(StoreUnavailable, match="database is locked"):
                await store.store(batch_of([b"refused"]))
            with trio.move_on_after(0.1) as timeout:
                await store.store(batch_of([b"cut off"]))
            assert timeout.cancelled_caught
            with trio.fail_after(1):
                await store.aclose()
        reopened = await SQLiteStore.open(path)
        try:
            await reopened.store(batch_of([b"accepted"]))
        finally:
            await reopened.aclose()
    finally:
        await store.aclose()  # again: closing twice is harmless
    assert [m.payload for m in await read_all(path)] == [b"accepted"]


async def test_the_busy_timeout_covers_both_locks_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that waited for the writers' lock file and then for SQLite's own write
    lock (another connection, a prune, holds it) is refused once ``BUSY_TIMEOUT`` passed
    in all, not after waiting that long for each lock in turn."""
    import fcntl

    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT", 1.0)
    path = tmp_path / "store.db"
    store = await SQLiteStore.open(path)
    blocker = sqlite3.connect(path, isolation_level=None)
    lock_fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o640)
    release = threading.Timer(0.8, os.close, (lock_fd,))  # closing drops the flock
    try:
        blocker.execute("BEGIN IMMEDIATE")
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        release.start()
        started = time.monotonic()
        with trio.fail_after(5), pytest.raises(StoreUnavailable, match="database is locked"):
            await store.store(batch_of([b"refused"]))
        waited = time.monotonic() - started
        # One deadline: ~1.0 s. Two (the lock file's, then SQLite's): at least 1.8 s.
        assert 0.9 < waited < 1.6, waited
    finally:
        release.join()
        blocker.close()
        await store.aclose()


async def test_follow_sees_messages_committed_later(tmp_path: Path) -> None:
    """A following reader yields what was there, then what other connections commit while
    it waits, without ending."""
    path = tmp_path / "store.db"
    store = await SQLiteStore.open(path)
    reader = await SQLiteReader.open(path)
    seen: list[bytes] = []
    try:
        await store.store(batch_of([b"before"]))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def follow() -> None:
                    async for stored in reader.messages(follow=True):
                        seen.append(stored.payload)
                        if len(seen) == 3:
                            nursery.cancel_scope.cancel()

                nursery.start_soon(follow)
                await trio.sleep(0.3)  # the reader is now polling
                await store.store(batch_of([b"later-1"], 2))
                await trio.sleep(0.3)
                await store.store(batch_of([b"later-2"], 3))
    finally:
        await reader.aclose()
        await store.aclose()
    assert seen == [b"before", b"later-1", b"later-2"]


async def test_messages_after_an_id_across_pages(tmp_path: Path) -> None:
    """``after`` skips up to and including that id; results longer than a page of chunks
    arrive whole and in order."""
    path = tmp_path / "store.db"
    count = sqlite_module.PAGE_ROWS * 2 + 5
    # One commit per message, so one chunk per message.
    await store_batches(path, [[message(b"%d" % n, n)] for n in range(1, count + 1)])
    assert chunk_count(path) == count
    reader = await SQLiteReader.open(path)
    try:
        ids = [m.id async for m in reader.messages(after=3)]
    finally:
        await reader.aclose()
    assert ids == list(range(4, count + 1))


def test_a_page_stops_at_its_byte_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader's page holds chunks up to PAGE_BYTES of payloads (then the next page goes
    on from there), so large chunks do not multiply a page's memory by PAGE_ROWS."""
    monkeypatch.setattr(sqlite_module, "PAGE_BYTES", 2500)
    path = tmp_path / "store.db"
    pages: list[int] = []
    read_page = sqlite_module._read_page

    def spied(connection: sqlite3.Connection, after: int) -> tuple[bool, list[StoredMessage]]:
        full, page = read_page(connection, after)
        pages.append(sum(len(m.payload) for m in page))
        return full, page

    monkeypatch.setattr(sqlite_module, "_read_page", spied)
    commits = [[message(b"%d" % n + b"x" * 999, n)] for n in range(1, 8)]

    async def main() -> list[StoredMessage]:
        await store_batches(path, commits)
        return await read_all(path, after=1)

    assert [m.seq for m in trio.run(main)] == list(range(2, 8))
    assert pages == [3000, 3000, 0]  # each page stops at the chunk that passes 2,500 bytes


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs, unmounted afterwards (needs root; skipped with the reason
    when mounting is not permitted)."""
    with support.small_tmpfs(tmp_path / "small", "256k") as mount_point:
        yield mount_point


def fill(directory: Path) -> Path:
    """Write a file in ``directory`` until the file system is full; return it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            try:
                os.write(fd, b"\0" * 4096)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    return filler
                raise
    finally:
        os.close(fd)


async def test_disk_full_is_unavailable_and_recovers_without_loss(small_tmpfs: Path) -> None:
    """On a full disk a batch is refused as unavailable; once space is freed the next batch
    is stored, every batch acknowledged before is still there, and the file is sound."""
    path = small_tmpfs / "store.db"
    acknowledged = [b"ack-%d" % n for n in range(20)]
    store = await SQLiteStore.open(path)
    try:
        for n in range(0, 20, 5):
            assert await store.store(batch_of(acknowledged[n : n + 5], n + 1)) is None
        filler = fill(small_tmpfs)
        # Larger than any slack in the log's last pages, so it must allocate.
        refused = batch_of([b"r" * 4000 for _ in range(16)], 100)
        with pytest.raises(StoreUnavailable) as info:
            await store.store(refused)
        assert info.value.detail == "database or disk is full"
        with pytest.raises(StoreUnavailable):
            await store.store(refused)  # still full: still refused, no crash
        filler.unlink()
        assert await store.store(batch_of([b"after"], 200)) is None
    finally:
        await store.aclose()
    assert [m.payload for m in await read_all(path)] == [*acknowledged, b"after"]
    assert integrity(path) == "ok"


async def test_a_batch_of_several_connections_runs_reads_back_exactly(tmp_path: Path) -> None:
    """A batch interleaving runs of several connections, with gaps in seq, a change of
    ``received_at`` or identity inside one connection's messages, comes back message for
    message with ids 1..n; each commit is one chunk."""
    path = tmp_path / "store.db"
    sent = [
        message(b"a1", 10, conn_id=1),
        message(b"a2", 11, conn_id=1),
        message(b"b1", 12, conn_id=2),  # next seq of conn 1, but another connection
        message(b"b2", 13, conn_id=2),
        message(b"a3", 12, conn_id=1),  # conn 1 again: a new read
        message(b"a5", 14, conn_id=1),  # a gap in seq
        message(b"a6", 15, conn_id=1, received_at=2.0),  # a later read
        message(b"a7", 16, conn_id=1, received_at=2.0, identity="CN=x"),
        message(b"", 17, conn_id=1, received_at=2.0, identity="CN=x"),
        message(b"\xff\xfe", 1, conn_id=3),
    ]
    await store_batches(path, [sent[:4], sent[4:]])
    assert chunk_count(path) == 2
    assert await read_all(path) == as_stored(1, sent)
    # ``after`` inside a run, between runs, inside a chunk's last run, at a chunk's end.
    for after in range(len(sent) + 1):
        assert await read_all(path, after=after) == as_stored(after + 1, sent[after:])
    assert await read_all(path, after=10) == []


async def test_prune_keeps_a_chunk_straddling_before_id_whole(tmp_path: Path) -> None:
    """``before_id`` inside a chunk deletes only the chunks entirely below it and counts
    their messages; the straddling chunk stays whole."""
    path = tmp_path / "store.db"
    await store_batches(
        path,
        [batch_of([b"1", b"2", b"3"]), batch_of([b"4", b"5", b"6"], 10), batch_of([b"7"], 20)],
    )
    reader = await SQLiteReader.open(path)
    try:
        assert await reader.prune(before_id=5) == 3  # ids 1-3; 4-6 straddle 5
        assert (await reader.stats()).first_id == 4
        assert await reader.prune(before_id=7) == 3
        stats = await reader.stats()
    finally:
        await reader.aclose()
    assert (stats.messages, stats.first_id, stats.last_id) == (1, 7, 7)
    assert [m.payload for m in await read_all(path)] == [b"7"]


def test_prune_deletes_in_several_transactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More chunks than one prune transaction takes are all deleted, and counted."""
    monkeypatch.setattr(sqlite_module, "PRUNE_CHUNK_ROWS", 3)
    path = tmp_path / "store.db"

    async def main() -> int:
        await store_batches(path, [batch_of([b"x", b"y"], 10 * n) for n in range(1, 8)])
        reader = await SQLiteReader.open(path)
        try:
            return await reader.prune(before_id=100)
        finally:
            await reader.aclose()

    assert trio.run(main) == 14
    assert chunk_count(path) == 0


# A batch: (conn_id, seq, payload, same read as the previous message) per message.
_batches = st.lists(
    st.lists(
        st.tuples(
            st.integers(1, 3),
            st.integers(0, 6),
            st.binary(max_size=12),
            st.booleans(),
        ),
        min_size=1,
        max_size=12,
    ),
    min_size=1,
    max_size=5,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(batches=_batches)
def test_any_batches_read_back_exactly_in_order(
    batches: list[list[tuple[int, int, bytes, bool]]],
) -> None:
    """Any batches (any conn_ids and seqs, consecutive or not; any payloads, empty and not
    UTF-8 included) read back as exactly the messages stored, in order, ids 1..n."""
    sent_batches: list[list[Message]] = []
    clock = 1_700_000_000.0
    for spec in batches:
        batch: list[Message] = []
        for conn_id, seq, payload, same_read in spec:
            if not same_read:
                clock += 0.25
            batch.append(message(payload, seq, conn_id=conn_id, received_at=clock))
        sent_batches.append(batch)
    sent = [m for batch in sent_batches for m in batch]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "store.db"
        trio.run(store_batches, path, sent_batches)
        assert trio.run(read_all, path) == as_stored(1, sent)
        middle = len(sent) // 2
        assert trio.run(read_all, path, middle) == as_stored(middle + 1, sent[middle:])


async def test_a_run_with_a_crc_beyond_32_bits_leaves_no_open_transaction(
    tmp_path: Path,
) -> None:
    """The rows-from-columns path (a MessageBatch) fails as the Message path does on a CRC
    that does not fit in 32 bits: nothing of the batch is stored, the next batch is."""
    path = tmp_path / "store.db"
    store = await SQLiteStore.open(path)
    try:
        for crc in (2**32, -1):
            kept_out = MessageRun([b"kept out"], [0], 1.0, "p", 1, 1)
            with pytest.raises(OverflowError):
                await store.store(
                    MessageBatch([kept_out, MessageRun([b"bad"], [crc], 1.0, "p", 2, 1)])
                )
        assert await store.store(MessageBatch([MessageRun([b"next"], [7], 1.0, "p", 1, 1)])) is None
    finally:
        await store.aclose()
    assert [m.payload for m in await read_all(path)] == [b"next"]


@pytest.mark.parametrize("change", ["append", "pop"])
async def test_a_run_whose_columns_no_longer_match_is_refused_not_stored(
    tmp_path: Path, change: str
) -> None:
    """A MessageRun checks its columns when made, but they are plain lists: one changed
    afterwards (a CRC more or fewer than payloads) must not be written as a chunk whose
    sizes do not add up, which makes every later read of the store fail ("damaged")."""
    path = tmp_path / "store.db"
    store = await SQLiteStore.open(path)
    try:
        assert (
            await store.store(MessageBatch([MessageRun([b"first"], [1], 1.0, "p", 1, 1)])) is None
        )
        changed = MessageRun([b"x", b"y"], [2, 3], 1.0, "p", 2, 1)
        if change == "append":
            changed.crc32s.append(4)
        else:
            changed.crc32s.pop()
        with pytest.raises(ValueError, match="CRC-32"):
            await store.store(MessageBatch([changed]))
        assert await store.store(MessageBatch([MessageRun([b"last"], [5], 1.0, "p", 1, 2)])) is None
    finally:
        await store.aclose()
    assert [m.payload for m in await read_all(path)] == [b"first", b"last"]


async def test_closing_in_a_cancelled_scope_still_closes_the_file(tmp_path: Path) -> None:
    """The store may be closed where cancellation is already under way (an embedder
    cancelling ``serve()``, whose ``open_store`` closes it on the way out): ``aclose``
    raises ``Cancelled`` at once, but the connection and the lock file are closed all the
    same, after the calls already made, and the store's thread ends. A second ``aclose``
    could not make up for it: it finds the store closed."""
    path = tmp_path / "store.db"
    store = await SQLiteStore.open(path)
    await store.store(batch_of([b"kept"]))
    with trio.CancelScope() as scope:
        scope.cancel()
        await store.aclose()
    store._thread._thread.join(5)
    assert not store._thread._thread.is_alive()
    assert store._writer_lock == -1
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        store._connection.execute("SELECT 1")
    await store.aclose()  # again: harmless
    assert [m.payload for m in await read_all(path)] == [b"kept"]
