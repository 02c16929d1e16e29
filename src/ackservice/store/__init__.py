"""Durable stores: where an acknowledged message is kept, and how to read it back.

``open_store(url)`` opens the store a ``--store`` URL names (``sqlite:PATH``,
``nats://HOST:PORT/STREAM`` or ``none``); ``open_reader(url)`` reads one back
(``python -m ackservice.store``). Implement ``Store`` to plug in your own.
"""

from __future__ import annotations

from .base import (
    Failed,
    Message,
    Rejected,
    Store,
    StoredMessage,
    StoreError,
    StoreReader,
    StoreStats,
    StoreUnavailable,
    Unavailable,
    Verdict,
)
from .batch import MessageBatch, MessageRun
from .opening import DEFAULT_CONNECT_TIMEOUT, open_reader, open_store
from .url import DEFAULT_STORE_URL, parse_store_url

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_STORE_URL",
    "Failed",
    "Message",
    "MessageBatch",
    "MessageRun",
    "Rejected",
    "Store",
    "StoreError",
    "StoreReader",
    "StoreStats",
    "StoreUnavailable",
    "StoredMessage",
    "Unavailable",
    "Verdict",
    "open_reader",
    "open_store",
    "parse_store_url",
]
