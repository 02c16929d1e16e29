"""How the CLI's log events are rendered: JSON lines by orjson, never failing whatever an event
holds, with the same fields as structlog's stock JSONRenderer; timestamps exactly those of
structlog's TimeStamper(fmt="iso", utc=True)."""

from __future__ import annotations

import datetime
import json
import types
from typing import Any, ClassVar
from unittest import mock

import pytest
import structlog
from hypothesis import example, given
from hypothesis import strategies as st

from ackservice import logconfig
from ackservice.logconfig import _iso_utc_stamper, _render_json, _render_json_str

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
# 9999-12-31T23:59:59: the last second a datetime can show.
_LAST_SECOND = 253_402_300_799


class _StoppedDatetime(datetime.datetime):
    """``datetime.datetime`` whose ``now()`` is the instant a test chose."""

    instant: ClassVar[datetime.datetime] = _EPOCH

    @classmethod
    def now(cls, tz: datetime.tzinfo | None = None) -> _StoppedDatetime:
        assert tz is datetime.UTC
        return cls.instant  # type: ignore[return-value]


# What structlog.processors sees as its ``datetime`` module: the clock stopped, all else real.
_STOPPED_DATETIME_MODULE = types.SimpleNamespace(
    datetime=_StoppedDatetime, timezone=datetime.timezone, timedelta=datetime.timedelta
)

_NANOSECONDS_IN_A_SECOND = st.one_of(
    # Whole seconds, microsecond 0 with nanoseconds left over, and the last nanoseconds.
    st.sampled_from([0, 1, 999, 1_000, 1_001, 999_999_000, 999_999_999]),
    st.integers(0, 999_999_999),
)


@given(
    first_second=st.integers(0, _LAST_SECOND - 3),
    steps=st.lists(st.tuples(st.integers(0, 3), _NANOSECONDS_IN_A_SECOND), min_size=1, max_size=30),
)
@example(first_second=0, steps=[(0, 0), (0, 1_000)])  # the epoch: the stamper's first cache
@example(first_second=1_700_000_000, steps=[(0, 999_999_999), (1, 0), (1, 999), (0, 500)])
@example(first_second=_LAST_SECOND - 3, steps=[(3, 999_999_999)])
def test_timestamps_are_exactly_structlogs(first_second: int, steps: list[tuple[int, int]]) -> None:
    """For any clock readings, one after another (the same second again, the next ones, and
    back: clocks are stepped), the timestamp is the string structlog's
    ``TimeStamper(fmt="iso", utc=True)`` gives at that instant: microseconds, or no fraction
    at all when they are 0, and a ``Z``. structlog's is run on a clock stopped at the same
    instant, which ``datetime.now()`` takes from the same clock truncated to microseconds."""
    readings = [(first_second + second) * 1_000_000_000 + nanos for second, nanos in steps]
    clock = iter(readings)
    stamp = _iso_utc_stamper(clock=lambda: next(clock))
    reference = structlog.processors.TimeStamper(fmt="iso", utc=True)
    with mock.patch.object(structlog.processors, "datetime", _STOPPED_DATETIME_MODULE):
        for reading in readings:
            _StoppedDatetime.instant = _EPOCH + datetime.timedelta(microseconds=reading // 1_000)
            expected = reference(None, "info", {})["timestamp"]
            assert stamp(None, "info", {}) == {"timestamp": expected}


def test_timestamps_follow_the_real_clock() -> None:
    """With the default clock the timestamp is now, in TimeStamper's form."""
    before = datetime.datetime.now(datetime.UTC)
    stamped = _iso_utc_stamper()(None, "info", {})["timestamp"]
    after = datetime.datetime.now(datetime.UTC)
    assert stamped.endswith("Z")
    assert before <= datetime.datetime.fromisoformat(stamped) <= after


def _rendered(**fields: Any) -> dict[str, Any]:
    """Render an event with ``fields``; assert it is one line of JSON; what it holds."""
    line = _render_json(None, "info", {"event": "something", **fields})
    assert isinstance(line, bytes)
    assert b"\n" not in line
    parsed: dict[str, Any] = json.loads(line, parse_constant=_not_json)
    return parsed


def _not_json(constant: str) -> None:
    """json.loads takes NaN, Infinity and -Infinity; JSON has no such values (RFC 8259)."""
    raise AssertionError(f"{constant} in a log line: not JSON")


def test_integers_beyond_64_bits_render_exactly() -> None:
    """orjson refuses integers beyond 64 bits; the stdlib renders the event instead."""
    assert _rendered(n=2**70, m=-(2**64)) == {"event": "something", "n": 2**70, "m": -(2**64)}


def test_floats_json_has_no_form_for_are_null_whoever_renders() -> None:
    """NaN and the infinities are null (orjson's rendering) also in an event the stdlib
    renders (beside an integer beyond 64 bits, or without orjson), where json.dumps wrote
    NaN and Infinity: not JSON, so the whole line was lost to a strict log shipper."""
    expected = {"event": "something", "n": 2**70, "nan": None, "inf": None, "minus": None}
    assert _rendered(n=2**70, nan=float("nan"), inf=float("inf"), minus=float("-inf")) == expected
    assert _rendered(nan=float("nan")) == {"event": "something", "nan": None}


def test_without_orjson_non_finite_floats_are_null(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where orjson is not installed every event is the stdlib's: NaN still renders as null."""
    monkeypatch.setattr(logconfig, "orjson", None)
    assert _rendered(nan=float("nan"), n=1) == {"event": "something", "nan": None, "n": 1}


def test_non_str_keys_render() -> None:
    """Keys orjson refuses: int keys become strings as json.dumps makes them; keys JSON has
    no form for at all (a tuple) turn the field into its repr."""
    assert _rendered(counts={1: "one"}) == {"event": "something", "counts": {"1": "one"}}
    assert _rendered(pairs={(1, 2): 3}) == {"event": "something", "pairs": "{(1, 2): 3}"}


def test_arbitrary_objects_render_as_their_repr() -> None:
    """An object JSON has no form for is its ``__structlog__()``, else its ``repr()`` (as with
    structlog's JSONRenderer); datetimes and dataclasses too, as json.dumps rendered them."""

    class Shown:
        def __structlog__(self) -> str:
            return "shown"

    thing = object()
    moment = datetime.datetime(2025, 1, 2, 3, 4, 5)
    assert _rendered(thing=thing, shown=Shown(), moment=moment) == {
        "event": "something",
        "thing": repr(thing),
        "shown": "shown",
        "moment": repr(moment),
    }


def test_what_nothing_can_render_still_makes_a_line() -> None:
    """A reference cycle, an unpaired surrogate, a repr that raises: still one line, and the
    other fields intact."""

    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    cycle: list[Any] = []
    cycle.append(cycle)
    assert _rendered(cycle=cycle, n=1) == {"event": "something", "cycle": "[[...]]", "n": 1}
    assert _rendered(text="\udcff")["text"] == "\udcff"
    assert _rendered(broken=Broken(), n=1) == {
        "event": "something",
        "broken": "<Broken without a repr>",
        "n": 1,
    }


def test_the_stdlib_bridge_gets_text() -> None:
    """The renderer for Trio's records returns str, as ProcessorFormatter requires."""
    line = _render_json_str(None, "error", {"event": "accept failed: é", "n": 2**70})
    assert json.loads(line) == {"event": "accept failed: é", "n": 2**70}


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits too: rendered by the stdlib
    # NaN and infinities: json.dumps wrote NaN, Infinity (not JSON), orjson writes null.
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),  # surrogates too: rendered by the stdlib
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@given(fields=st.dictionaries(st.text(min_size=1, max_size=12), _JSON_VALUES, max_size=8))
def test_lines_hold_what_structlogs_json_renderer_wrote(fields: dict[str, Any]) -> None:
    """Only the spacing and the escaping of non-ASCII characters differ from the former
    ``JSONRenderer()`` (json.dumps): the same keys, in the same order, with the same values."""
    event = {"event": "connection_closed", **fields}
    ours = json.loads(_render_json(None, "info", dict(event)))
    theirs = json.loads(structlog.processors.JSONRenderer()(None, "info", dict(event)))
    assert ours == theirs
    assert list(ours) == list(theirs)


def test_without_orjson_the_stdlib_renders_the_same_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where orjson is not installed (pyproject.toml installs it on x86-64 and ARM64 only),
    every line is the stdlib's rendering of the same fields, in the same order."""
    event = {"event": "connection_closed", "peer": "127.0.0.1:5", "bytes": 65, "duration": 0.5}
    with_orjson = _render_json(None, "info", dict(event))
    monkeypatch.setattr(logconfig, "orjson", None)
    without = _render_json(None, "info", dict(event))
    assert json.loads(without) == json.loads(with_orjson) == event
    assert list(json.loads(without)) == list(event)
