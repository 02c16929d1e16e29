"""The embedded store: one SQLite file, written in WAL mode with a full sync per commit.

Each batch the server hands over is one transaction, so one ``fsync`` of the write-ahead
log covers every message that arrived while the previous commit ran (group commit). The
stdlib ``sqlite3`` module blocks, so every call runs in another thread: the writer's in a
``SerialThread`` of its own, one call after the other, so a commit cut off by the server's
store timeout (its caller gone) still ends, rolled back at its next step, before the next
one starts on the same connection; a reader's through ``trio.to_thread`` and a
``CapacityLimiter(1)``, which Trio releases only when the thread has really finished.

Schema version 3 (``PRAGMA user_version``): one row per commit (up to a size), not per
message, because a row costs SQLite a few microseconds of CPU whatever it holds::

    chunks(first_id INTEGER PRIMARY KEY, count INTEGER, received_at REAL, peer TEXT,
           conn_id INTEGER, first_seq INTEGER, identity TEXT,
           lengths BLOB, crc32s BLOB, payloads BLOB, runs BLOB)
    meta(key TEXT PRIMARY KEY, value INTEGER)      -- 'next_id'

``sqlite_rows`` says what a row holds. Version 2 wrote one row per run (one connection's
read) and had no ``runs`` column; its rows are version 3 rows holding one run, so a version 2
file is read as it is, once upgraded (the column added, an instant change) by whichever
opens it first, server or reader (see ``_check_schema``).

Ids are per message, start at 1 and are never handed out twice, even after the newest
chunks were pruned, so a reader that resumes "after id N" cannot skip a message that reused
N: a commit's first id is one past the newest chunk's last, or ``meta.next_id`` if that is
larger, and a prune stores the next id in ``meta.next_id`` before it deletes. (Version 2
advanced ``meta.next_id`` with every insert: a statement and a page written per commit.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Final, TypeVar

import trio

from .base import Message, StoredMessage, StoreError, StoreStats, StoreUnavailable, Verdict
from .batch import MessageBatch
from .serial_thread import SerialThread
from .sqlite_rows import received_at_of, rows_of, stored_messages

__all__ = ["SCHEMA_VERSION", "NoStoreError", "SQLiteReader", "SQLiteStore"]

T = TypeVar("T")

SCHEMA_VERSION: Final = 3
# One row per run, without the ``runs`` column: upgraded when opened.
_RUNS_SCHEMA_VERSION: Final = 2
# The per-message schema of the first development versions (never released): refused with a
# hint rather than migrated.
_OLD_SCHEMA_VERSION: Final = 1

# How long a statement waits for another connection's write lock before failing with
# "database is locked" (then the batch is answered ``unavailable``). Long enough to ride out
# a prune chunk or a checkpoint, short enough that a wedged writer is reported, not hidden.
BUSY_TIMEOUT: Final = 5.0
# SQLite's own busy wait, per attempt: the store retries in these steps up to BUSY_TIMEOUT
# so that a commit the server gave up on stops waiting within one step.
_BUSY_STEP: Final = 0.05
# The wait for the writers' lock file (see _insert), per try. Short, unlike _BUSY_STEP: the
# lock file exists so that a waiting writer starts soon after the other commit ends (a
# commit takes milliseconds), and a try is one system call. Measured with two workers
# sharing a file (scripts/bench_workers.py, rr64): 1 ms steps cost about a fifth of the
# throughput a blocking flock() had; 0.2 ms steps, nothing beyond the runs' noise.
_LOCK_STEP: Final = 0.0002

# A reader's page: at most this many chunks, and no more chunks once it holds PAGE_BYTES of
# payloads (a chunk is up to a commit's 1 MiB, or one large read): bounds a reader's memory
# while keeping the per-query overhead small.
PAGE_ROWS: Final = 64
PAGE_BYTES: Final = 4 << 20

# How often a following reader asks whether another connection committed. The check is
# ``PRAGMA data_version``, which reads one counter in shared memory: cheap enough to run
# five times a second, and a new message shows up within a fifth of a second.
FOLLOW_INTERVAL: Final = 0.2

# Chunks deleted per prune transaction: each chunk holds the write lock only briefly, so the
# server's commits (waiting at most BUSY_TIMEOUT) keep going while a large prune runs.
PRUNE_CHUNK_ROWS: Final = 10_000

_SCHEMA: Final = (
    """
CREATE TABLE chunks (
    first_id INTEGER PRIMARY KEY,
    count INTEGER NOT NULL,
    received_at REAL NOT NULL,
    peer TEXT NOT NULL,
    conn_id INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    identity TEXT,
    lengths BLOB NOT NULL,
    crc32s BLOB NOT NULL,
    payloads BLOB NOT NULL,
    runs BLOB
)
""",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT INTO meta (key, value) VALUES ('next_id', 1)",
)

_INSERT: Final = (
    "INSERT INTO chunks (first_id, count, received_at, peer, conn_id, first_seq, identity,"
    " lengths, crc32s, payloads, runs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPGRADE_FROM_RUNS: Final = "ALTER TABLE chunks ADD COLUMN runs BLOB"
# One past the newest chunk's last message; both lookups go through a primary key.
_NEWEST_END: Final = (
    "coalesce((SELECT first_id + count FROM chunks ORDER BY first_id DESC LIMIT 1), 1)"
)
_GET_NEXT_ID: Final = f"SELECT max((SELECT value FROM meta WHERE key = 'next_id'), {_NEWEST_END})"
# Before a prune deletes: the next id must outlive the chunks that gave it.
_KEEP_NEXT_ID: Final = f"UPDATE meta SET value = max(value, {_NEWEST_END}) WHERE key = 'next_id'"

# The chunk holding message ``after`` (if any) and those after it. The subquery finds the
# last chunk starting at or before ``after`` through the primary key, so a page never scans
# the chunks before it.
_SELECT_PAGE: Final = (
    "SELECT first_id, count, received_at, peer, conn_id, first_seq, identity, lengths,"
    " crc32s, payloads, runs FROM chunks"
    " WHERE first_id >= (SELECT coalesce(max(first_id), 0) FROM chunks WHERE first_id <= ?1)"
    " AND first_id + count - 1 > ?1 ORDER BY first_id LIMIT ?2"
)


class NoStoreError(StoreError):
    """There is no store file to read at ``path`` (only the server creates one), or only an
    empty file, which a server would make a store of.

    Attributes:
        path: the absolute path looked at.
        empty: the file exists but is empty.
    """

    def __init__(self, path: Path, *, empty: bool = False) -> None:
        self.path = path
        self.empty = empty
        super().__init__(self.describe())

    def describe(self, setting: str = "--store") -> str:
        """The one-line error, naming the setting that gave the path as the user gave it."""
        where = f"{self.path}, an empty file" if self.empty else str(self.path)
        return f"no store at {where}; check {setting} (the server creates it on start)"


class _StoreFile:
    """One open connection to a store file, used by one thread at a time."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._connection = connection
        self._path = path

    @property
    def description(self) -> str:
        """``sqlite:`` and the file's absolute path."""
        return f"sqlite:{self._path}"


class SQLiteStore(_StoreFile):
    """A ``Store`` that keeps every message in one SQLite file; open with ``SQLiteStore.open``."""

    @classmethod
    async def open(cls, path: Path) -> SQLiteStore:
        """Open (creating if missing) the store file at ``path`` and its directory.

        Raises:
            StoreError: the directory or file cannot be created or opened, the file is not
                a SQLite database or not an ackservice store, or its schema is newer than
                this version of ackservice understands.
        """
        path, connection = await trio.to_thread.run_sync(_open_for_writing, path)
        store = cls(connection, path)
        try:
            store._writer_lock = _open_writer_lock(path)
        except BaseException:
            connection.close()
            raise
        store._thread = SerialThread(f"ackservice {store.description}")
        return store

    async def store(self, batch: Sequence[Message]) -> Sequence[Verdict] | None:
        """Insert ``batch`` in one transaction, as one row (or a few, see ``sqlite_rows``);
        return once its commit is on disk.

        Cancelling the call abandons the commit in the store's thread, which rolls back at
        its next step (unless it is already writing the commit record) before the next
        call starts there.

        Raises:
            StoreUnavailable: SQLite failed (disk full, database locked, I/O error); nothing
                of the batch was stored, and the next batch tries again.
        """
        if not batch:
            return None
        # A snapshot (one C-level copy): an abandoned thread may still be reading the batch
        # after the caller has moved on and reused its list for the next group. The server's
        # own batches are made for one commit and never changed: no copy of those.
        snapshot = batch if isinstance(batch, MessageBatch) else tuple(batch)
        abandoned = threading.Event()
        try:
            await self._thread.run(
                _insert,
                self._connection,
                self._writer_lock,
                snapshot,
                abandoned,
                abandon_on_cancel=True,
            )
        except trio.Cancelled:
            # Cut off (the server's store timeout): the thread rolls back at its next step,
            # so a commit still waiting for the write lock does not complete after its
            # messages were answered "unavailable". One already writing its commit record
            # may still complete: that is why "unavailable" promises only "safe to resend".
            abandoned.set()
            raise
        return None

    async def aclose(self) -> None:
        """Close the file, after any abandoned commit has finished."""
        if self._thread.closed:
            return  # closed already (closing twice is harmless)
        # In the writer's thread, so the connection is never closed under a running commit;
        # queued even when cancelled already (a shutdown in a cancelled scope), or nothing
        # would ever close the file: a second aclose finds the thread closed.
        await self._thread.run_last(self._close)

    _writer_lock = -1
    """The descriptor of the file whose lock the writers of this store take (see _insert)."""
    _thread: SerialThread
    """Where every call on the connection runs, one after the other."""

    def _close(self) -> None:
        self._connection.close()
        if self._writer_lock >= 0:
            os.close(self._writer_lock)
            self._writer_lock = -1


class SQLiteReader(_StoreFile):
    """A ``StoreReader`` for a SQLite store file; open with ``SQLiteReader.open``."""

    @classmethod
    async def open(cls, path: Path) -> SQLiteReader:
        """Open the existing store file at ``path`` (read-write, so that it can be pruned).

        Raises:
            StoreError: there is no file at ``path``, it cannot be opened, or it is not an
                ackservice store this version understands.
        """
        path, connection = await trio.to_thread.run_sync(_open_for_reading, path)
        return cls(connection, path)

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        super().__init__(connection, path)
        self._limiter = trio.CapacityLimiter(1)

    async def messages(
        self, *, after: int = 0, follow: bool = False
    ) -> AsyncIterator[StoredMessage]:
        """The stored messages with ``id > after``, in id order, read a page at a time.

        With ``follow``, after the last one it checks every ``FOLLOW_INTERVAL`` seconds
        whether another connection committed, and yields new messages until cancelled.

        Raises:
            StoreUnavailable: SQLite failed while reading.
        """
        last_id = after
        while True:
            # Read the change counter before the page: a commit that lands after this read
            # changes it, so the wait below cannot miss rows the page did not see.
            version = await self._run(_data_version) if follow else 0
            full, page = await self._run(_read_page, last_id)
            for message in page:
                yield message
            if page:
                last_id = page[-1].id
            if full:
                continue  # more may be waiting right now
            if not follow:
                return
            while await self._run(_data_version) == version:  # noqa: ASYNC110
                # Polling, not an event: the writer is another process.
                await trio.sleep(FOLLOW_INTERVAL)

    async def stats(self) -> StoreStats:
        """Count, payload bytes and the first and last message.

        Raises:
            StoreUnavailable: SQLite failed while reading.
        """
        return await self._run(_stats)

    async def prune(self, *, before_id: int | None = None, older_than: float | None = None) -> int:
        """Delete messages with ``id < before_id`` and received more than ``older_than``
        seconds ago (a message must match every condition given); return how many.

        Deletes whole chunks (the messages of one commit, or a part of one), so a chunk
        straddling ``before_id`` is kept whole: at most one commit's worth of messages
        below it stay (``sqlite_rows.ROW_PAYLOAD_BYTES`` of payloads, or one read). By age,
        a chunk goes once its newest message is older than ``older_than``.
        Deletes ``PRUNE_CHUNK_ROWS`` chunks per transaction, so a running server's commits
        are held up only briefly. The file does not shrink: SQLite reuses the freed pages
        for new messages.

        Raises:
            ValueError: neither condition was given.
            StoreUnavailable: SQLite failed (rows deleted by earlier chunks stay deleted).
        """
        if before_id is None and older_than is None:
            raise ValueError("prune needs before_id or older_than")
        conditions: list[str] = []
        parameters: list[float] = []
        if before_id is not None:
            # The first condition is implied by the second; it lets SQLite use the key.
            conditions.append("first_id < ? AND first_id + count <= ?")
            parameters += [before_id, before_id]
        if older_than is not None:
            conditions.append("received_at < ?")
            parameters.append(time.time() - older_than)
        where = " AND ".join(conditions)
        deleted = 0
        while True:
            chunks, messages = await self._run(_delete_chunk, where, parameters)
            deleted += messages
            if chunks < PRUNE_CHUNK_ROWS:
                return deleted

    async def aclose(self) -> None:
        """Close the file (also when cancelled: it waits for at most one short read)."""
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._connection.close, limiter=self._limiter)

    async def _run(self, read: Callable[..., T], *args: object) -> T:
        """Run ``read(connection, *args)`` in a worker thread, one at a time.

        Not abandoned on cancel: reads are short, and the connection must stay usable
        (and closable) once a cancelled read returns.
        """
        return await trio.to_thread.run_sync(
            _read_or_unavailable, read, self._connection, *args, limiter=self._limiter
        )


# -- The worker-thread side: plain blocking sqlite3 calls -------------------------------------


def _connect(path: Path, *, create: bool) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), durable commits."""
    mode = "rwc" if create else "rw"
    # The path's bytes, as the file system has them: a name that is not UTF-8 (Python holds
    # it with surrogate escapes) cannot be encoded as text, and SQLite takes %XX as bytes.
    uri = f"file:{urllib.parse.quote(os.fsencode(path))}?mode={mode}"
    try:
        connection = sqlite3.connect(
            uri,
            uri=True,
            timeout=BUSY_TIMEOUT,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as exc:
        # SQLite says only "unable to open database file". os.path, not Path.is_dir: a
        # path stat refuses (EACCES in a directory one may not search) is no directory,
        # not an OSError raised over the StoreError below.
        if os.path.isdir(path):
            raise StoreError(
                f"{path} is a directory; sqlite:PATH names the database file, "
                f"e.g. sqlite:{path / 'ackservice.db'}"
            ) from exc
        raise StoreError(
            f"cannot open store {path}: {exc}; check that the path is a file you may write"
        ) from exc
    try:
        # FULL, not NORMAL: in WAL mode NORMAL does not fsync the log at each commit, so
        # an ACK could be lost to a power cut. A per-connection setting, so set every time.
        connection.execute("PRAGMA synchronous = FULL")
        _check_schema(connection, path, create=create)
    except sqlite3.DatabaseError as exc:
        connection.close()
        if exc.sqlite_errorname == "SQLITE_NOTADB":
            raise StoreError(
                f"{path} is not a SQLite database; move it away or choose another path"
            ) from exc
        raise StoreError(f"cannot use store {path}: {_detail(exc)}") from exc
    except BaseException:
        connection.close()
        raise
    return connection


def _open_for_writing(path: Path) -> tuple[Path, sqlite3.Connection]:
    path = Path(os.path.abspath(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create the directory of store {path}: {exc.strerror or exc}; "
            "choose a path you may write"
        ) from exc
    connection = _connect(path, create=True)
    # The writer waits for the lock in short steps (see _begin_immediate).
    connection.execute(f"PRAGMA busy_timeout = {int(_BUSY_STEP * 1000)}")
    try:
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    except sqlite3.Error as exc:
        connection.close()
        raise StoreError(f"cannot switch store {path} to WAL mode: {_detail(exc)}") from exc
    if str(mode).lower() != "wal":
        connection.close()
        raise StoreError(
            f"store {path} cannot use WAL mode (SQLite kept {mode!r}); "
            "put it on a local file system"
        )
    return path, connection


def _open_for_reading(path: Path) -> tuple[Path, sqlite3.Connection]:
    path = Path(os.path.abspath(path))
    try:
        exists = path.exists()
    except OSError:  # stat refused (EACCES): SQLite's open fails, and says so as a StoreError
        exists = True
    if not exists:
        raise NoStoreError(path)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        # SQLite takes it for an empty database, which the reader would call "not an
        # ackservice store; choose another path", while a server makes it a store.
        raise NoStoreError(path, empty=True)
    return path, _connect(path, create=False)


def _check_schema(connection: sqlite3.Connection, path: Path, *, create: bool) -> None:
    """Create the schema in a new file, upgrade a version 2 file; refuse a file that is not
    a store we understand."""
    # IMMEDIATE for a server: two servers (or workers) starting on one new or version 2
    # file must not both create or upgrade it. A reader only reads, so it neither waits
    # for a writer's lock (a long commit, a prune, an SQL shell's open transaction) nor
    # writes, unless the file is of version 2 and must be upgraded.
    connection.execute("BEGIN IMMEDIATE" if create else "BEGIN")
    try:
        version = _user_version(connection)
        if version == _RUNS_SCHEMA_VERSION and not create:
            # Again under the write lock: another process may have upgraded it meanwhile.
            connection.rollback()
            _begin_upgrade(connection, path)
            version = _user_version(connection)
        if version == 0:
            tables = connection.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
            if tables or not create:
                raise StoreError(
                    f"{path} is a SQLite database but not an ackservice store; choose another path"
                )
            for statement in _SCHEMA:
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif version == _RUNS_SCHEMA_VERSION:
            # Also by a reader: one that kept reading the file as version 2 while a server
            # upgraded it would take a row of several runs for one.
            _upgrade(connection, path)
        elif version == _OLD_SCHEMA_VERSION:
            raise StoreError(
                f"store {path} was created by an older development version of ackservice "
                f"(schema version {version}); export it with that version or remove it"
            )
        elif version != SCHEMA_VERSION:
            raise StoreError(
                f"store {path} has schema version {version}, and this ackservice "
                f"understands only {SCHEMA_VERSION}; use the ackservice that wrote it"
            )
        connection.execute("COMMIT")
    finally:
        if connection.in_transaction:
            connection.rollback()


def _user_version(connection: sqlite3.Connection) -> int:
    version: int = connection.execute("PRAGMA user_version").fetchone()[0]
    return version


def _begin_upgrade(connection: sqlite3.Connection, path: Path) -> None:
    """``BEGIN IMMEDIATE`` to upgrade a version 2 file.

    Raises:
        StoreError: the file is read-only here.
    """
    with _read_only_refused(path):
        connection.execute("BEGIN IMMEDIATE")


def _upgrade(connection: sqlite3.Connection, path: Path) -> None:
    """Upgrade a version 2 file (in the write transaction open on ``connection``).

    Raises:
        StoreError: the file is read-only here.
    """
    with _read_only_refused(path):
        connection.execute(_UPGRADE_FROM_RUNS)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


@contextlib.contextmanager
def _read_only_refused(path: Path) -> Iterator[None]:
    """SQLite's "attempt to write a readonly database", while upgrading, as what to do."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_READONLY:
            raise
        raise StoreError(
            f"store {path} has schema version 2 and is read-only here, and this ackservice "
            f"reads it only once upgraded to version {SCHEMA_VERSION} (in place, at once); "
            "open it once with write access, or read it with the ackservice that wrote it"
        ) from exc


def _open_writer_lock(path: Path) -> int:
    """The lock file beside the store (``PATH.lock``) that writer processes take turns on."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise StoreError(
            f"cannot open the lock file {lock_path}: {exc.strerror or exc}; "
            "the store's directory must be writable"
        ) from exc


def _insert(
    connection: sqlite3.Connection,
    writer_lock: int,
    batch: Sequence[Message],
    abandoned: threading.Event,
) -> None:
    # Writers from several processes (--workers) take turns on a lock file first: a waiter
    # tries again every _LOCK_STEP (0.2 ms), where SQLite's busy handler sleeps in 1, 2, 5,
    # 10 ms steps and leaves the disk idle between commits (measured: two workers sharing a
    # file were slower than one without it; docs/benchmarks.md). flock, not
    # fcntl locks: those are SQLite's own, and closing any descriptor of a file drops a
    # process's fcntl locks on it. Uncontended, it costs a system call per commit.
    deadline = time.monotonic() + BUSY_TIMEOUT
    if not _take_writer_lock(writer_lock, abandoned, deadline):
        return  # abandoned while waiting: the caller has already answered "unavailable"
    try:
        _insert_locked(connection, batch, abandoned, deadline)
    finally:
        fcntl.flock(writer_lock, fcntl.LOCK_UN)


def _take_writer_lock(writer_lock: int, abandoned: threading.Event, deadline: float) -> bool:
    """Take the writers' lock file; False if the call was abandoned meanwhile.

    Never a blocking flock(): a thread blocked there cannot be told to stop, and the
    abandoned commit would keep the store's limiter, so ``aclose()`` (the graceful
    shutdown) would wait for as long as another process holds the lock. Non-blocking tries
    in ``_LOCK_STEP`` steps instead, with the same deadline and abandon check as
    ``_begin_immediate``.

    Raises:
        StoreUnavailable: another writer held the lock past ``BUSY_TIMEOUT``.
    """
    while True:
        try:
            fcntl.flock(writer_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if abandoned.is_set():
                return False
            if time.monotonic() >= deadline:
                # As SQLITE_BUSY would be: the batch is refused, the next one tries again.
                raise StoreUnavailable(
                    "database is locked (another writer holds the store's lock file)"
                ) from None
            time.sleep(_LOCK_STEP)
        else:
            return True


def _insert_locked(
    connection: sqlite3.Connection,
    batch: Sequence[Message],
    abandoned: threading.Event,
    deadline: float,
) -> None:
    try:
        _begin_immediate(connection, abandoned, deadline)
        if abandoned.is_set():
            _roll_back(connection)
            return
        # Read under the write lock, not cached: another process may have written since.
        next_id: int = connection.execute(_GET_NEXT_ID).fetchone()[0]
        rows, _ = rows_of(batch, next_id)
        connection.executemany(_INSERT, rows)
        if abandoned.is_set():  # the last moment the caller's "unavailable" can stay true
            _roll_back(connection)
            return
        connection.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        # Also undoes a COMMIT that failed (disk full while writing the log): the next
        # batch starts from a clean slate, which is all "recovery" takes.
        _roll_back(connection)
        raise StoreUnavailable(_detail(exc)) from exc
    except BaseException:
        # Anything else (a value SQLite cannot hold, such as a seq above 2**63 - 1) must
        # not leave the transaction open either, or every later BEGIN would fail.
        _roll_back(connection)
        raise


def _begin_immediate(
    connection: sqlite3.Connection, abandoned: threading.Event, deadline: float
) -> None:
    """Take the write lock, waiting until ``deadline`` (the one the lock file's wait had:
    ``BUSY_TIMEOUT`` in all, not twice) for another writer, in short steps so that a call
    the server gave up on stops waiting (SQLite's own busy wait cannot be interrupted)."""
    while True:
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if (
                exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY
                or abandoned.is_set()
                or time.monotonic() >= deadline
            ):
                raise
        else:
            return


def _roll_back(connection: sqlite3.Connection) -> None:
    """Roll back whatever is open; a failure here changes nothing for the caller."""
    with contextlib.suppress(sqlite3.Error):
        connection.rollback()


def _read_or_unavailable(
    read: Callable[..., T], connection: sqlite3.Connection, *args: object
) -> T:
    try:
        return read(connection, *args)
    except sqlite3.DatabaseError as exc:
        _roll_back(connection)
        raise StoreUnavailable(_detail(exc)) from exc


def _detail(exc: sqlite3.Error) -> str:
    """SQLite's own short message ("database or disk is full"), on one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_page(connection: sqlite3.Connection, after: int) -> tuple[bool, list[StoredMessage]]:
    """Whether the page is full (more chunks may follow), and its messages with ``id >
    after``: ``PAGE_ROWS`` chunks, or fewer once they hold ``PAGE_BYTES`` of payloads."""
    messages: list[StoredMessage] = []
    rows = nbytes = 0
    # Closed when done: a statement left unfinished would hold its read snapshot.
    with contextlib.closing(connection.execute(_SELECT_PAGE, (after, PAGE_ROWS))) as cursor:
        for row in cursor:
            stored_messages(row, after, messages)
            rows += 1
            nbytes += len(row[9])
            if nbytes >= PAGE_BYTES:
                return True, messages
    return rows == PAGE_ROWS, messages


def _data_version(connection: sqlite3.Connection) -> int:
    version: int = connection.execute("PRAGMA data_version").fetchone()[0]
    return version


def _stats(connection: sqlite3.Connection) -> StoreStats:
    # One read transaction, so the count and the ends describe the same moment.
    connection.execute("BEGIN")
    try:
        count, nbytes, first_id, last_id = connection.execute(
            "SELECT coalesce(sum(count), 0), coalesce(sum(length(payloads)), 0),"
            " min(first_id), max(first_id + count - 1) FROM chunks"
        ).fetchone()
        first_at = _received_at(connection, "ASC")
        last_at = _received_at(connection, "DESC")
    finally:
        connection.rollback()
    return StoreStats(count, nbytes, first_id, last_id, first_at, last_at)


def _received_at(connection: sqlite3.Connection, order: str) -> float | None:
    """When the first (``ASC``) or last (``DESC``) message was received."""
    row = connection.execute(
        f"SELECT first_id, count, received_at, runs FROM chunks ORDER BY first_id {order} LIMIT 1"
    ).fetchone()
    return None if row is None else received_at_of(row, last=order == "DESC")


def _delete_chunk(
    connection: sqlite3.Connection, where: str, parameters: list[float]
) -> tuple[int, int]:
    """Delete up to ``PRUNE_CHUNK_ROWS`` chunks matching ``where``, in one transaction;
    return how many chunks and how many messages went."""
    # Only our own fixed conditions are formatted in; the values are bound.
    selected = (
        f"SELECT first_id, count FROM chunks WHERE {where}"
        f" ORDER BY first_id LIMIT {PRUNE_CHUNK_ROWS}"
    )
    connection.execute("BEGIN IMMEDIATE")
    connection.execute(_KEEP_NEXT_ID)
    # Counted and deleted under the same write lock, so both see the same chunks.
    chunks, messages = connection.execute(
        f"SELECT count(*), coalesce(sum(count), 0) FROM ({selected})", parameters
    ).fetchone()
    connection.execute(
        f"DELETE FROM chunks WHERE first_id IN (SELECT first_id FROM ({selected}))", parameters
    )
    connection.execute("COMMIT")
    return int(chunks), int(messages)
