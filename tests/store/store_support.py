"""Helpers the store tests share: messages and runs of them as the server hands them over
(a hypothesis strategy for runs among them), and a SQLite store file written, read back and
counted through the real store.

Imported by name (pytest puts this directory on ``sys.path``); the name ``store_support``
keeps it apart from ``tests/support.py`` and any other test directory's helpers.
"""

from __future__ import annotations

import contextlib
import sqlite3
import zlib
from pathlib import Path

from hypothesis import strategies as st

from ackservice.store.base import Message, StoredMessage
from ackservice.store.batch import MessageRun
from ackservice.store.sqlite import SQLiteReader, SQLiteStore

# --- messages and runs of them ------------------------------------------------------------


def message(
    payload: bytes,
    seq: int = 1,
    *,
    identity: str | None = None,
    conn_id: int = 7,
    received_at: float = 1_700_000_000.5,
) -> Message:
    """A message as the server would hand it over (one read's share ``received_at``)."""
    return Message(
        payload=payload,
        crc32=zlib.crc32(payload),
        received_at=received_at,
        peer=f"127.0.0.1:{40000 + conn_id}",
        conn_id=conn_id,
        seq=seq,
        identity=identity,
    )


_payloads = st.lists(st.binary(max_size=20), min_size=1, max_size=6)


@st.composite
def runs(draw: st.DrawFn) -> list[MessageRun]:
    """Runs of distinct connections (one read each, as a commit holds them)."""
    made = []
    for conn_id in range(1, draw(st.integers(1, 5)) + 1):
        payloads = draw(_payloads)
        made.append(
            MessageRun(
                payloads,
                [zlib.crc32(p) for p in payloads],
                draw(st.floats(0, 2e9)),
                f"127.0.0.1:{40000 + conn_id}",
                conn_id,
                draw(st.integers(1, 2**40)),
                draw(st.none() | st.just("CN=client")),
            )
        )
    return made


def as_messages(made: list[MessageRun]) -> list[Message]:
    """The messages of ``made``, one by one, as a list of ``Message`` would hold them."""
    return [
        Message(p, c, r.received_at, r.peer, r.conn_id, r.first_seq + i, r.identity)
        for r in made
        for i, (p, c) in enumerate(zip(r.payloads, r.crc32s, strict=True))
    ]


# --- a SQLite store file ----------------------------------------------------------------


async def read_all(path: Path, after: int = 0) -> list[StoredMessage]:
    """Everything the store at ``path`` holds (with ``id > after``), through a reader."""
    reader = await SQLiteReader.open(path)
    try:
        return [m async for m in reader.messages(after=after)]
    finally:
        await reader.aclose()


async def store_batches(path: Path, batches: list[list[Message]]) -> None:
    """Store each batch in its own commit."""
    store = await SQLiteStore.open(path)
    try:
        for batch in batches:
            assert await store.store(batch) is None
    finally:
        await store.aclose()


def as_stored(first_id: int, sent: list[Message]) -> list[StoredMessage]:
    """What reading back ``sent`` must give, numbered from ``first_id``."""
    return [
        StoredMessage(
            first_id + n, m.received_at, m.peer, m.conn_id, m.seq, m.crc32, m.payload, m.identity
        )
        for n, m in enumerate(sent)
    ]


def chunk_count(path: Path) -> int:
    """How many rows the store's ``chunks`` table holds."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        count: int = connection.execute("SELECT count(*) FROM chunks").fetchone()[0]
        return count
