"""The deadline of a connection's wait for input (Connection._wait_deadline) and the look at
its send queue when that wait ends (Connection._replies_stuck), without any I/O: a wait woken
at its deadline must always decide something, never re-arm a deadline already passed."""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import given
from hypothesis import strategies as st

from ackservice.server import ServerConfig
from ackservice.server.committing import Committer
from ackservice.server.connection import Connection


class _Owner:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.shutting_down = False
        self.committer: Committer | None = None

    def connection_closed(self, connection: Connection) -> None:
        pass


class _Queue:
    """A transport whose send queue (SIOCOUTQ) reads as the given values, then the last one."""

    def __init__(self, values: list[int | None]) -> None:
        self._values: Iterator[int | None] = iter(values)
        self._last = values[-1]

    def unacknowledged(self) -> int | None:
        self._last = next(self._values, self._last)
        return self._last


def _connection(send_timeout: float, idle_timeout: float, queue: list[int | None]) -> Connection:
    config = ServerConfig(port=0, send_timeout=send_timeout, idle_timeout=idle_timeout)
    return Connection(_Owner(config), 1, "test", _Queue(queue))  # type: ignore[arg-type]


def _woken_at_each_deadline(connection: Connection, last_message: float) -> tuple[str, float]:
    """Wake the connection's wait at exactly its deadline (as under Trio's MockClock) until it
    ends: ("idle" or "send-timeout", when)."""
    connection._last_message = last_message
    idle_timeout = connection._owner.config.idle_timeout
    now = connection._wait_deadline()
    for _ in range(1000):
        if now >= last_message + idle_timeout:
            return "idle", now
        if connection._replies_stuck(now):
            return "send-timeout", now
        deadline = connection._wait_deadline()
        assert deadline > now, "a deadline already passed: the wait would wake at once, forever"
        now = deadline
    raise AssertionError("neither dropped nor idle")


def test_replies_that_never_move_are_dropped_at_two_send_timeouts() -> None:
    """Unacknowledged replies that stay put: the first look, send_timeout after the last
    message, finds them; the next, send_timeout later, drops the client. With times whose
    sum rounds down (0.4 + 0.3 - 0.4 < 0.3 in floating point) the second look still does."""
    connection = _connection(0.3, 60, [945_000])
    reason, when = _woken_at_each_deadline(connection, 0.1)
    assert reason == "send-timeout"
    assert when == 0.1 + 0.3 + 0.3


@given(
    last_message=st.floats(min_value=0, max_value=2e5),
    send_timeout=st.floats(min_value=0.001, max_value=86400),
    idle_timeout=st.floats(min_value=0.001, max_value=604800),
    queue=st.lists(st.one_of(st.none(), st.integers(0, 4_000_000)), min_size=1, max_size=8),
)
def test_a_wait_woken_at_its_deadline_never_spins(
    last_message: float, send_timeout: float, idle_timeout: float, queue: list[int | None]
) -> None:
    """Whatever the timeouts, the last message's time and what the send queue holds at each
    look, every look either ends the connection or sets a deadline still ahead, and the
    connection ends by the idle deadline at the latest."""
    connection = _connection(send_timeout, idle_timeout, queue)
    reason, when = _woken_at_each_deadline(connection, last_message)
    assert when <= last_message + idle_timeout
    if reason == "send-timeout":
        assert when >= last_message + 2 * send_timeout - 1e-6 * (last_message + send_timeout)
