"""The reply checker, sans-IO: reply bytes in, counts and latencies out."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ackservice.bench.payload import PayloadPool
from ackservice.bench.verify import ReplyChecker, Tally
from ackservice.errors import ProtocolError
from ackservice.protocol import ack_line, err_line

SALT = 11


def checker_expecting(count: int, size: int = 16) -> tuple[ReplyChecker, Tally, PayloadPool]:
    """A checker with messages 1..count sent at time 0, inside the measurement window."""
    tally = Tally()
    tally.window_start, tally.window_end = 0.0, 100.0
    pool = PayloadPool(size)
    checker = ReplyChecker(tally)
    checker.expect(pool.expected(1, count, SALT), count, origin=0.0, sent_at=0.0)
    return checker, tally, pool


def nonzero(errors: dict[str, int]) -> dict[str, int]:
    return {kind: count for kind, count in errors.items() if count}


@given(st.lists(st.integers(min_value=0, max_value=40 * 30), max_size=20))
def test_correct_replies_in_any_chunking_all_count(cuts: list[int]) -> None:
    """However the correct reply stream is split into reads, every reply counts as a
    correct ack, with its latency, and there are no errors."""
    checker, tally, pool = checker_expecting(40)
    stream = pool.expected(1, 40, SALT)
    bounds = [0, *sorted(cut for cut in cuts if cut < len(stream)), len(stream)]
    for start, end in itertools.pairwise(bounds):
        checker.absorb(stream[start:end], now=0.5)
    assert tally.acks == tally.replies == 40
    assert checker.outstanding == 0
    assert tally.error_total == 0
    assert tally.histogram.count == 40
    assert tally.histogram.max == 500_000_000


@pytest.mark.parametrize(
    ("bad_reply", "kind"),
    [
        (b"ACK 2 16 00000000\n", "crc"),
        (b"ACK 3 16 %08x\n", "seq"),
        (b"ACK 2 15 %08x\n", "nbytes"),
        (b"HELLO\n", "format"),
        (b"ACK 2 16 %08X\n", "format"),  # the right numbers, upper-case hex
        (b"ACK 2 16 %08x\r\n", "format"),
    ],
)
def test_a_wrong_reply_is_counted_by_kind(bad_reply: bytes, kind: str) -> None:
    """A reply that does not prove message 2 arrived intact is one error of its kind; it
    still answers message 2 (replies match by order), and the others stay correct."""
    checker, tally, pool = checker_expecting(3)
    crc = int(ack_line(2, pool.payload(2, SALT)).split()[3], 16)
    if b"%" in bad_reply:
        bad_reply = bad_reply % crc
    replies = ack_line(1, pool.payload(1, SALT)) + bad_reply + ack_line(3, pool.payload(3, SALT))
    checker.absorb(replies, now=1.0)
    assert nonzero(tally.errors) == {kind: 1}
    assert tally.acks == 2
    assert checker.outstanding == 0
    assert tally.histogram.count == 2


def test_err_replies_are_counted_by_code() -> None:
    """ERR <seq> lines are err_reply errors, broken down by code; each answers its message."""
    checker, tally, pool = checker_expecting(3)
    checker.absorb(
        err_line(1, "rejected", "no thanks")
        + err_line(2, "too-large", "message exceeds 4 bytes")
        + ack_line(3, pool.payload(3, SALT)),
        now=1.0,
    )
    assert nonzero(tally.errors) == {"err_reply": 2}
    assert tally.err_codes == {"rejected": 1, "too-large": 1}
    assert checker.outstanding == 0
    assert tally.acks == 1


def test_err_0_answers_no_message_and_marks_the_connection_closing() -> None:
    """ERR 0 is about the connection: counted by code, it answers no message."""
    checker, tally, _ = checker_expecting(2)
    checker.absorb(err_line(0, "shutting-down", "server is shutting down"), now=1.0)
    assert checker.closed_by_server == "shutting-down"
    assert checker.outstanding == 2
    assert tally.err_codes == {"shutting-down": 1}
    assert checker.abandon() == 2


def test_a_reply_with_nothing_outstanding_is_unexpected() -> None:
    """A reply when no message waits for one is an 'unexpected' error."""
    checker, tally, pool = checker_expecting(1)
    checker.absorb(ack_line(1, pool.payload(1, SALT)) + b"ACK 2 16 00000000\n", now=1.0)
    assert nonzero(tally.errors) == {"unexpected": 1}
    assert tally.acks == 1


def test_a_reply_line_cut_off_by_the_close_is_a_format_error() -> None:
    """Bytes without a newline when the server closes are a broken reply line."""
    checker, tally, _ = checker_expecting(1)
    checker.absorb(b"ACK 1 16", now=1.0)
    checker.at_eof()
    assert nonzero(tally.errors) == {"format": 1}


def test_an_endless_reply_line_is_refused() -> None:
    """A reply line longer than any valid one raises, instead of buffering without bound."""
    checker, _, _ = checker_expecting(1)
    checker.absorb(b"A" * 1000, now=1.0)  # long, but a reply line could still be this long
    with pytest.raises(ProtocolError, match="longer than"):
        checker.absorb(b"A" * 100, now=1.0)


def test_latency_is_recorded_only_for_messages_sent_in_the_window() -> None:
    """Warm-up messages are answered and checked but leave no latency sample."""
    tally = Tally()
    tally.window_start, tally.window_end = 10.0, 20.0
    pool = PayloadPool(8)
    checker = ReplyChecker(tally)
    checker.expect(pool.expected(1, 2, 0), 2, origin=5.0, sent_at=5.0)  # warm-up
    checker.expect(pool.expected(3, 1, 0), 1, origin=12.0, sent_at=12.0)
    checker.absorb(pool.expected(1, 3, 0), now=12.5)
    assert tally.replies == 3
    assert tally.acks == 3  # received inside the window
    assert tally.histogram.count == 1
    assert tally.histogram.max == 500_000_000


def test_open_loop_latencies_run_from_each_scheduled_time() -> None:
    """Messages sent together but scheduled apart each get their own latency."""
    tally = Tally()
    tally.window_start, tally.window_end = 0.0, 100.0
    pool = PayloadPool(8)
    checker = ReplyChecker(tally)
    # Scheduled at 1.0, 1.1, 1.2, all sent late at 1.5 (a stalled server held the window).
    checker.expect(pool.expected(1, 3, 0), 3, origin=1.0, sent_at=1.5, spacing=0.1)
    checker.absorb(pool.expected(1, 3, 0), now=2.0)
    assert tally.histogram.max == pytest.approx(1_000_000_000, rel=1e-3)
    assert tally.histogram.min == pytest.approx(800_000_000, rel=1e-2)
