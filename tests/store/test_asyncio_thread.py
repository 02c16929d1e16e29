"""The asyncio thread the JetStream store and reader run nats-py on."""

from __future__ import annotations

import asyncio

import trio

from ackservice.store.jetstream_connection import AsyncioThread


async def test_closing_the_thread_unwinds_the_tasks_left_on_its_loop() -> None:
    """nats-py's close cancels a subscription's task without waiting for it. A task left
    pending on the closed loop was finalised by a later garbage collection, which failed in
    whatever ran then ("Event loop is closed"; a CI run failed a JetStream test so)."""
    thread = AsyncioThread("test-asyncio")
    unwound = trio.Event()
    token = trio.lowlevel.current_trio_token()

    async def waits_on_a_queue() -> None:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        try:
            await queue.get()
        finally:
            token.run_sync_soon(unwound.set)

    async def start_and_leave() -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(waits_on_a_queue())

    task = await thread.run(start_and_leave())
    await trio.to_thread.run_sync(thread.close)
    assert thread.loop.is_closed()
    assert task.cancelled()
    with trio.fail_after(2):
        await unwound.wait()
