"""The SQLite store's rows: a commit's messages packed into ``chunks`` rows, and back.

Pure (no SQLite, no I/O), so the format can be tested on its own. A row costs SQLite and
the ``sqlite3`` module a few microseconds of CPU whatever it holds, so a commit is written
as few rows as its size allows: the runs of one commit (a run is the consecutive messages
of one connection's read: same ``conn_id``, ``peer``, ``identity`` and ``received_at``,
consecutive ``seq``) share a row until it holds ``ROW_PAYLOAD_BYTES`` of payloads.
Request/response over 64 connections made 64 rows a commit in schema version 2; now one.

A row (schema version 3)::

    first_id, count, received_at, peer, conn_id, first_seq, identity,
    lengths, crc32s, payloads, runs

Message ``k`` (from 0) of a row has id ``first_id + k``; ``lengths`` and ``crc32s`` hold
``count`` little-endian uint32s, ``payloads`` the payloads concatenated. ``runs`` is NULL
when the row holds one run (every row of schema version 2): the row's own ``received_at``,
``peer``, ``conn_id``, ``first_seq`` and ``identity`` are the run's, and message ``k`` has
seq ``first_seq + k``. Otherwise ``runs`` describes the ``n`` runs, in id order, in columns
(little-endian)::

    n: uint32
    counts: n uint32, conn_ids: n int64, first_seqs: n int64, received_ats: n float64,
    peer_sizes: n uint32, identity_sizes: n uint32 (0xFFFFFFFF: no identity),
    the peers, then the identities there are, in UTF-8

and the row's ``peer``, ``conn_id``, ``first_seq`` and ``identity`` are its first run's, its
``received_at`` the newest of its runs' (pruning by age then never deletes a message
younger than asked). Binary rather than JSON, as the other columns: JSON took 50 us to
write for the 64 runs of a request/response commit, this 21.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from itertools import chain
from operator import attrgetter
from typing import Any, Final

from .base import Message, StoredMessage, StoreUnavailable
from .batch import MessageBatch, MessageRun

__all__ = [
    "ROW_PAYLOAD_BYTES",
    "Row",
    "received_at_of",
    "rows_of",
    "runs_of",
    "stored_messages",
]

ROW_PAYLOAD_BYTES: Final = 1 << 20
"""Payload bytes beyond which a commit's next run starts a new row (a run is never split):
bounds what a reader holds for one row, and a page of rows, while small commits stay one
row."""

Row = tuple[object, ...]

# A uint32 array type (``I`` is 4 bytes on every platform CPython supports, but check) and
# whether its native byte order must be swapped to the file's little-endian.
_U32: Final = "I" if array("I").itemsize == 4 else "L"
_SWAP: Final = sys.byteorder != "little"


def rows_of(
    batch: Sequence[Message], next_id: int, *, row_bytes: int = ROW_PAYLOAD_BYTES
) -> tuple[list[Row], int]:
    """The rows holding ``batch`` (not empty), the first numbered ``next_id``; and the id
    after the last message. A row holds runs up to ``row_bytes`` of payloads, or one run.

    Raises:
        OverflowError: a CRC-32 or a payload length does not fit in 32 bits, a ``conn_id``
            or ``seq`` in 64.
        ValueError: a run's columns were changed after it was made and no longer have one
            CRC-32 per payload (such a row could not be read back: it would be "damaged").
    """
    runs = batch.runs if isinstance(batch, MessageBatch) else runs_of(batch)
    runs = [run for run in runs if run.payloads]
    for run in runs:
        if len(run.crc32s) != len(run.payloads):
            raise ValueError(
                f"a run of {len(run.payloads)} payloads has {len(run.crc32s)} CRC-32s (changed "
                "after it was made)"
            )
    payloads = list(chain.from_iterable(map(_payloads_of, runs)))
    lengths = array(_U32, map(len, payloads))
    rows: list[Row] = []
    if sum(lengths) <= row_bytes:  # the usual case: the whole commit is one row
        _add_row(rows, runs, next_id, payloads, lengths)
        return rows, next_id + len(payloads)
    start = end = 0  # the group's messages: payloads[start:end]
    group: list[MessageRun] = []
    group_bytes = 0
    for run in runs:
        run_bytes = sum(map(len, run.payloads))
        if group and group_bytes + run_bytes > row_bytes:
            _add_row(rows, group, next_id + start, payloads[start:end], lengths[start:end])
            start, group, group_bytes = end, [], 0
        group.append(run)
        group_bytes += run_bytes
        end += len(run.payloads)
    _add_row(rows, group, next_id + start, payloads[start:], lengths[start:])
    return rows, next_id + len(payloads)


def _add_row(
    rows: list[Row],
    group: list[MessageRun],
    first_id: int,
    payloads: Sequence[bytes],
    lengths: array[int],
) -> None:
    """Append the row of ``group``'s runs (their ``payloads``, of ``lengths``) to ``rows``."""
    first = group[0]
    if len(group) == 1:
        crc32s = array(_U32, first.crc32s)
        received_at = first.received_at
        runs = None
    else:
        crc32s = array(_U32, chain.from_iterable(map(_crc32s_of, group)))
        received_at = max(map(_received_at_of, group))
        runs = _described(group)
    if _SWAP:
        lengths = array(_U32, lengths)  # a copy: the caller's is in native order
        lengths.byteswap()
        crc32s.byteswap()
    rows.append(
        (
            first_id,
            len(payloads),
            received_at,
            first.peer,
            first.conn_id,
            first.first_seq,
            first.identity,
            lengths.tobytes(),
            crc32s.tobytes(),
            b"".join(payloads),
            runs,
        )
    )


_payloads_of = attrgetter("payloads")
_crc32s_of = attrgetter("crc32s")
_received_at_of = attrgetter("received_at")
_identity_of = attrgetter("identity")
_NO_IDENTITY: Final = 0xFFFFFFFF


def _described(group: list[MessageRun]) -> bytes:
    """The ``runs`` column of a row holding ``group`` (see the module docstring)."""
    peers = [run.peer.encode() for run in group]
    encoded = [None if i is None else i.encode() for i in map(_identity_of, group)]
    identities = [i for i in encoded if i is not None]
    identity_sizes = array(_U32, [_NO_IDENTITY if i is None else len(i) for i in encoded])
    columns = [
        array(_U32, [len(group)]),
        array(_U32, map(len, map(_payloads_of, group))),
        array("q", map(attrgetter("conn_id"), group)),
        array("q", map(attrgetter("first_seq"), group)),
        array("d", map(_received_at_of, group)),
        array(_U32, map(len, peers)),
        identity_sizes,
    ]
    if _SWAP:
        for column in columns:
            column.byteswap()
    return b"".join([*(column.tobytes() for column in columns), *peers, *identities])


def runs_of(messages: Sequence[Message]) -> list[MessageRun]:
    """``messages`` cut into runs (consecutive seqs of one connection's read), for a batch
    that is not a ``MessageBatch`` already (an embedder's list)."""
    runs: list[MessageRun] = []
    run: MessageRun | None = None
    for m in messages:
        if (
            run is not None
            and m.seq == run.first_seq + len(run.payloads)
            and m.conn_id == run.conn_id
            and m.received_at == run.received_at
            and m.peer == run.peer
            and m.identity == run.identity
        ):
            run.payloads.append(m.payload)
            run.crc32s.append(m.crc32)
            continue
        run = MessageRun(
            [m.payload], [m.crc32], m.received_at, m.peer, m.conn_id, m.seq, m.identity
        )
        runs.append(run)
    return runs


def stored_messages(row: Sequence[Any], after: int, into: list[StoredMessage]) -> None:
    """Append the messages of ``row`` (as ``rows_of`` made it, or a schema version 2 row
    with ``runs`` NULL) whose id is above ``after`` to ``into``.

    Raises:
        StoreUnavailable: the row is damaged (its sizes or its runs do not add up).
    """
    (
        first_id,
        count,
        received_at,
        peer,
        conn_id,
        first_seq,
        identity,
        lengths_blob,
        crc32s_blob,
        payloads,
        runs,
    ) = row
    lengths = _uint32s(lengths_blob)
    crc32s = _uint32s(crc32s_blob)
    if (
        lengths is None
        or crc32s is None
        or not isinstance(payloads, bytes)
        or len(lengths) != count
        or len(crc32s) != count
        or sum(lengths) != len(payloads)
    ):
        raise StoreUnavailable(f"chunk {first_id} is damaged (its sizes do not add up)")
    described = [(count, received_at, peer, conn_id, first_seq, identity)]
    if runs is not None:
        described = _runs_described(first_id, count, runs)
    message_id = first_id
    k = 0  # the message's place in the row
    offset = 0
    append = into.append
    for run_count, run_received_at, run_peer, run_conn_id, run_first_seq, run_identity in described:
        for seq in range(run_first_seq, run_first_seq + run_count):
            end = offset + lengths[k]
            if message_id > after:
                append(
                    StoredMessage(
                        message_id,
                        run_received_at,
                        run_peer,
                        run_conn_id,
                        seq,
                        crc32s[k],
                        payloads[offset:end],
                        run_identity,
                    )
                )
            message_id += 1
            k += 1
            offset = end


def _uint32s(blob: object) -> array[int] | None:
    """The little-endian uint32s of a ``lengths`` or ``crc32s`` column; None if it is not
    a blob of whole uint32s (an SQL tool may have written anything there)."""
    if not isinstance(blob, bytes) or len(blob) % 4:
        return None
    column = array(_U32, blob)
    if _SWAP:
        column.byteswap()
    return column


def received_at_of(row: Sequence[Any], *, last: bool) -> float:
    """When the first (or ``last``) message of a row was received; ``row``: its
    ``first_id, count, received_at, runs``.

    Raises:
        StoreUnavailable: the row's runs are damaged.
    """
    first_id, count, received_at, runs = row
    if runs is None:
        return float(received_at)
    described = _runs_described(first_id, count, runs)
    return float(described[-1 if last else 0][1])


def _runs_described(first_id: int, count: int, runs: object) -> list[tuple[Any, ...]]:
    """The runs of a row that holds several, from its ``runs`` column, checked:
    ``(count, received_at, peer, conn_id, first_seq, identity)`` each."""
    try:
        described = _runs_in(runs)  # type: ignore[arg-type]
    except (TypeError, ValueError, IndexError):  # not bytes, sizes beyond its end, not UTF-8
        described = None
    if (
        described is None
        or len(described) < 2
        or any(run[0] <= 0 for run in described)
        or sum(run[0] for run in described) != count
    ):
        raise StoreUnavailable(f"chunk {first_id} is damaged (its runs do not add up)")
    return described


def _runs_in(blob: bytes) -> list[tuple[Any, ...]] | None:
    """The runs ``_described`` wrote into ``blob``; None if its sizes do not add up."""
    (n,) = _column(blob, 0, _U32, 1)
    offset = 4
    columns = []
    for typecode, size in ((_U32, 4), ("q", 8), ("q", 8), ("d", 8), (_U32, 4), (_U32, 4)):
        columns.append(_column(blob, offset, typecode, n))
        offset += n * size
    counts, conn_ids, first_seqs, received_ats, peer_sizes, identity_sizes = columns
    peers = []
    for size in peer_sizes:
        peers.append(blob[offset : offset + size].decode())
        offset += size
    identities: list[str | None] = []
    for size in identity_sizes:
        if size == _NO_IDENTITY:
            identities.append(None)
            continue
        identities.append(blob[offset : offset + size].decode())
        offset += size
    if offset != len(blob):
        return None
    return list(zip(counts, received_ats, peers, conn_ids, first_seqs, identities, strict=True))


def _column(blob: bytes, offset: int, typecode: str, n: int) -> array[Any]:
    """``n`` little-endian items of ``typecode`` at ``offset`` in ``blob``.

    Raises:
        ValueError: ``blob`` ends before them.
    """
    column = array(typecode)
    end = offset + n * column.itemsize
    if end > len(blob):
        raise ValueError("the runs column ends early")
    column.frombytes(blob[offset:end])
    if _SWAP:
        column.byteswap()
    return column
