"""The plumbing the JetStream store and reader share: nats-py runs on asyncio and the
server on Trio, so each store (and reader) owns one daemon thread running an asyncio event
loop (``AsyncioThread``), and one nats-py connection on it with the JetStream API calls
(``NatsConnection``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import structlog
import trio
from nats.aio.client import Client

from .url import JetStreamURL

__all__ = ["HEADER_PREFIX", "NANOS", "AsyncioThread", "NatsConnection", "api_error"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

NANOS = 1_000_000_000
HEADER_PREFIX = "Ackservice-"
"""What every header this project puts on a stored message starts with."""


class AsyncioThread:
    """An asyncio event loop in a daemon thread, and the way Trio code runs coroutines on it."""

    def __init__(self, name: str) -> None:
        created: concurrent.futures.Future[asyncio.AbstractEventLoop] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(created,), name=name, daemon=True)
        self._thread.start()
        self.loop = created.result()

    @staticmethod
    def _run(created: concurrent.futures.Future[asyncio.AbstractEventLoop]) -> None:
        # A plain selector loop, made and closed in this thread, whatever the process's
        # event loop policy: trio-asyncio's, for one, refuses new loops in a Trio thread
        # and would hand out its own kind here.
        loop = asyncio.SelectorEventLoop()
        created.set_result(loop)
        try:
            loop.run_forever()
        finally:
            try:
                _finish_tasks(loop)
            finally:
                loop.close()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coroutine`` on the loop without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    async def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop and return its result to the calling Trio task.

        The Trio task sleeps on an event that the future's done-callback sets through the
        Trio token, so no Trio worker thread is held. If the task is cancelled, the asyncio
        side is cancelled too and the call returns at once.
        """
        future = self.submit(coroutine)
        return await self.wait(future)

    async def wait(self, future: concurrent.futures.Future[T], *, cancel: bool = True) -> T:
        """Wait in Trio for a future of the loop; if the wait is cancelled, so is the future
        (unless ``cancel`` is false: then it carries on)."""
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_: object) -> None:
            # Runs in the asyncio thread (or here, if already done).
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            if cancel:
                future.cancel()
            raise
        return future.result()

    def close(self) -> None:
        """Stop the loop and wait for its thread (briefly: it is a daemon)."""
        if self.loop.is_closed() or not self._thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


def _finish_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what still runs on a stopped loop and let it unwind, as ``asyncio.run`` does.

    nats-py's close cancels its subscriptions' tasks without waiting for them; a task left
    pending on a closed loop is finalised later by the garbage collector, in whatever code
    runs then, where it fails ("Event loop is closed") and says "Task was destroyed but it
    is pending". The wait is bounded: a task that ignores its cancellation is left.
    """
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.wait(pending, timeout=_FINISH_TASKS_WITHIN))
    loop.run_until_complete(loop.shutdown_asyncgens())


_FINISH_TASKS_WITHIN = 1.0
"""Seconds the loop's thread waits for its cancelled tasks before closing the loop."""


class NatsConnection:
    """One nats-py connection on the store's asyncio loop, and the JetStream API calls on it.

    Every method except ``__init__`` runs on the asyncio loop.
    """

    def __init__(
        self,
        url: JetStreamURL,
        *,
        api_timeout: float,
        client: Client | None = None,
    ) -> None:
        self.url = url
        self.api_timeout = api_timeout
        self.nc = client if client is not None else Client()
        self.closing = False
        self.lost: asyncio.Event | None = None
        """Set when the current connection drops; replaced on reconnect."""
        self.up: asyncio.Event | None = None
        """Set while connected (made by ``connect``)."""
        self.on_lost: Callable[[], None] | None = None
        """If set, called when the connection drops, instead of logging it and its return:
        the reader reports outages itself (its CLI's standard output is the export, where a
        log line would become data)."""

    async def connect(self, *, connect_timeout: float) -> None:
        """Connect, retrying forever (the caller decides how long to wait)."""
        self.lost = asyncio.Event()
        self.up = asyncio.Event()
        await self.nc.connect(
            servers=[self.url.servers],
            name="ackservice",
            # Reconnect forever by itself, also for the first connection: an outage of NATS
            # is answered with ERR unavailable, never by stopping the server.
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=max(1, round(connect_timeout)),
            disconnected_cb=self._disconnected,
            reconnected_cb=self._reconnected,
            error_cb=self._error,
        )
        self.up.set()

    async def _disconnected(self) -> None:
        if self.lost is not None:
            self.lost.set()
        if self.up is not None:
            self.up.clear()
        if self.on_lost is not None:
            self.on_lost()
        elif not self.closing:
            log.warning("store_disconnected", store=str(self.url))

    async def _reconnected(self) -> None:
        self.lost = asyncio.Event()
        if self.up is not None:
            self.up.set()
        if self.on_lost is None:
            log.info("store_reconnected", store=str(self.url))

    async def wait_up(self, within: float | None) -> bool:
        """Whether connected, waiting up to ``within`` seconds (``None``: until it is)."""
        up = self.up
        if up is None:
            return False
        if up.is_set():
            return True
        if within is not None and within <= 0:
            return False
        try:
            await asyncio.wait_for(up.wait(), within)
        except TimeoutError:
            return False
        return True

    async def _error(self, error: Exception) -> None:
        # nats-py reports every failed reconnect attempt here; the state change is logged
        # once by _disconnected, so these stay quiet.
        pass

    async def api(self, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JetStream API request (``$JS.API.<subject>``); its JSON answer."""
        payload = json.dumps(body).encode() if body is not None else b""
        reply = await self.nc.request(f"$JS.API.{subject}", payload, timeout=self.api_timeout)
        answer: dict[str, Any] = json.loads(reply.data)
        return answer

    async def close(self) -> None:
        self.closing = True
        with contextlib.suppress(Exception):
            await self.nc.close()


def api_error(answer: dict[str, Any]) -> str | None:
    error = answer.get("error")
    if error is None:
        return None
    return f"{error.get('description', 'error')} (err_code {error.get('err_code')})"
