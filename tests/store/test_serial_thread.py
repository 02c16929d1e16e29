"""SerialThread: a store's blocking calls, one at a time and in order, also when a caller
stops waiting; results and errors handed back to the Trio task that asked."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from ackservice.store.serial_thread import SerialThread


async def test_results_and_errors_come_back_in_order_one_call_at_a_time() -> None:
    thread = SerialThread("test")
    running = 0
    overlaps: list[int] = []
    order: list[int] = []

    def call(n: int) -> int:
        nonlocal running
        running += 1
        overlaps.append(running)
        time.sleep(0.01)
        order.append(n)
        running -= 1
        if n == 3:
            raise ValueError("three")
        return n * 10

    results: dict[int, object] = {}

    async def ask(n: int) -> None:
        try:
            results[n] = await thread.run(call, n)
        except ValueError as exc:
            results[n] = exc

    try:
        async with trio.open_nursery() as nursery:
            for n in range(5):
                nursery.start_soon(ask, n)
                await trio.sleep(0.001)  # queued in this order
    finally:
        thread.close()
    assert order == [0, 1, 2, 3, 4]
    assert overlaps == [1] * 5
    assert [results[n] for n in (0, 1, 2, 4)] == [0, 10, 20, 40]
    assert str(results[3]) == "three"


async def test_an_abandoned_call_goes_on_and_the_next_call_waits_for_it() -> None:
    """Cancelled with ``abandon_on_cancel``, the caller returns at once; the call still
    completes, and the next call starts only after it (what the store's rollback of a
    commit cut off by the store timeout relies on)."""
    thread = SerialThread("test")
    release = threading.Event()
    events: list[str] = []

    def slow() -> str:
        release.wait(5)
        events.append("slow done")
        return "dropped"

    def after() -> str:
        events.append("after")
        return "kept"

    try:
        with trio.move_on_after(0.05) as scope:
            await thread.run(slow, abandon_on_cancel=True)
        assert scope.cancelled_caught
        assert events == []
        release.set()
        assert await thread.run(after) == "kept"
    finally:
        thread.close()
    assert events == ["slow done", "after"]


async def test_a_call_not_abandoned_returns_its_result_before_the_cancellation() -> None:
    thread = SerialThread("test")
    finished = []
    try:
        with trio.move_on_after(0.02) as scope:
            result = await thread.run(lambda: time.sleep(0.1) or finished.append(1) or "done")
            finished.append(result)
            await trio.lowlevel.checkpoint()  # the cancellation comes here
            finished.append("not reached")
        assert scope.cancelled_caught
    finally:
        thread.close()
    assert finished == [1, "done"]


def test_a_call_outliving_its_trio_run_does_not_stop_the_thread() -> None:
    """A call abandoned by a Trio run that then ended is dropped (there is nobody to hand
    its result to); the thread serves the next run."""
    thread = SerialThread("test")
    release = threading.Event()

    async def abandon() -> None:
        with trio.move_on_after(0.02):
            await thread.run(release.wait, 5, abandon_on_cancel=True)

    async def ask() -> object:
        return await thread.run(lambda: "served")

    try:
        trio.run(abandon)
        release.set()
        assert trio.run(ask) == "served"
    finally:
        thread.close()


async def test_close_ends_the_thread_after_the_calls_made() -> None:
    thread = SerialThread("test")
    assert await thread.run(lambda: 1) == 1
    thread.close()
    thread.close()  # twice: harmless
    assert thread.closed
    thread._thread.join(5)
    assert not thread._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        await thread.run(lambda: 2)


async def test_the_last_call_runs_even_when_its_caller_is_cancelled_already() -> None:
    """``run_last`` queues its call (what closes a resource) also in a cancelled scope,
    after the calls made before it; the caller gets ``Cancelled`` at once, and the thread
    ends after the call."""
    thread = SerialThread("test")
    events: list[str] = []
    release = threading.Event()

    def slow() -> None:
        release.wait(5)
        events.append("slow")

    with trio.move_on_after(0.02):
        await thread.run(slow, abandon_on_cancel=True)
    with trio.CancelScope() as scope:
        scope.cancel()
        await thread.run_last(events.append, "last")
    assert scope.cancelled_caught
    assert thread.closed
    release.set()
    thread._thread.join(5)
    assert not thread._thread.is_alive()
    assert events == ["slow", "last"]
