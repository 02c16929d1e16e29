"""Opening the store or reader a URL names; each store's module is imported only when used."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from .base import Store, StoreReader
from .url import JetStreamURL, SQLiteURL, parse_store_url

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "DEFAULT_MAX_PULL_BYTES", "open_reader", "open_store"]

DEFAULT_CONNECT_TIMEOUT = 2.0
"""Seconds ``open_store`` waits for a networked store (NATS) before going on without it:
long enough for a server that is up, short enough not to hold start-up for one that is not."""

DEFAULT_MAX_PULL_BYTES = 16 * 1024 * 1024
"""Bytes of messages a JetStream reader asks for at once (a pull's ``max_bytes``), unless
told otherwise: with its 500 messages a pull, what it holds in memory at most. 500 messages
of 1 MB (NATS's default ``max_payload``) were 500 MB; 16 MiB still takes small messages 500
at a time (500 of 64 bytes are ~190 kB as JetStream counts them, headers included), so it
costs an export of them nothing. Here, not in the reader's module, so that naming it
imports no nats-py."""


@asynccontextmanager
async def open_store(
    url: str,
    *,
    commit_timeout: float | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> AsyncIterator[Store | None]:
    """Open the store ``url`` names for writing (``None`` for ``none``); close it on exit.

    ``commit_timeout`` is how long one commit may take (the server's ``--store-timeout``): a
    JetStream store waits that long for a batch's PubAck (default 5 s), so that the server's
    timeout, not a shorter one of the store's own, decides when a batch is unavailable.
    ``connect_timeout`` is how long a JetStream store waits for NATS here (the server's
    ``--store-connect-timeout``); past it, it returns and keeps connecting in the background,
    its batches unavailable until then.

    Raises:
        StoreError: the URL is malformed, or the store cannot be used as configured (a path
            that cannot be created, a stream with conflicting settings).
    """
    parsed = parse_store_url(url)
    if parsed is None:
        yield None
        return
    store: Store
    if isinstance(parsed, SQLiteURL):
        from .sqlite import SQLiteStore

        store = await SQLiteStore.open(parsed.path)
    else:
        assert isinstance(parsed, JetStreamURL)
        from .jetstream import JetStreamStore

        if commit_timeout is None:
            store = await JetStreamStore.open(parsed, connect_wait=connect_timeout)
        else:
            store = await JetStreamStore.open(
                parsed, connect_wait=connect_timeout, ack_timeout=commit_timeout
            )
    try:
        yield store
    finally:
        await store.aclose()


@asynccontextmanager
async def open_reader(
    url: str,
    *,
    nats_wait: float = 5.0,
    notice: Callable[[str], None] | None = None,
    max_pull_bytes: int = DEFAULT_MAX_PULL_BYTES,
    follow: bool = False,
) -> AsyncIterator[StoreReader]:
    """Open the store ``url`` names for reading back; close it on exit. ``nats_wait``
    bounds each wait for NATS (connecting, a request) when it is a JetStream store;
    ``notice`` takes the line a following JetStream reader gives when it waits for NATS;
    ``max_pull_bytes`` bounds the bytes of messages a JetStream reader asks for at once;
    ``follow`` (for a reader whose ``messages(follow=True)`` comes next) opens a JetStream
    reader even when NATS is not reachable yet: it goes on connecting, and the follower
    waits for it. SQLite ignores all four.

    Raises:
        StoreError: the URL is malformed or ``none``, or the store does not exist.
    """
    from .base import StoreError

    parsed = parse_store_url(url)
    reader: StoreReader
    if parsed is None:
        raise StoreError("the store 'none' keeps nothing to read; name a sqlite: or nats:// store")
    if isinstance(parsed, SQLiteURL):
        from .sqlite import SQLiteReader

        reader = await SQLiteReader.open(parsed.path)
    else:
        from .jetstream_reader import JetStreamReader

        reader = await JetStreamReader.open(
            parsed,
            nats_wait=nats_wait,
            notice=notice,
            max_pull_bytes=max_pull_bytes,
            wait_for_nats=follow,
        )
    try:
        yield reader
    finally:
        await reader.aclose()
