"""The readiness hub: edge-triggered waiting must never miss input or an end of stream."""

from __future__ import annotations

import select
import socket

import pytest
import trio
import trio.testing

from ackservice.protocol import ack_line
from ackservice.server import ServerConfig, readiness, serve
from ackservice.server.readiness import ReadinessHub

pytestmark = pytest.mark.skipif(not readiness.AVAILABLE, reason="epoll is Linux-only")


@pytest.fixture
async def hub(nursery: trio.Nursery) -> ReadinessHub:
    """A hub of its own (not the run's shared one) with its dispatcher running."""
    hub = ReadinessHub()
    nursery.start_soon(hub.dispatch)
    return hub


async def test_input_already_waiting_counts_as_the_first_edge(hub: ReadinessHub) -> None:
    """Data that arrived before registration wakes the first wait."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.send(b"early")
        hub.register(ours.fileno())
        with trio.fail_after(2):
            events = await hub.wait_readable(ours.fileno())
        assert events & select.EPOLLIN
        hub.unregister(ours.fileno())


async def test_end_of_stream_with_the_data_is_reported(hub: ReadinessHub) -> None:
    """Data and the peer's close in one edge: the events say the end is pending, so the
    reader knows to read past a short read instead of waiting for an edge that never comes."""
    ours, theirs = socket.socketpair()
    with ours:
        hub.register(ours.fileno())
        theirs.send(b"last words")
        theirs.close()
        with trio.fail_after(2):
            events = await hub.wait_readable(ours.fileno())
        assert events & readiness.END_EVENTS
        hub.unregister(ours.fileno())


async def test_events_while_nobody_waits_are_kept(hub: ReadinessHub) -> None:
    """An edge that comes while the reader is busy is returned by its next wait."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        hub.register(ours.fileno())
        theirs.send(b"x")
        await trio.testing.wait_all_tasks_blocked()  # the dispatcher saw it; nobody waited
        with trio.fail_after(2):
            assert await hub.wait_readable(ours.fileno()) & select.EPOLLIN
        hub.unregister(ours.fileno())


async def test_cancelled_wait_loses_no_events(hub: ReadinessHub) -> None:
    """A wait cancelled while events are pending leaves them for the next wait; a wait
    cancelled while blocked leaves no waiter behind."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        fd = ours.fileno()
        hub.register(fd)
        with trio.move_on_after(0.05):
            await hub.wait_readable(fd)  # nothing to read: blocks, then is cancelled
        assert not hub._waiters
        theirs.send(b"x")
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            scope.cancel()
            await hub.wait_readable(fd)
        assert scope.cancelled_caught
        with trio.fail_after(2):
            assert await hub.wait_readable(fd) & select.EPOLLIN
        hub.unregister(fd)


async def test_many_short_messages_with_close_never_hang(nursery: trio.Nursery) -> None:
    """Over real TCP, 300 clients each send a message and close at once: every one gets its
    ACK and the server's close (no end of stream is missed)."""
    server = await nursery.start(serve, ServerConfig(port=0))

    async def one_client() -> None:
        with trio.socket.socket() as sock:
            await sock.connect(("127.0.0.1", server.port))
            await sock.send(b"bye\n")
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := await sock.recv(100):
                received += chunk
            assert received == ack_line(1, b"bye")

    with trio.fail_after(20):
        async with trio.open_nursery() as clients:
            for _ in range(300):
                clients.start_soon(one_client)


async def test_unregistered_descriptor_is_forgotten(hub: ReadinessHub) -> None:
    """After unregister, the descriptor's number can be reused without stale events."""
    ours, theirs = socket.socketpair()
    fd = ours.fileno()
    hub.register(fd)
    theirs.send(b"x")
    await trio.testing.wait_all_tasks_blocked()
    hub.unregister(fd)
    assert fd not in hub._pending
    ours.close()
    theirs.close()


# Deadlines: the hub's waits time out in place of a cancel scope per connection.


async def test_wait_returns_woken_at_its_deadline(
    hub: ReadinessHub, autojump_clock: trio.testing.MockClock
) -> None:
    """With no input, a wait with a deadline returns WOKEN exactly when the deadline passes
    (also when it is the first timer, set while the dispatcher already sleeps)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        hub.register(ours.fileno())
        await trio.testing.wait_all_tasks_blocked()
        deadline = trio.current_time() + 10
        with trio.fail_after(60):  # a timer the dispatcher never noticed would hang here
            assert await hub.wait_readable(ours.fileno(), deadline) == readiness.WOKEN
        assert trio.current_time() == deadline
        hub.unregister(ours.fileno())


async def test_later_deadline_is_honoured_after_an_earlier_timer(
    nursery: trio.Nursery, hub: ReadinessHub, autojump_clock: trio.testing.MockClock
) -> None:
    """A socket whose deadline moved later (input came) is not woken by its earlier timer,
    and a socket's deadline never delays another socket's earlier one."""
    start = trio.current_time()
    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()
    with first, first_peer, second, second_peer:
        hub.register(first.fileno())
        hub.register(second.fileno())

        async def send_later() -> None:
            await trio.sleep(3)
            first_peer.send(b"x")

        nursery.start_soon(send_later)
        assert await hub.wait_readable(first.fileno(), start + 5) & select.EPOLLIN
        assert trio.current_time() == start + 3
        first.recv(10)
        woken_at: dict[str, float] = {}

        async def wait(name: str, sock: socket.socket, deadline: float) -> None:
            assert await hub.wait_readable(sock.fileno(), deadline) == readiness.WOKEN
            woken_at[name] = trio.current_time() - start

        async with trio.open_nursery() as waits:
            waits.start_soon(wait, "first", first, start + 13)
            waits.start_soon(wait, "second", second, start + 8)
        assert woken_at == {"first": 13, "second": 8}


class _EarlierDeadline:
    """An answerer that reads what arrived and moves its wait's deadline to ``deadline``."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline

    def answer_waiting(self, later: list[readiness.Answerer]) -> float | None:
        self.sock.recv(100)
        return self.deadline

    def send_later(self) -> None:
        pass


async def test_answerer_deadline_earlier_than_the_wait_is_honoured(
    nursery: trio.Nursery, hub: ReadinessHub, autojump_clock: trio.testing.MockClock
) -> None:
    """An answer in the dispatcher may bring the wait's deadline earlier (a connection's look
    at its send queue, send_timeout after a message, while the wait had only its idle
    deadline): the wait ends then, not at the deadline it began with."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        fd = ours.fileno()
        hub.register(fd)
        start = trio.current_time()
        hub.set_answerer(fd, _EarlierDeadline(ours, start + 4))

        async def send_soon() -> None:
            await trio.sleep(1)
            theirs.send(b"x\n")

        nursery.start_soon(send_soon)
        assert await hub.wait_readable(fd, start + 300) == readiness.WOKEN
        assert trio.current_time() == start + 4
        hub.unregister(fd)


async def test_wake_ends_a_wait_and_a_cancelled_wait_leaves_no_timer(
    nursery: trio.Nursery, hub: ReadinessHub, autojump_clock: trio.testing.MockClock
) -> None:
    """wake() ends a wait at once with WOKEN; a wait cancelled before its deadline does not
    wake the socket's next wait early."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        fd = ours.fileno()
        hub.register(fd)
        start = trio.current_time()

        async def wake_soon() -> None:
            await trio.sleep(1)
            hub.wake(fd)

        nursery.start_soon(wake_soon)
        assert await hub.wait_readable(fd, start + 100) == readiness.WOKEN
        assert trio.current_time() == start + 1
        hub.wake(fd)  # nobody waits: nothing happens
        with trio.move_on_after(1):
            await hub.wait_readable(fd, start + 5)
        assert not hub._waiters
        assert not hub._deadlines
        theirs.send(b"late")
        assert await hub.wait_readable(fd, start + 50) & select.EPOLLIN
        assert trio.current_time() == start + 2
        hub.unregister(fd)


async def test_forgotten_socket_timer_does_not_wake_its_successor(
    hub: ReadinessHub, autojump_clock: trio.testing.MockClock
) -> None:
    """A socket closed while its timer is armed: a new socket with the same descriptor
    number keeps its own deadline."""
    start = trio.current_time()
    ours, theirs = socket.socketpair()
    fd = ours.fileno()
    hub.register(fd)
    with trio.move_on_after(1):
        await hub.wait_readable(fd, start + 2)  # arms a timer for start + 2
    hub.forget(fd)
    ours.close()
    theirs.close()
    reused, peer = socket.socketpair()
    with reused, peer:
        assert reused.fileno() == fd
        hub.register(fd)
        assert await hub.wait_readable(fd, start + 20) == readiness.WOKEN
        assert trio.current_time() == start + 20
        hub.forget(fd)


async def test_deadlines_passing_together_are_woken_a_batch_per_round(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """100 waits with one deadline: 64 are woken in one round, the rest in the next, so
    the goodbyes of a crowd timing out together do not stall everyone else at once."""
    hub = ReadinessHub()  # no dispatcher: the test fires the timers itself
    pairs = [socket.socketpair() for _ in range(100)]
    deadline = trio.current_time() + 1
    woken = 0

    async def wait(sock: socket.socket) -> None:
        nonlocal woken
        assert await hub.wait_readable(sock.fileno(), deadline) == readiness.WOKEN
        woken += 1

    try:
        async with trio.open_nursery() as waits:
            for ours, _ in pairs:
                hub.register(ours.fileno())
                waits.start_soon(wait, ours)
            await trio.testing.wait_all_tasks_blocked()
            hub._fire_timers(deadline)
            assert len(hub._waiters) == 36
            await trio.testing.wait_all_tasks_blocked()
            assert woken == 64
            hub._fire_timers(deadline)
            assert not hub._waiters
    finally:
        for ours, theirs in pairs:
            hub.unregister(ours.fileno())
            ours.close()
            theirs.close()
        hub._epoll.close()


async def test_timers_of_forgotten_sockets_do_not_pile_up(
    hub: ReadinessHub, autojump_clock: trio.testing.MockClock
) -> None:
    """Every connection arms a timer and most close long before it fires: the heap keeps at
    most ~1,000 stale entries beyond twice the live ones, not one per connection for a whole
    idle timeout."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        fd = ours.fileno()
        for _ in range(3000):
            hub.register(fd)
            with trio.move_on_after(0.001):
                await hub.wait_readable(fd, trio.current_time() + 300)
            hub.unregister(fd)
        assert len(hub._timers) <= 1001


async def test_more_ready_sockets_than_one_round_takes_are_all_woken(
    hub: ReadinessHub, nursery: trio.Nursery
) -> None:
    """More sockets ready at once than the dispatcher takes per round (it yields between
    rounds, so no round holds the other tasks up for long): every waiter is woken."""
    count = 3 * readiness._DISPATCH_BATCH + 5
    pairs = [socket.socketpair() for _ in range(count)]
    woken = 0
    all_woken = trio.Event()

    async def wait(sock: socket.socket) -> None:
        nonlocal woken
        hub.register(sock.fileno())
        assert await hub.wait_readable(sock.fileno()) & select.EPOLLIN
        woken += 1
        if woken == count:
            all_woken.set()
        hub.unregister(sock.fileno())

    try:
        for ours, _ in pairs:
            nursery.start_soon(wait, ours)
        await trio.testing.wait_all_tasks_blocked()
        for _, theirs in pairs:
            theirs.send(b"x")
        with trio.fail_after(5):
            await all_woken.wait()
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
