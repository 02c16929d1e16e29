"""The NATS JetStream store: each batch is published as JetStream atomic batches.

An ``ACK`` from a server with this store means the JetStream server answered the batch's
PubAck: the messages are in the stream (fsynced first if the server runs with
``sync_interval: always``; on every replica's disk only with ``replicas`` > 1).

How a batch is published. nats-py has no API for atomic batch publish (ADR-50, nats-server
2.12+), so it is built on core publishes with headers: messages 1..n-1 of an atomic batch
are plain publishes carrying ``Nats-Batch-Id`` and ``Nats-Batch-Sequence``; message n also
carries ``Nats-Batch-Commit: 1`` and is a request, answered by one PubAck for the whole
batch (or an error: a gap, a lost message or a disabled feature abandons the batch, and
the commit reports it). A store call splits its batch into atomic batches of at most 1,000
messages (the server's limit) and keeps several in flight at once (the server allows 50 per
stream, shared by all publishers).

Duplicates. Every message carries ``Nats-Msg-Id: <random per-store prefix>.<conn_id>.<seq>``.
Inside an atomic batch the server does not drop a duplicate silently: it rejects the whole
batch (error 10201, since 2.12.1). The store then publishes that atomic batch's messages one
by one with the same ids, which the stream's duplicate window drops silently, so messages
already stored are not stored twice and the others are.

Start-up with NATS unreachable. ``JetStreamStore.open`` waits briefly (``connect_wait``, 2 s
by default; the server's ``--store-connect-timeout``) for a connection; if none, it does not
fail: it logs ``store_disconnected`` and keeps connecting in the background (forever, like
every later reconnect), and ``store`` raises ``StoreUnavailable("NATS not connected ...")``
meanwhile, so clients get ``ERR unavailable`` and resend. The stream is created or checked
as soon as a connection exists; a stream that is found unusable then makes every batch
unavailable and is logged once. When NATS is reachable at start-up, an unusable stream fails
``open`` with ``StoreError``.

Threads. nats-py runs on asyncio and the server on Trio, so each store (and reader) owns
one daemon thread running an asyncio event loop; a store call crosses to it once per batch
and back without blocking a Trio worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import secrets
from collections.abc import Sequence
from typing import Any

import nats
import nats.errors
import structlog
import trio

from .base import Message, StoreError, StoreUnavailable
from .jetstream_connection import NANOS, AsyncioThread, NatsConnection, api_error
from .opening import DEFAULT_CONNECT_TIMEOUT
from .url import JetStreamURL

__all__ = ["JetStreamStore"]

log = structlog.get_logger(__name__)

MAX_ATOMIC_BATCH = 1000
"""nats-server's default ``max_batch_size`` for an atomic batch (ADR-50)."""

MAX_IN_FLIGHT = 8
"""Atomic batches one store keeps open at once. The server allows 50 per stream in all
(ADR-50), shared with every other publisher to it; 8 already overlaps the round trips."""

DUPLICATE_WINDOW = 120.0
"""Seconds the stream remembers a ``Nats-Msg-Id``: much longer than any store call."""

_DUPLICATE_IN_BATCH = 10201


async def _ensure_stream(connection: NatsConnection) -> None:
    """Create the stream if missing (and allowed), else check it can take atomic batches.

    Raises:
        StoreError: the stream is missing and ``create=false``, or its settings conflict.
    """
    url = connection.url
    answer = await connection.api(f"STREAM.INFO.{url.stream}")
    error = answer.get("error")
    if error is not None and error.get("code") == 404:
        if not url.create:
            raise StoreError(
                f"stream {url.stream} does not exist on {url}; create it or drop create=false"
            )
        config = {
            "name": url.stream,
            "subjects": [url.subject],
            # File storage: an ACK promises the message survives a restart of NATS.
            "storage": "file",
            "num_replicas": url.replicas,
            "retention": "limits",
            "allow_atomic": True,
            "duplicate_window": int(DUPLICATE_WINDOW * NANOS),
        }
        created = await connection.api(f"STREAM.CREATE.{url.stream}", config)
        if (detail := api_error(created)) is not None:
            raise StoreError(f"cannot create stream {url.stream} on {url}: {detail}")
        return
    if (detail := api_error(answer)) is not None:
        raise StoreError(f"cannot read stream {url.stream} on {url}: {detail}")
    problem = _stream_problem(answer["config"], url)
    if problem is not None:
        raise StoreError(f"stream {url.stream} on {url} is not usable: {problem}")


def _stream_problem(config: dict[str, Any], url: JetStreamURL) -> str | None:
    """What makes an existing stream unusable for this store, or ``None``."""
    if url.subject not in config.get("subjects", []):
        return (
            f"it does not take subject {url.subject} (subjects: "
            f"{', '.join(config.get('subjects', [])) or 'none'}); add it or set ?subject="
        )
    if not config.get("allow_atomic", False):
        return "atomic batch publish is off; set allow_atomic: true (nats-server 2.12+)"
    if config.get("storage") != "file":
        return "it keeps messages in memory; an ACK promises durability, use file storage"
    if config.get("persist_mode") == "async":
        return "persist_mode is async, which refuses atomic batches; use the default"
    return None


def _message_headers(message: Message, msg_id: str) -> dict[str, str]:
    headers = {
        "Nats-Msg-Id": msg_id,
        "Ackservice-Received-At": repr(message.received_at),
        "Ackservice-Peer": message.peer,
        "Ackservice-Conn-Id": str(message.conn_id),
        "Ackservice-Seq": str(message.seq),
        "Ackservice-Crc32": str(message.crc32),
    }
    if message.identity is not None:
        headers["Ackservice-Identity"] = message.identity
    return headers


class JetStreamStore:
    """Keeps messages in a JetStream stream (see the module docstring)."""

    def __init__(
        self,
        url: JetStreamURL,
        runner: AsyncioThread,
        connection: NatsConnection,
        *,
        ack_timeout: float,
    ) -> None:
        self._url = url
        self._runner = runner
        self._connection = connection
        self._ack_timeout = ack_timeout
        # Message ids must differ between runs: conn_id and seq restart with the server.
        self._run_id = secrets.token_hex(8)
        self._batch_numbers = itertools.count(1)
        self._ready = False
        self._unusable: str | None = None
        self._background: concurrent.futures.Future[None] | None = None

    @property
    def available(self) -> bool:
        """Whether NATS is connected and the stream usable now (read by ``/readyz``)."""
        lost = self._connection.lost
        return (
            self._ready
            and self._connection.nc.is_connected
            and lost is not None
            and not lost.is_set()
        )

    @classmethod
    async def open(
        cls,
        url: JetStreamURL,
        *,
        connect_wait: float = DEFAULT_CONNECT_TIMEOUT,
        ack_timeout: float = 5.0,
    ) -> JetStreamStore:
        """Connect to NATS and make sure the stream exists and takes atomic batches.

        Args:
            connect_wait: how long to wait for NATS before carrying on without it (it is
                then connected in the background; see the module docstring).
            ack_timeout: how long a batch waits for its PubAck before it is unavailable.

        Raises:
            StoreError: NATS answered and the stream is missing (with ``create=false``) or
                has conflicting settings.
        """
        runner = AsyncioThread(f"ackservice-jetstream-{url.stream}")
        # Stream checks at start-up are bounded on their own: a long --store-timeout (up to
        # a day) must not mean waiting that long for a stream check that hangs.
        connection = NatsConnection(url, api_timeout=min(max(ack_timeout, 2.0), 5.0))
        store = cls(url, runner, connection, ack_timeout=ack_timeout)
        # Resolved once the store is ready, or fails to be, or connect_wait passed without a
        # connection (the background task then carries on connecting).
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        store._background = runner.submit(store._connect_and_prepare(connect_wait, started))
        try:
            # The background task bounds its own wait for the connection; this only guards
            # against a stream check that hangs.
            with trio.move_on_after(connect_wait + 2 * connection.api_timeout):
                await runner.wait(started, cancel=False)
        except BaseException:
            await store.aclose()
            raise
        return store

    async def _connect_and_prepare(
        self, connect_wait: float, started: concurrent.futures.Future[None]
    ) -> None:
        """Asyncio side of ``open``: connect (forever), then create or check the stream."""
        try:
            await self._connect_and_prepare_now(connect_wait, started)
        except BaseException as error:
            if not started.done():
                started.set_exception(error)
            raise
        if not started.done():
            started.set_result(None)

    async def _connect_and_prepare_now(
        self, connect_wait: float, started: concurrent.futures.Future[None]
    ) -> None:
        connection = self._connection
        connecting = asyncio.ensure_future(connection.connect(connect_timeout=connect_wait))
        done, _ = await asyncio.wait({connecting}, timeout=connect_wait)
        if not done:
            started.set_result(None)
            log.warning(
                "store_disconnected",
                store=str(self._url),
                reason="NATS not reachable at start-up; connecting in the background",
            )
            await connecting
            log.info("store_reconnected", store=str(self._url))
            try:
                await _ensure_stream(connection)
            except (StoreError, nats.errors.Error, OSError) as error:
                self._unusable = str(error)
                log.error("store_unusable", store=str(self._url), detail=str(error))
                return
            self._ready = True
            return
        connecting.result()
        try:
            await _ensure_stream(connection)
        except (nats.errors.Error, OSError) as error:
            raise StoreError(
                f"cannot set up stream {self._url.stream} on {self._url}: {error!r} "
                "(is JetStream enabled on that server?)"
            ) from error
        self._ready = True

    @property
    def description(self) -> str:
        return str(self._url)

    async def store(self, batch: Sequence[Message]) -> None:
        """Publish ``batch`` as atomic batches; return once every PubAck arrived.

        Raises:
            StoreUnavailable: NATS is not connected, did not answer in time, or refused a
                batch; the one-line detail says which.
        """
        if not batch:
            return
        if not self._ready:
            raise StoreUnavailable(self._unusable or f"NATS not connected ({self._url})")
        await self._runner.run(self._store_batch(batch))

    async def _store_batch(self, batch: Sequence[Message]) -> None:
        """Asyncio side of ``store``."""
        connection = self._connection
        lost = connection.lost
        if not connection.nc.is_connected or lost is None or lost.is_set():
            raise StoreUnavailable(f"NATS not connected ({self._url})")
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)

        async def publish(chunk: Sequence[Message]) -> None:
            async with slots:
                await self._publish_atomic(chunk)

        tasks = [
            asyncio.ensure_future(publish(batch[start : start + MAX_ATOMIC_BATCH]))
            for start in range(0, len(batch), MAX_ATOMIC_BATCH)
        ]
        connection_lost: asyncio.Future[Any] = asyncio.ensure_future(lost.wait())
        all_published: asyncio.Future[Any] = asyncio.gather(*tasks)
        try:
            done, _ = await asyncio.wait(
                {all_published, connection_lost},
                timeout=self._ack_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if all_published in done:
                all_published.result()
                return
            if connection_lost in done:
                raise StoreUnavailable(f"NATS connection lost ({self._url})")
            raise StoreUnavailable(f"no PubAck from NATS within {self._ack_timeout:g}s")
        finally:
            connection_lost.cancel()
            for task in tasks:
                task.cancel()
            # Collect the cancelled tasks' exceptions so asyncio does not log them.
            await asyncio.gather(all_published, connection_lost, return_exceptions=True)

    async def _publish_atomic(self, chunk: Sequence[Message]) -> None:
        """Publish ``chunk`` (at most ``MAX_ATOMIC_BATCH``) as one atomic batch."""
        nc = self._connection.nc
        subject = self._url.subject
        batch_id = f"{self._run_id}-{next(self._batch_numbers)}"
        last = len(chunk)
        try:
            for number, message in enumerate(chunk, 1):
                headers = _message_headers(message, self._msg_id(message))
                headers["Nats-Batch-Id"] = batch_id
                headers["Nats-Batch-Sequence"] = str(number)
                if number < last:
                    # No reply subject: the server then sends nothing back for it; the commit's
                    # PubAck reports any gap or refusal for the whole batch.
                    await nc.publish(subject, message.payload, headers=headers)
                else:
                    headers["Nats-Batch-Commit"] = "1"
                    reply = await nc.request(
                        subject, message.payload, timeout=self._ack_timeout, headers=headers
                    )
        except nats.errors.NoRespondersError:
            raise StoreUnavailable(
                f"no JetStream stream takes subject {subject} on {self._url}"
            ) from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise StoreUnavailable(f"no PubAck from NATS within {self._ack_timeout:g}s") from None
        except (nats.errors.Error, OSError) as error:
            raise StoreUnavailable(f"NATS publish failed: {error!r}") from error
        answer = json.loads(reply.data)
        refusal = answer.get("error")
        if refusal is None:
            return
        if refusal.get("err_code") == _DUPLICATE_IN_BATCH:
            await self._publish_one_by_one(chunk)
            return
        raise StoreUnavailable(f"NATS refused the batch: {api_error(answer)}")

    async def _publish_one_by_one(self, chunk: Sequence[Message]) -> None:
        """Publish each message alone: the duplicate window drops those already stored."""
        nc = self._connection.nc

        async def publish(message: Message) -> None:
            headers = _message_headers(message, self._msg_id(message))
            reply = await nc.request(
                self._url.subject, message.payload, timeout=self._ack_timeout, headers=headers
            )
            if (detail := api_error(json.loads(reply.data))) is not None:
                raise StoreUnavailable(f"NATS refused a message: {detail}")

        try:
            await asyncio.gather(*(publish(message) for message in chunk))
        except (TimeoutError, nats.errors.Error, OSError) as error:
            raise StoreUnavailable(f"NATS publish failed: {error!r}") from error

    def _msg_id(self, message: Message) -> str:
        return f"{self._run_id}.{message.conn_id}.{message.seq}"

    async def aclose(self) -> None:
        """Close the connection and stop the store's asyncio thread."""
        with trio.CancelScope(shield=True):
            if self._background is not None:
                self._background.cancel()
            with trio.move_on_after(5):
                await self._runner.run(self._connection.close())
            self._runner.close()
