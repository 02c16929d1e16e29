"""The total-queue checker, after Jepsen's: is every acknowledged message in the application?

Two histories are compared:

- the server side: every message the application hook accepted, one ``Recorded`` line
  each, written by ``recording_server.py`` before the hook returns (so before the ACK);
- the client side: every message written on the wire (with how many times) and every ACK
  seen, kept in a ``History``.

A run is valid when nothing acknowledged is missing (**lost = 0**), nothing recorded was
never sent (**unexpected = 0**), and a message recorded more than once was written more
than once, which only happens when it was unacknowledged when its connection broke
(at-least-once delivery). ``check`` returns a ``Verdict``; ``Verdict.assert_valid`` fails
the test with the first offenders listed.

Messages are told apart by a payload id (``@<id>|`` at the start of the payload, see
``make_payload``). A payload that carries none is keyed by its connection and seq
(``<peer>#<seq>``), which is unambiguous for a connection that never breaks. A run with
so many connections that the system reuses local ports starts each connection with a
tag message, ``@conn-<name>|``: the rest of that connection is then keyed
``conn-<name>#<seq>``.

This module is also imported by ``recording_server.py`` (which runs as a script in its own
process), so it imports nothing from trio or the tests' other helpers.
"""

from __future__ import annotations

import random
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "History",
    "Recorded",
    "Verdict",
    "check",
    "connection_tag",
    "filler_block",
    "make_payload",
    "message_key",
    "payload_id",
    "read_records",
    "record_keys",
]

_ID_START = b"@"
_ID_END = b"|"
_ID_MAX = 48
_ID_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
CONNECTION_TAG = "conn-"


def payload_id(payload: bytes) -> str | None:
    """The id a payload carries (``@<id>|...``), or None when it carries none."""
    if payload[:1] != _ID_START:
        return None
    end = payload.find(_ID_END, 1, _ID_MAX + 2)
    if end < 2:
        return None
    raw = payload[1:end]
    if not _ID_CHARS.issuperset(raw):
        return None
    return raw.decode("ascii")


def message_key(payload: bytes, connection: str, seq: int) -> str:
    """How both sides name a message: its payload id, else ``<connection>#<seq>``, where
    the connection is named by its tag (see the module docstring) or its peer address."""
    return payload_id(payload) or f"{connection}#{seq}"


def connection_tag(name: str) -> bytes:
    """The first message of a tagged connection (see the module docstring)."""
    return b"@%s%s|" % (CONNECTION_TAG.encode(), name.encode("ascii"))


def filler_block(size: int = 1 << 20, seed: int = 0) -> bytes:
    """Random bytes to cut payload bodies from: any byte but ``\\n`` (which would end the
    message) and ``@`` (so a body never looks like an id); NUL, ``\\r`` and 0xFF included."""
    block = random.Random(seed).randbytes(size)
    return block.replace(b"\n", b"N").replace(b"@", b"A")


def make_payload(pid: str, size: int, filler: bytes, offset: int = 0) -> bytes:
    """A payload of exactly ``size`` bytes carrying ``pid`` when there is room for it.

    The body is cut from ``filler`` (see ``filler_block``) at ``offset``; a payload shorter
    than its header carries no id, and is keyed by connection and seq instead.
    """
    header = b"@%s|" % pid.encode("ascii")
    if size < len(header):
        header = b""
    body_size = size - len(header)
    start = offset % max(1, len(filler) - body_size) if body_size < len(filler) else 0
    body = filler[start : start + body_size]
    while len(body) < body_size:  # only for bodies longer than the filler block
        body += filler[: body_size - len(body)]
    return header + body


@dataclass(frozen=True, slots=True)
class Recorded:
    """One message the application hook accepted, as the recording server wrote it."""

    boot: int
    conn: int
    peer: str
    seq: int
    nbytes: int
    crc32: int
    pid: str | None

    def line(self) -> bytes:
        """The record line (space-separated; ``-`` for no id)."""
        return b"%d %d %s %d %d %08x %s\n" % (
            self.boot,
            self.conn,
            self.peer.encode(),
            self.seq,
            self.nbytes,
            self.crc32,
            (self.pid or "-").encode(),
        )

    @classmethod
    def parse(cls, line: str) -> Recorded:
        boot, conn, peer, seq, nbytes, crc, pid = line.split(" ")
        return cls(
            int(boot),
            int(conn),
            peer,
            int(seq),
            int(nbytes),
            int(crc, 16),
            None if pid == "-" else pid,
        )


def read_records(path: Path) -> list[Recorded]:
    """Every complete record line in ``path`` (a line cut short by SIGKILL is skipped: its
    message was not acknowledged, since the ACK is sent after the line is written)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="ascii")
    lines = text.split("\n")
    lines.pop()  # "" after the final newline, or a partial last line
    return [Recorded.parse(line) for line in lines]


@dataclass(slots=True)
class _Sent:
    payload: bytes
    nbytes: int
    crc32: int
    writes: int = 0


@dataclass(slots=True)
class History:
    """The client side: what was written, how often, and which ACKs came back.

    ``written`` is called each time a complete message goes out on the wire, ``acked``
    for each ACK seen. Keys come from ``message_key``.
    """

    sent: dict[str, _Sent] = field(default_factory=dict)
    acks: Counter[str] = field(default_factory=Counter)
    bad_acks: list[str] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)

    def written(self, key: str, payload: bytes) -> None:
        entry = self.sent.get(key)
        if entry is None:
            entry = self.sent[key] = _Sent(payload, len(payload), zlib.crc32(payload))
        elif entry.payload != payload:
            raise AssertionError(f"two different payloads use the key {key!r}")
        entry.writes += 1

    def acked(self, key: str, nbytes: int, crc32: int) -> None:
        entry = self.sent.get(key)
        if entry is None or (entry.nbytes, entry.crc32) != (nbytes, crc32):
            self.bad_acks.append(key)
        self.acks[key] += 1

    def refused_by_server(self, key: str) -> None:
        self.refused[key] += 1

    def merge(self, other: History) -> None:
        """Add another client's history (keys must not collide)."""
        for key, entry in other.sent.items():
            mine = self.sent.setdefault(key, _Sent(entry.payload, entry.nbytes, entry.crc32))
            mine.writes += entry.writes
        self.acks.update(other.acks)
        self.bad_acks += other.bad_acks
        self.refused.update(other.refused)


@dataclass(slots=True)
class Verdict:
    """The checker's findings; ``assert_valid`` turns them into a test failure."""

    sent: int
    written: int
    acked: int
    recorded: int
    lost: list[str]
    unexpected: list[Recorded]
    bad_duplicates: list[str]
    bad_acks: list[str]
    duplicates: int
    torn: list[Recorded]

    def summary(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "writes": self.written,
            "acked": self.acked,
            "recorded": self.recorded,
            "lost": len(self.lost),
            "unexpected": len(self.unexpected),
            "duplicates": self.duplicates,
            "bad_duplicates": len(self.bad_duplicates),
            "bad_acks": len(self.bad_acks),
            "torn": len(self.torn),
        }

    def assert_valid(self, *, torn_allowed: bool = False) -> None:
        problems = []
        if self.lost:
            problems.append(f"lost (acked, never recorded): {self.lost[:5]}")
        if self.unexpected:
            problems.append(f"unexpected (recorded, never sent): {self.unexpected[:5]}")
        if self.bad_duplicates:
            problems.append(f"recorded more often than written: {self.bad_duplicates[:5]}")
        if self.bad_acks:
            problems.append(f"ACK for something not sent as acked: {self.bad_acks[:5]}")
        if self.torn and not torn_allowed:
            problems.append(f"torn (a prefix of a sent message recorded): {self.torn[:5]}")
        assert not problems, f"{self.summary()}; " + "; ".join(problems)


def record_keys(records: list[Recorded]) -> list[str]:
    """Each record's message key, as ``message_key`` names it on the client side."""
    tags = {
        (record.boot, record.conn): record.pid
        for record in records
        if record.seq == 1 and record.pid and record.pid.startswith(CONNECTION_TAG)
    }
    return [
        record.pid or f"{tags.get((record.boot, record.conn), record.peer)}#{record.seq}"
        for record in records
    ]


def check(history: History, records: list[Recorded]) -> Verdict:
    """Compare the client history with the server's records (see the module docstring).

    A record that matches no message sent but is a strict prefix of one is counted as
    *torn*, not unexpected: a client killed in the middle of a write leaves a partial
    line, and the protocol makes bytes before a clean EOF a final message. Whether that
    is allowed is the scenario's call (``Verdict.assert_valid(torn_allowed=...)``).
    """
    times_recorded: Counter[str] = Counter()
    unexpected: list[Recorded] = []
    torn: list[Recorded] = []
    for record, key in zip(records, record_keys(records), strict=True):
        entry = history.sent.get(key)
        if entry is not None and (entry.nbytes, entry.crc32) == (record.nbytes, record.crc32):
            times_recorded[key] += 1
        elif _is_torn(record, key, history):
            torn.append(record)
        else:
            unexpected.append(record)
    lost = [key for key in history.acks if key not in times_recorded]
    bad_duplicates = [
        key for key, count in times_recorded.items() if count > history.sent[key].writes
    ]
    return Verdict(
        sent=len(history.sent),
        written=sum(entry.writes for entry in history.sent.values()),
        acked=len(history.acks),
        recorded=len(records),
        lost=lost,
        unexpected=unexpected,
        bad_duplicates=bad_duplicates,
        bad_acks=list(history.bad_acks),
        duplicates=sum(count - 1 for count in times_recorded.values()),
        torn=torn,
    )


def _is_torn(record: Recorded, key: str, history: History) -> bool:
    """Whether ``record`` is a strict prefix of a message that was written."""
    entry = history.sent.get(key)
    if entry is not None:
        candidates = [entry]
    elif record.pid is None:
        # The cut fell inside the id (or the payload never had one): any message could be it.
        candidates = list(history.sent.values())
    else:
        return False
    return any(
        record.nbytes < e.nbytes and zlib.crc32(e.payload[: record.nbytes]) == record.crc32
        for e in candidates
    )
