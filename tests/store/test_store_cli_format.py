"""The export's JSON lines and timestamps, checked without a store: what the faster ways of
writing them write is what the plain ones wrote."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ackservice.store import cli

_RECORDS = st.fixed_dictionaries(
    {
        "id": st.integers(1, 2**64 + 10),  # beyond 64 bits: orjson refuses, the stdlib writes
        "received_at": st.text(max_size=30),
        "peer": st.text(max_size=40),
        "conn_id": st.integers(-(2**63), 2**63 - 1),
        "seq": st.integers(0, 2**64 - 1),
        "crc32": st.text("0123456789abcdef", min_size=8, max_size=8),
    },
    optional={
        "identity": st.text(max_size=40),
        "payload": st.text(max_size=200),  # control characters, quotes, any plane
        "payload_b64": st.text(max_size=40),
        "count": st.none(),
    },
)


@settings(max_examples=1000)
@given(_RECORDS)
def test_a_json_line_is_what_the_standard_library_writes(record: dict[str, Any]) -> None:
    """Compact, UTF-8 (no \\u escapes but for control characters), one line: the same bytes
    whether orjson (where installed) or the standard library writes them."""
    expected = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    assert cli._dumps(record) == expected


@settings(max_examples=1000)
@given(st.floats(0, 2**35, allow_nan=False))
def test_a_timestamp_is_what_strftime_wrote(timestamp: float) -> None:
    """RFC 3339 in UTC with microseconds and a Z, as the export always wrote it."""
    expected = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert cli._rfc3339(timestamp) == expected
