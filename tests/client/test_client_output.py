"""What the command-line client prints, checked without a terminal."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ackservice.client.output import (
    Reporter,
    Tally,
    format_progress,
    format_reply,
    format_summary,
    reply_json,
    summary_json,
)
from ackservice.protocol import Ack, Err


def test_ack_line_shows_the_reply_and_round_trip_time() -> None:
    """A human ACK line: message number, the reply as on the wire, milliseconds."""
    line = format_reply(1, Ack(1, 5, 0x3610A686), 0.00042, 1)
    assert line == "message 1: ACK 1 5 3610a686 (0.42 ms)"


def test_resent_message_says_so() -> None:
    """A message written more than once (after a reconnect) is marked as such."""
    line = format_reply(7, Ack(2, 1, 0xFF), 0.001, 2)
    assert line == "message 7: ACK 2 1 000000ff (1.00 ms, sent 2 times)"


def test_err_line_shows_code_and_detail() -> None:
    """A refused message shows the server's ERR line."""
    assert format_reply(3, Err(3, "rejected", "no thanks"), 0.0, 1) == (
        "message 3: ERR 3 rejected no thanks"
    )


@settings(max_examples=500)
@given(
    st.integers(1, 2**64),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**30),
    st.integers(0, 2**32 - 1),
    st.floats(0, 1e6, allow_nan=False, allow_infinity=False),
    st.integers(1, 10**6),
)
def test_an_ack_object_is_what_json_dumps_writes(
    number: int, seq: int, nbytes: int, crc: int, rtt: float, attempts: int
) -> None:
    """``--json`` writes an ACK's object without ``json.dumps`` (it costs more than the rest
    of a message's work): byte for byte what it would write, in the same order."""
    fields = {
        "message": number,
        "seq": seq,
        "status": "acked",
        "nbytes": nbytes,
        "crc32": f"{crc:08x}",
        "rtt_ms": round(rtt * 1000, 3),
        "attempts": attempts,
    }
    assert reply_json(number, Ack(seq, nbytes, crc), rtt, attempts) == json.dumps(fields)


def test_json_objects_carry_every_field() -> None:
    """``--json``: one object per reply, with a ``status`` to branch on."""
    acked = json.loads(reply_json(1, Ack(1, 5, 0x3610A686), 0.0005, 1))
    refused = json.loads(reply_json(2, Err(2, "too-large", "message exceeds 10 bytes"), 0, 1))
    assert acked == {
        "message": 1,
        "seq": 1,
        "status": "acked",
        "nbytes": 5,
        "crc32": "3610a686",
        "rtt_ms": 0.5,
        "attempts": 1,
    }
    assert refused["status"] == "rejected"
    assert refused["code"] == "too-large"
    assert refused["detail"] == "message exceeds 10 bytes"


def test_summary_counts_every_outcome() -> None:
    """The summary names sent, acked, rejected, unacked, elapsed time and rate."""
    tally = Tally(sent=10, acked=7, rejected=1)
    assert format_summary(tally, 2.0) == (
        "sent 10, acked 7, rejected 1, unacked 2 in 2.00 s (4 msg/s)"
    )


def test_summary_mentions_skipped_and_resent_messages_only_when_there_are_some() -> None:
    """Lines too long to send, and resends after a reconnect, are called out."""
    tally = Tally(sent=3, acked=3, not_sent=1, resent=2)
    summary = format_summary(tally, 0.0)
    assert "not sent 1 (too long)" in summary
    assert "resent 2 (duplicates possible)" in summary
    assert summary.endswith("(0 msg/s)")


def test_exit_status_needs_every_message_acknowledged() -> None:
    """Only a run where every line was sent and acknowledged counts as success."""
    assert Tally(sent=2, acked=2).all_acked
    assert not Tally(sent=2, acked=1, rejected=1).all_acked
    assert not Tally(sent=2, acked=2, not_sent=1).all_acked


def test_progress_line_shows_in_flight_messages() -> None:
    """The live line shows what is in flight besides the running totals."""
    line = format_progress(Tally(sent=120, acked=100), 20, 1.0)
    assert line == "sent 120  acked 100  rejected 0  in flight 20  100 msg/s"


def test_quiet_mode_moves_errors_to_stderr_and_drops_acks() -> None:
    """``--quiet``: ACKs are not shown; a refusal goes to stderr; stdout stays empty."""
    out, err = io.StringIO(), io.StringIO()
    reporter = Reporter(out, err, json_lines=False, quiet=True)
    reporter.reply(1, Ack(1, 1, 1), 0.0, 1)
    reporter.reply(2, Err(2, "rejected", "no"), 0.0, 1)
    reporter.not_sent(3, 10)
    assert out.getvalue() == ""
    assert err.getvalue().splitlines() == [
        "message 2: ERR 2 rejected no",
        "message 3: not sent: longer than --max-message-bytes (10 bytes)",
    ]


def test_progress_line_is_erased_before_other_stderr_output() -> None:
    """An error never lands on the end of a half-drawn progress line."""
    out, err = io.StringIO(), io.StringIO()
    reporter = Reporter(out, err, json_lines=False, quiet=True)
    reporter.progress(Tally(sent=1), 1, 1.0)
    reporter.error("it broke")
    assert err.getvalue().endswith("\r\x1b[Kpython -m ackservice.client: error: it broke\n")


@pytest.mark.parametrize(
    ("resent", "retried", "part"),
    [
        (2, 0, ", resent 2 (duplicates possible) in "),
        (0, 3, ", resent 3 (duplicates possible) in "),
        (2, 3, ", resent 5 (duplicates possible) in "),
    ],
)
def test_summary_says_which_resends_may_be_duplicates(resent: int, retried: int, part: str) -> None:
    """Every resend is counted, after a lost connection or an ``unavailable`` answer alike,
    and either may have reached the store twice, which the summary says."""
    tally = Tally(sent=3, acked=3, resent=resent, retried=retried)
    assert part in format_summary(tally, 1.0)


def test_a_message_given_up_after_unavailable_is_unacked_not_rejected() -> None:
    """The last ``unavailable`` answer is shown with how often the message was sent, and
    in JSON its status is ``unacked``: it was not stored, but not refused either."""
    reply = Err(7, "unavailable", "store is down")
    assert format_reply(5, reply, 0.001, 4) == (
        "message 5: ERR 7 unavailable store is down (gave up, sent 4 times)"
    )
    fields = json.loads(reply_json(5, reply, 0.001, 4))
    assert (fields["status"], fields["code"], fields["attempts"]) == ("unacked", "unavailable", 4)


@pytest.mark.parametrize("quiet", [False, True])
def test_control_characters_from_the_server_are_escaped_before_printing(quiet: bool) -> None:
    """An ERR code or detail carrying ESC, BEL or an OSC sequence (from a server that does
    not escape them) is printed as visible escapes, never raw to the terminal."""
    out, err = io.StringIO(), io.StringIO()
    reporter = Reporter(out, err, json_lines=False, quiet=quiet)
    hostile = Err(1, "rejected\x1b[2J", "\x1b]0;owned\x07 \x1b[31mred\x9b")
    reporter.reply(1, hostile, 0.001, 1)
    reporter.error("server said: ERR 0 busy \x1b]8;;http://x\x07link")
    printed = out.getvalue() + err.getvalue()
    for raw in ("\x1b", "\x07", "\x9b"):
        assert raw not in printed
    assert "\\x1b]0;owned\\x07" in printed
    assert "\\x1b]8;;http://x\\x07link" in printed


def test_summary_says_where_unfinished_input_stopped() -> None:
    """A run that ended before its input did says after which line nothing was read, in
    text and in JSON; a finished run says nothing of it."""
    tally = Tally(sent=5, acked=3, read_to=7)
    assert ", input not read after line 7 in " in format_summary(tally, 1.0)
    assert json.loads(summary_json(tally, 1.0))["read_to"] == 7
    assert "input not read" not in format_summary(Tally(sent=5, acked=5), 1.0)
