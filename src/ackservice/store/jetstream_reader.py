"""Reading a JetStream stream written by ``JetStreamStore`` back (``python -m
ackservice.store export``, ``stats``, ``prune``)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import nats
import nats.errors
import structlog
import trio
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from ..protocol import crc32
from .base import StoredMessage, StoreError, StoreStats
from .jetstream_connection import HEADER_PREFIX, NANOS, AsyncioThread, NatsConnection, api_error
from .opening import DEFAULT_MAX_PULL_BYTES
from .url import JetStreamURL

__all__ = ["DEFAULT_MAX_PULL_BYTES", "PULL_BATCH", "JetStreamReader"]

log = structlog.get_logger(__name__)

PULL_BATCH = 500
"""Messages a reader asks for at once (small messages: ~0.2 ms of NATS's time each way)."""

_PULL_EXPIRES = 1
"""Seconds a following reader's pull waits for messages on the server (then a 408)."""

_FIRST_RETRY = 0.1
"""Seconds a follower first waits to ask for a consumer again (doubling up to a second): a
cluster's election is over in a few seconds."""

_NOTHING_NOW = (b"404", b"408")
"""Statuses that end a pull because the consumer has nothing more now (No Messages,
Request Timeout); any other (503 No Responders: the consumer is gone; 409 Consumer Deleted,
...) means the consumer cannot go on, except ``_PULL_AGAIN``'s."""

_TEMPORARY_ERRORS = (10008, 10009)
"""JetStream API errors (``err_code``) of a cluster between leaders, which a follower waits
out: 10008 ``JetStream system temporarily unavailable`` (503: no meta leader, as while the
cluster elects one), 10009 ``JetStream cluster can not handle request`` (asked a node that
is no longer the leader). Any other refusal (the stream is gone, ...) is final."""

_TOO_LARGE = "409 Message Size Exceeds MaxBytes"
"""How nats-server 2.15 ends a pull whose next message is larger than the bytes it has
left; the message stays for the next pull (for ever, if it is larger than a whole pull)."""

_PULL_AGAIN = (_TOO_LARGE, "409 Batch Completed")
"""Statuses that end a pull, not the consumer: ``_TOO_LARGE``, or the pull had its
``PULL_BATCH`` messages with bytes to spare (sent after the last, which the reader counted
already)."""


class JetStreamReader:
    """Reads a JetStream stream written by ``JetStreamStore`` back.

    ``messages`` reads through an ephemeral pull consumer, which does not outlive a restart
    of NATS (it is kept in memory), a connection lost meanwhile (what was delivered then is
    lost to it: it acknowledges nothing) or a minute without a pull (the server deletes
    it). Whenever one is gone, reading goes on from a new consumer starting after the last
    message yielded, so nothing is missed or yielded twice. Without ``follow`` that is tried
    within ``nats_wait`` and otherwise raises ``StoreError``; with ``follow`` the reader
    waits as long as NATS is away, and says so once per outage (``notice``).

    Each pull asks for at most ``PULL_BATCH`` messages and ``max_pull_bytes`` bytes (a
    single larger message comes alone), which bounds what the reader holds in memory. A
    follower hands what arrived over as soon as it has caught up with the stream, without
    waiting for the pull to end.
    """

    def __init__(
        self,
        url: JetStreamURL,
        runner: AsyncioThread,
        connection: NatsConnection,
        client: _ReaderClient,
        notice: Callable[[str], None] | None = None,
        max_pull_bytes: int = DEFAULT_MAX_PULL_BYTES,
    ) -> None:
        self._url = url
        self._max_pull_bytes = max_pull_bytes
        self._runner = runner
        self._connection = connection
        self._client = client
        """The connection's client (``connection.nc``), which hands deliveries over raw."""
        self._notice = notice
        self._consumers: set[_Consumer] = set()
        """The consumers being read (asyncio side): a lost connection breaks them all."""
        self._connecting: asyncio.Future[None] | None = None
        """The first connection, when NATS was not there at ``open`` (``wait_for_nats``)."""

    @classmethod
    async def open(
        cls,
        url: JetStreamURL,
        *,
        nats_wait: float = 5.0,
        notice: Callable[[str], None] | None = None,
        max_pull_bytes: int = DEFAULT_MAX_PULL_BYTES,
        wait_for_nats: bool = False,
    ) -> JetStreamReader:
        """Connect and check the stream exists; ``nats_wait`` bounds the connection and each
        request to NATS after it. ``notice`` takes the line saying a following reader waits
        for NATS (without it, that is logged as ``store_reader_waiting``).
        ``max_pull_bytes`` (at least 1) bounds the bytes of the messages one pull asks for.
        With ``wait_for_nats`` (a follower's), NATS not reachable within ``nats_wait`` is
        not an error: connecting goes on, and ``messages(follow=True)`` waits for it, saying
        so once, as it waits out an outage later on (a follower started beside NATS, or
        before it, need not be started again).

        Raises:
            StoreError: NATS is not reachable within ``nats_wait`` (unless
                ``wait_for_nats``) or has no such stream.
            ValueError: ``max_pull_bytes`` is below 1.
        """
        if max_pull_bytes < 1:
            raise ValueError(f"max_pull_bytes must be at least 1, got {max_pull_bytes}")
        runner = AsyncioThread(f"ackservice-jetstream-reader-{url.stream}")
        client = _ReaderClient()
        connection = NatsConnection(url, api_timeout=nats_wait, client=client)
        reader = cls(url, runner, connection, client, notice, max_pull_bytes)
        connection.on_lost = reader._lost
        try:
            await runner.run(reader._open(nats_wait, wait_for_nats))
        except BaseException:
            await reader.aclose()
            raise
        return reader

    def _lost(self) -> None:
        """The connection dropped (asyncio side): what the consumers get from now on may
        follow a gap, so none of it is taken."""
        for consumer in self._consumers:
            if consumer.subscription is not None:
                self._client.detach(consumer.subscription)
            consumer.lose()

    async def _open(self, connect_timeout: float, wait_for_nats: bool) -> None:
        connecting = asyncio.ensure_future(
            self._connection.connect(connect_timeout=connect_timeout)
        )
        await asyncio.wait({connecting}, timeout=connect_timeout)
        if not connecting.done():
            if wait_for_nats:
                self._connecting = connecting  # the follower waits for it (_wait_connected)
                return
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            raise StoreError(f"cannot reach NATS at {self._url}")
        connecting.result()
        answer = await self._api(f"STREAM.INFO.{self._url.stream}")
        if self._client.messages_seen == 0:
            # The answer came another way: deliveries would too, and an export would wait
            # for them forever.
            raise StoreError(
                "this nats-py version no longer delivers messages through "
                "Client._process_msg, which the JetStream reader relies on: install "
                "nats-py 2.16"
            )
        if (detail := api_error(answer)) is not None:
            raise StoreError(f"cannot read stream {self._url.stream} on {self._url}: {detail}")

    async def _api(self, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """``NatsConnection.api``, with NATS not answering (or not to be asked) a ``_NoAnswer``:
        one line from the store CLI, not nats-py's exception.

        Raises:
            _NoAnswer: no answer within ``nats_wait``, no JetStream to answer, not connected.
        """
        try:
            return await self._connection.api(subject, body)
        except nats.errors.NoRespondersError:
            raise _NoAnswer(
                f"NATS at {self._url} has no JetStream to answer (is it enabled on that server?)"
            ) from None
        except TimeoutError:  # nats.errors.TimeoutError is one
            raise _NoAnswer(
                f"NATS at {self._url} did not answer within {self._connection.api_timeout:g}s"
            ) from None
        except (nats.errors.Error, OSError) as error:
            raise _NoAnswer(f"cannot ask NATS at {self._url}: {error}") from None

    async def messages(
        self, *, after: int = 0, follow: bool = False
    ) -> AsyncIterator[StoredMessage]:
        """The stored messages with stream sequence > ``after``, in order; with ``follow``,
        keep waiting for new ones until cancelled (across outages of NATS).

        Raises:
            StoreError: without ``follow``, NATS went away or stopped answering for
                ``nats_wait``; with or without, the stream cannot be read (it is gone).
        """
        last = after
        consumer: _Consumer | None
        if self._connecting is not None:
            if not follow:
                raise StoreError(f"cannot reach NATS at {self._url}")
            await self._wait_connected(after)
        if follow:  # NATS refusing or silent for now is waited out from the first one on
            consumer = await self._follow_consumer(after)
        else:
            consumer = await self._runner.run(self._create_consumer(after))
        replaced = 0  # consumers replaced since one last worked
        said_again = False  # the follower said its consumers keep going at once
        try:
            while True:
                assert consumer is not None
                chunk, outcome = await self._runner.run(self._fetch(consumer, follow))
                if chunk or outcome is _Pull.MORE:  # the consumer works (a follower's 408)
                    replaced = 0
                    said_again = False
                if chunk:
                    last = chunk[-1].id
                    for message in chunk:
                        yield message
                    # Let go of them before the next pull's come in: held across it, the
                    # reader held two pulls' worth, twice max_pull_bytes.
                    chunk = []
                if outcome is _Pull.MORE:
                    continue
                if outcome is _Pull.END:
                    return
                # The consumer cannot go on: the next one starts after the last message.
                old, consumer = consumer, None
                await self._runner.run(self._drop_consumer(old, delete=outcome is _Pull.GONE))
                if replaced > 0 and not follow and outcome is not _Pull.SILENT:
                    why = self._again(outcome, old)
                    raise StoreError(f"cannot read stream {self._url.stream}: {why}")
                if replaced > 0 and outcome is _Pull.GONE:
                    # A follower's new consumer went before a message came: not NATS going
                    # away (that is LOST, waited for) but the pull itself refused (a server
                    # with max_request_batch below PULL_BATCH answers each with 409 Exceeded
                    # MaxRequestBatch). Replaced at once, that was a busy loop.
                    if not said_again:
                        said_again = True
                        self._waiting(self._again(outcome, old), last)
                    await trio.sleep(min(self._connection.api_timeout, 1.0))
                replaced += 1
                consumer = await self._next_consumer(last, outcome, follow)
        finally:
            if consumer is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await self._runner.run(self._drop_consumer(consumer, delete=True))

    async def _wait_connected(self, after: int) -> None:
        """Wait for the first connection, which ``open`` left going on, saying so once.

        Raises:
            StoreError: connecting failed for good (nats-py gave up, not a refusal to wait
                out).
        """
        connecting = self._connecting
        assert connecting is not None
        if not connecting.done():  # (connected since open: nothing to say)
            self._waiting(f"cannot reach NATS at {self._url}", after)

        async def connected() -> None:
            await asyncio.shield(connecting)

        try:
            await self._runner.run(connected())
        except (nats.errors.Error, OSError) as error:
            raise StoreError(f"cannot connect to NATS at {self._url}: {error}") from None
        self._connecting = None

    async def _next_consumer(self, last: int, outcome: _Pull, follow: bool) -> _Consumer:
        """A consumer from ``last + 1`` to replace one that cannot go on (``outcome``).

        Without ``follow`` it must come within ``nats_wait``; with ``follow`` this waits for
        NATS as long as it takes, saying so once.
        """
        connection = self._connection
        wait = connection.api_timeout
        if not follow:
            if outcome is _Pull.SILENT:
                raise StoreError(f"NATS at {self._url} did not answer within {wait:g}s")
            if not await self._runner.run(connection.wait_up(wait)):
                raise StoreError(
                    f"lost the connection to NATS at {self._url} (not back within {wait:g}s)"
                )
            return await self._runner.run(self._create_consumer(last))
        return await self._follow_consumer(last)

    async def _follow_consumer(self, last: int) -> _Consumer:
        """A consumer from ``last + 1``, waiting for NATS as long as it takes (not connected,
        not answering, refusing for now), saying so once."""
        connection = self._connection
        wait = connection.api_timeout
        noticed = False
        pause = _FIRST_RETRY
        while True:
            if not await self._runner.run(connection.wait_up(0)):
                if not noticed:
                    noticed = True
                    self._waiting(f"lost the connection to NATS at {self._url}", last)
                await self._runner.run(connection.wait_up(None))
            try:
                return await self._runner.run(self._create_consumer(last))
            except _NoAnswer as error:
                if not noticed:
                    noticed = True
                    self._waiting(str(error), last)
            # Also when NATS answered at once (no responders while JetStream starts, a
            # cluster's 503 while it elects a leader): soon at first, then once a second.
            await trio.sleep(min(pause, wait, 1.0))
            pause *= 2

    def _again(self, outcome: _Pull, old: _Consumer) -> str:
        """Why the consumer that replaced another could not go on either, in a line."""
        if outcome is _Pull.LOST:
            return f"lost the connection to NATS at {self._url} again before reading on"
        return (
            f"NATS at {self._url} ended the pull of a new consumer at once too "
            f"({old.ended_why or 'no status'})"
        )

    def _waiting(self, why: str, last: int) -> None:
        text = f"{why}; waiting for it, to go on after id {last}"
        if self._notice is not None:
            self._notice(text)
        else:
            log.warning("store_reader_waiting", store=str(self._url), detail=text)

    async def _create_consumer(self, after: int) -> _Consumer:
        """An ephemeral pull consumer from sequence ``after + 1``, unacknowledged.

        Raises:
            _NoAnswer: NATS did not answer within ``nats_wait``, could not be asked, or
                refused for now (``_TEMPORARY_ERRORS``).
            StoreError: NATS refused (the stream is gone, ...).
        """
        config: dict[str, Any] = {
            "ack_policy": "none",
            "filter_subject": self._url.subject,
            "mem_storage": True,
            # Removed by the server if the reader vanishes without deleting it.
            "inactive_threshold": 60 * NANOS,
        }
        if after > 0:
            config["deliver_policy"] = "by_start_sequence"
            config["opt_start_seq"] = after + 1
        else:
            config["deliver_policy"] = "all"
        stream = self._url.stream
        answer = await self._api(
            f"CONSUMER.CREATE.{stream}", {"stream_name": stream, "config": config}
        )
        if (detail := api_error(answer)) is not None:
            if answer["error"].get("err_code") in _TEMPORARY_ERRORS:
                raise _NoAnswer(f"NATS at {self._url} cannot create a consumer now: {detail}")
            raise StoreError(f"cannot read stream {stream}: {detail}")
        consumer = _Consumer(answer["name"], answer.get("num_pending", 0), self._max_pull_bytes)
        consumer.inbox = self._client.new_inbox()
        try:
            # Each pull replies to its own subject under the inbox (see _Consumer.start_pull).
            consumer.subscription = await self._client.subscribe_raw(
                consumer.inbox + ".*", consumer.deliver
            )
        except (nats.errors.Error, OSError) as error:
            raise _NoAnswer(f"cannot ask NATS at {self._url}: {error}") from None
        self._consumers.add(consumer)
        return consumer

    async def _fetch(self, consumer: _Consumer, follow: bool) -> tuple[list[StoredMessage], _Pull]:
        """The messages of a pull (up to ``PULL_BATCH`` and ``max_pull_bytes``), and what comes
        next (see ``_Pull``). A pull ends when the server ends it or it had all it asked for;
        a follower that caught up with the stream gets what arrived at once, and the pull
        goes on (the next call waits on it rather than asking again)."""
        if consumer.broken:
            return consumer.take(), _Pull.LOST
        if not follow and consumer.pending == 0:
            # What an earlier pull, given up after api_timeout, delivered since (the last
            # of it set pending to 0): the export's last messages.
            return consumer.take(), _Pull.END
        if not consumer.pulling:
            reply, request = consumer.start_pull(follow)
            try:
                await self._connection.nc.publish(
                    f"$JS.API.CONSUMER.MSG.NEXT.{self._url.stream}.{consumer.name}",
                    json.dumps(request).encode(),
                    reply=reply,
                )
            except (nats.errors.Error, OSError):  # closed, or too much waiting to be sent
                return consumer.take(), _Pull.LOST
        # A pull ends by itself when it expires; allow the wait beyond that. Even a no_wait
        # pull does: with the messages it counted on purged, nats-server 2.15 answered with
        # a 408 at the expiry, not a 404 at once (every run of the purge test; waiting only
        # api_timeout, as long as the expiry, lost that race 2 runs in 6).
        quiet = self._connection.api_timeout + _PULL_EXPIRES
        answered = await consumer.ready(quiet)
        chunk = consumer.take()
        if consumer.broken:
            return chunk, _Pull.LOST
        if not answered:
            return chunk, _Pull.SILENT
        if consumer.pulling:  # caught up (pending 0), the pull still under way
            return chunk, _Pull.MORE if follow else _Pull.END
        status = consumer.ended_by
        if status is not None and status not in _NOTHING_NOW and not consumer.pull_again:
            return chunk, _Pull.GONE
        # Without follow, the end: nothing more now (404/408: a purge may have taken what
        # the consumer last counted as pending), or nothing more at all.
        if not follow and (status in _NOTHING_NOW or consumer.pending == 0):
            return chunk, _Pull.END
        return chunk, _Pull.MORE

    async def _drop_consumer(self, consumer: _Consumer, *, delete: bool) -> None:
        """Stop reading ``consumer``; with ``delete``, also delete it on the server (else it
        goes by itself after a minute, if it is still there)."""
        self._consumers.discard(consumer)
        with contextlib.suppress(Exception):
            if consumer.subscription is not None:
                await self._client.unsubscribe_raw(consumer.subscription)
            if delete:
                await self._connection.api(f"CONSUMER.DELETE.{self._url.stream}.{consumer.name}")

    async def stats(self) -> StoreStats:
        """Count, bytes and the first and last message, from the stream's state."""
        return await self._runner.run(self._stats())

    async def _stats(self) -> StoreStats:
        answer = await self._api(f"STREAM.INFO.{self._url.stream}")
        if (detail := api_error(answer)) is not None:
            raise StoreError(f"cannot read stream {self._url.stream}: {detail}")
        state = answer["state"]
        if state.get("messages", 0) == 0:
            return StoreStats(0, state.get("bytes", 0), None, None, None, None)
        first = await self._get({"seq": state["first_seq"]})
        last = await self._get({"seq": state["last_seq"]})
        return StoreStats(
            messages=state["messages"],
            stored_bytes=state["bytes"],
            first_id=state["first_seq"],
            last_id=state["last_seq"],
            first_received_at=first.received_at if first else None,
            last_received_at=last.received_at if last else None,
        )

    async def _get(self, request: dict[str, Any]) -> StoredMessage | None:
        """The stream message a ``STREAM.MSG.GET`` request names, or ``None``."""
        answer = await self._api(f"STREAM.MSG.GET.{self._url.stream}", request)
        raw = answer.get("message")
        if raw is None:
            return None
        headers = _parse_headers(base64.b64decode(raw.get("hdrs", "")))
        payload = base64.b64decode(raw.get("data", ""))
        return _stored(raw["seq"], headers, payload, lambda: _parse_time(raw["time"]))

    async def prune(self, *, before_id: int | None = None, older_than: float | None = None) -> int:
        """Purge messages with ``id < before_id`` and/or stored more than ``older_than``
        seconds ago (both given: only those matching both); return how many went.

        ``older_than`` uses the stream's time for each message (when JetStream stored it,
        a batch commit after ``received_at``).
        """
        return await self._runner.run(self._prune(before_id, older_than))

    async def _prune(self, before_id: int | None, older_than: float | None) -> int:
        stream = self._url.stream
        limits: list[int] = []
        if before_id is not None:
            limits.append(before_id)
        if older_than is not None:
            cutoff = datetime.fromtimestamp(time.time() - older_than, UTC)
            first_kept = await self._get({"start_time": cutoff.isoformat().replace("+00:00", "Z")})
            if first_kept is not None:
                limits.append(first_kept.id)
            else:
                info = await self._api(f"STREAM.INFO.{stream}")
                limits.append(info["state"]["last_seq"] + 1)
        if not limits:
            return 0
        answer = await self._api(f"STREAM.PURGE.{stream}", {"seq": min(limits)})
        if (detail := api_error(answer)) is not None:
            raise StoreError(f"cannot purge stream {stream}: {detail}")
        purged: int = answer.get("purged", 0)
        return purged

    async def aclose(self) -> None:
        """Close the connection and stop the reader's asyncio thread."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                await self._runner.run(self._connection.close())
            self._runner.close()


class _NoAnswer(StoreError):
    """NATS did not answer a request in time, could not be asked (not connected), or
    refused for now (a cluster between leaders): a following reader waits for it, where
    any other ``StoreError`` ends the reading."""


class _Pull(enum.Enum):
    """How a pull ended, for what the reader does next."""

    MORE = enum.auto()
    """Pull again from the same consumer."""
    END = enum.auto()
    """Without follow: the consumer has nothing more."""
    GONE = enum.auto()
    """The consumer is no more (a restart of NATS, deleted as inactive): NATS said so."""
    LOST = enum.auto()
    """The connection dropped: what the consumer delivered meanwhile is lost to it."""
    SILENT = enum.auto()
    """NATS did not answer within the wait."""


class _ReaderClient(Client):
    """nats-py's client, except that it hands the deliveries to a consumer's inbox straight
    to that consumer, as the bytes that came in.

    nats-py would parse every header into a dict (9 to 15 µs for the eight a stored
    message has, three times as long as ``_parse_headers``), build a ``Msg`` and queue it
    for a task; that was most of an export's time. ``_process_msg`` is nats-py's private entry
    for every ``MSG``/``HMSG`` its parser reads (as of nats-py 2.16; the reader tests stop
    at once if it changes); every other subscription still goes through it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._deliveries: dict[int, Callable[[bytes, bytes, bytes, bytes | None], None]] = {}
        """Subscription id: what takes a delivery's subject, reply subject, payload and
        headers."""
        self.messages_seen = 0
        """Messages that came through ``_process_msg``: none after an API answer means a
        nats-py (``>=2.16,<3`` allows newer ones) that no longer calls it."""

    async def subscribe_raw(
        self, subject: str, deliver: Callable[[bytes, bytes, bytes, bytes | None], None]
    ) -> Subscription:
        """Subscribe to ``subject`` (an inbox's pulls) with ``deliver`` taking what arrives.

        Keyed by subscription id, not subject: a JetStream delivery comes with the stream
        message's own subject; only the subscription (of its pull's reply inbox) names it.
        """
        subscription = await self.subscribe(subject)
        self._deliveries[subscription._id] = deliver
        return subscription

    def detach(self, subscription: Subscription) -> None:
        """Take nothing more from ``subscription`` (nats-py queues it, unread, until
        ``unsubscribe_raw``)."""
        self._deliveries.pop(subscription._id, None)

    async def unsubscribe_raw(self, subscription: Subscription) -> None:
        self.detach(subscription)
        await subscription.unsubscribe()

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        self.messages_seen += 1
        deliver = self._deliveries.get(sid)
        if deliver is None:
            await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]
            return
        deliver(subject, reply, data, headers)


class _Consumer:
    """An ephemeral pull consumer, the inbox its messages arrive on, and the pull under way.

    Deliveries reach ``deliver`` from the connection's read loop, as bytes (see
    ``_ReaderClient``), and wait in a list until ``_fetch`` hands them to Trio: no task,
    future or timer per message, where ``next_msg`` made two tasks, a timer and a UUID for
    each. Everything here runs on the asyncio loop.

    The consumer counts what each pull has left as nats-server does, because the server
    ends a pull silently when it had all it asked for (the bytes to the last one included),
    and sends each pull's statuses to that pull's own reply subject, so that a status of a
    pull already over (``409 Batch Completed`` after its last message, the ``404`` of an
    export's last pull) cannot end the next one.
    """

    def __init__(self, name: str, pending: int, max_pull_bytes: int) -> None:
        self.name = name
        self.pending = pending
        self.inbox = ""
        """The pulls' reply subjects are ``<inbox>.<pull number>``."""
        self.subscription: Subscription | None = None
        self._max_pull_bytes = max_pull_bytes
        self._arrived: list[StoredMessage] = []
        self._pulls = 0
        self._reply = b""
        """The reply subject of the latest pull."""
        self.pulling = False
        """A pull is under way: the server may still deliver to it."""
        self._messages_left = 0
        self._bytes_left: int | None = None
        """What the pull under way may still deliver (bytes: ``None`` for no limit)."""
        self._delivered = 0
        """Messages the pull under way delivered."""
        self._one_alone = False
        """The next message is larger than ``max_pull_bytes``: the next pull asks for it
        alone, without a byte limit (the server would end every limited pull at it)."""
        self._ready = asyncio.Event()
        self._last_delivery = 0.0
        self._error: Exception | None = None
        self.ended_by: bytes | None = None
        """The status that ended the last pull (``b"404"``), if one did."""
        self.ended_why = ""
        """That status with its description (``409 Exceeded MaxRequestBatch of 100``)."""
        self.pull_again = False
        """The status that ended the last pull is one of ``_PULL_AGAIN``."""
        self.broken = False
        """The connection dropped since this consumer was made: it cannot go on."""

    def start_pull(self, follow: bool) -> tuple[str, dict[str, Any]]:
        """Begin a pull: the reply subject and the request to send for it. What arrives
        from now on belongs to it."""
        self._pulls += 1
        reply = f"{self.inbox}.{self._pulls}"
        self._reply = reply.encode()
        # expires: a pull request waits at most this long for messages, then ends with a 408.
        request: dict[str, Any] = {"expires": _PULL_EXPIRES * NANOS, "no_wait": not follow}
        if self._one_alone:
            request["batch"] = self._messages_left = 1
            self._bytes_left = None
        else:
            request["batch"] = self._messages_left = PULL_BATCH
            request["max_bytes"] = self._bytes_left = self._max_pull_bytes
        self._delivered = 0
        self.pulling = True
        self.ended_by = None
        self.ended_why = ""
        self.pull_again = False
        self._last_delivery = asyncio.get_running_loop().time()
        self._update_ready()
        return reply, request

    def deliver(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        """Take one delivery. It runs inside nats-py's read loop, so it must not raise: a
        delivery that cannot be read is kept for ``take`` to raise."""
        self._last_delivery = asyncio.get_running_loop().time()
        try:
            status = _status(headers)
            if status is not None:
                # 404 no messages, 408 request expired, 100 heartbeat: a heartbeat only shows
                # the pull is alive, anything else ends it (if it is this pull's).
                if status != b"100" and subject == self._reply and self.pulling:
                    self._end_pull(status, _status_line(headers))
                return
            message, self.pending = _stored_from_delivery(reply, data, headers)
        except Exception as error:
            # Not a JetStream delivery (something published to the inbox by another client):
            # a StoreError, which the export's CLI says in one line, not a traceback.
            self._error = StoreError(
                f"cannot read the stream: a delivery to consumer {self.name} is not a stored "
                f"message ({error or type(error).__name__})"
            )
            self._update_ready()
            return
        self._arrived.append(message)
        self._one_alone = False
        if self.pulling:
            self._delivered += 1
            self._messages_left -= 1
            if self._bytes_left is not None:
                # As nats-server 2.15 counts a message against a pull's max_bytes.
                self._bytes_left -= len(subject) + len(reply) + len(headers or b"") + len(data)
            if self._messages_left <= 0 or (self._bytes_left is not None and self._bytes_left <= 0):
                self.pulling = False
        # A delivery only ever makes the consumer ready (_update_ready's test, cut to what
        # it can change): this runs for every message.
        if not self.pulling or self.pending == 0:
            self._ready.set()

    def _end_pull(self, status: bytes, why: str) -> None:
        self.pulling = False
        self.ended_by = status
        self.ended_why = why
        self.pull_again = why.startswith(_PULL_AGAIN)
        if why.startswith(_TOO_LARGE) and self._delivered == 0:
            self._one_alone = True
        self._update_ready()

    def _update_ready(self) -> None:
        """Whether ``_fetch`` has something to act on: the pull is over, or the consumer
        has caught up with the stream (pending 0) and what arrived can go at once."""
        if (
            not self.pulling
            or self.broken
            or self._error is not None
            or (self._arrived and self.pending == 0)
        ):
            self._ready.set()
        else:
            self._ready.clear()

    def lose(self) -> None:
        """The connection dropped: end the pull (asyncio side, from nats-py's disconnect
        callback, before anything of a new connection is read)."""
        self.broken = True
        self._update_ready()

    async def ready(self, quiet: float) -> bool:
        """Wait until there is something to act on (true), or nothing arrived for ``quiet``
        seconds (false: NATS did not answer)."""
        loop = asyncio.get_running_loop()
        while not self._ready.is_set():
            left = self._last_delivery + quiet - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), left)
        return True

    def take(self) -> list[StoredMessage]:
        """The messages that arrived so far, handed over; or the error a delivery that could
        not be read raised (the pull's messages are then dropped, as with ``next_msg``)."""
        chunk, self._arrived = self._arrived, []
        error, self._error = self._error, None
        self._update_ready()
        if error is not None:
            raise error
        return chunk


def _status(headers: bytes | None) -> bytes | None:
    """The inline status of a message from the server (``NATS/1.0 404 No Messages``), if
    any; a stored message's headers start with a bare ``NATS/1.0``."""
    if not headers:
        return None
    version, _, _ = headers.partition(b"\r\n")
    code = version.partition(b" ")[2][:3]
    return code if code.isdigit() else None


def _status_line(headers: bytes | None) -> str:
    """A status message's code and description (``409 Exceeded MaxRequestBatch of 100``)."""
    version = (headers or b"").partition(b"\r\n")[0]
    return version.partition(b" ")[2].strip().decode("utf-8", "replace")


def _stored_from_delivery(
    reply: bytes, data: bytes, headers: bytes | None
) -> tuple[StoredMessage, int]:
    """The stored message a delivery carries, and how many the consumer has after it."""
    stream_seq, nanos, pending = _delivery_fields(reply.decode("ascii", "replace"))
    fields = _parse_headers(headers) if headers else {}

    def stream_time() -> float:
        # As nats-py's metadata had it: through a datetime, so to the microsecond.
        return datetime.fromtimestamp(nanos / NANOS, UTC).timestamp()

    return _stored(stream_seq, fields, data, stream_time), pending


def _delivery_fields(reply: str) -> tuple[int, int, int]:
    """The stream sequence, the stream's time (ns) and the consumer's pending count from a
    delivery's reply subject, which nats-py's ``msg.metadata`` also reads (at four times the
    cost, building two dataclasses and a datetime). Without a domain it is
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>``;
    with one, ``<domain>.<account hash>`` come before the stream and a token at the end.

    Raises:
        nats.errors.NotJSMessageError: not a JetStream delivery, as ``msg.metadata`` did.
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        skip = 0
    elif len(tokens) >= 11:
        skip = 2
    else:
        raise nats.errors.NotJSMessageError
    if tokens[0] != "$JS" or tokens[1] != "ACK":
        raise nats.errors.NotJSMessageError
    return int(tokens[5 + skip]), int(tokens[7 + skip]), int(tokens[8 + skip])


def _stored(
    stream_seq: int,
    headers: dict[str, str],
    payload: bytes,
    stream_time: Callable[[], float],
) -> StoredMessage:
    """A ``StoredMessage`` from a stream message's headers, falling back for missing ones
    (``received_at`` to the time the stream stored it, asked for only then)."""
    try:
        received_at = float(headers[HEADER_PREFIX + "Received-At"])
    except (KeyError, ValueError):
        received_at = stream_time()
    stored_crc32 = _header_number(headers, "Crc32")
    return StoredMessage(
        id=stream_seq,
        received_at=received_at,
        peer=headers.get(HEADER_PREFIX + "Peer", ""),
        conn_id=_header_number(headers, "Conn-Id") or 0,
        seq=_header_number(headers, "Seq") or 0,
        # Computed only when the header is missing: it reads the whole payload, which made
        # up most of the time per message for large ones.
        crc32=crc32(payload) if stored_crc32 is None else stored_crc32,
        payload=payload,
        identity=headers.get(HEADER_PREFIX + "Identity"),
    )


def _header_number(headers: dict[str, str], name: str) -> int | None:
    """The ``Ackservice-<name>`` header as a number, or ``None`` if missing or not one."""
    try:
        return int(headers[HEADER_PREFIX + name])
    except (KeyError, ValueError):
        return None


def _parse_headers(raw: bytes) -> dict[str, str]:
    """``NATS/1.0\\r\\nName: value\\r\\n...`` as a dict (the first line is the version)."""
    headers: dict[str, str] = {}
    for line in raw.split(b"\r\n")[1:]:
        name, separator, value = line.partition(b":")
        if separator:
            headers[name.strip().decode("ascii", "replace")] = value.strip().decode(
                "utf-8", "replace"
            )
    return headers


def _parse_time(text: str) -> float:
    """An RFC 3339 time from JetStream (nanosecond fraction, ``Z``) as a Unix time."""
    main, _, fraction = text.rstrip("Z").partition(".")
    seconds = datetime.fromisoformat(main).replace(tzinfo=UTC).timestamp()
    digits = fraction.rstrip("Z")[:9]
    return seconds + (int(digits) / 10 ** len(digits) if digits else 0.0)
