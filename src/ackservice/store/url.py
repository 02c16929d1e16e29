"""Store URLs: what ``--store`` accepts, parsed without opening anything.

- ``none``: nothing is kept; an ACK means the server received the message.
- ``sqlite:PATH``: the embedded store (``sqlite:///abs/path`` also works).
- ``nats://HOST:PORT/STREAM``: NATS JetStream; query options ``subject``, ``replicas``,
  ``create`` (``true``/``false``: create the stream when missing; default true).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from .base import StoreError

__all__ = ["DEFAULT_STORE_URL", "JetStreamURL", "SQLiteURL", "StoreURL", "parse_store_url"]

DEFAULT_STORE_URL = "sqlite:ackservice.db"
"""The command line's default: a file in the working directory (the library keeps nothing
unless given a store)."""

_NATS_DEFAULT_PORT = 4222


@dataclass(frozen=True, slots=True)
class SQLiteURL:
    """``sqlite:PATH``."""

    path: Path

    def __str__(self) -> str:
        return f"sqlite:{self.path}"


@dataclass(frozen=True, slots=True)
class JetStreamURL:
    """``nats://HOST:PORT/STREAM?subject=...&replicas=N&create=true``."""

    servers: str
    """The NATS server URL without path or query (``nats://host:port``), credentials kept."""
    stream: str
    subject: str
    """The subject messages are published on (default ``ackservice.<STREAM>``)."""
    replicas: int
    create: bool

    def __str__(self) -> str:
        # Never print credentials: the description goes to logs.
        split = urlsplit(self.servers)
        return f"{split.scheme}://{split.hostname}:{split.port or _NATS_DEFAULT_PORT}/{self.stream}"


StoreURL = SQLiteURL | JetStreamURL | None


def parse_store_url(url: str, *, none_allowed: bool = True) -> StoreURL:
    """Parse a ``--store`` value; ``None`` for ``none``.

    ``none_allowed=False`` (for a reader of stores, to which ``none`` is no use) leaves
    ``none`` out of what an unknown URL's message suggests; ``none`` itself still parses.

    Raises:
        StoreError: the URL is not one of the forms above (the message says what is).
    """
    text = url.strip()
    if text == "none":
        return None
    if text.startswith("sqlite:"):
        path = text.removeprefix("sqlite:")
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise StoreError(f"store URL {url!r} has no path; use sqlite:PATH")
        return SQLiteURL(Path(path))
    if text.startswith(("nats://", "tls://")):
        return _parse_jetstream(url, text)
    forms = "sqlite:PATH or nats://HOST:PORT/STREAM"
    if none_allowed:
        forms = "sqlite:PATH, nats://HOST:PORT/STREAM or none"
    raise StoreError(f"unknown store {url!r}; use {forms}")


def _parse_jetstream(url: str, text: str) -> JetStreamURL:
    split = urlsplit(text)
    stream = split.path.strip("/")
    if not split.hostname:
        raise StoreError(f"store URL {url!r} has no host; use nats://HOST:PORT/STREAM")
    if not stream or "/" in stream or not all(c.isalnum() or c in "-_" for c in stream):
        raise StoreError(
            f"store URL {url!r} needs a stream name (letters, digits, - and _) as its path, "
            "e.g. nats://127.0.0.1:4222/ACKSERVICE"
        )
    try:
        port = split.port or _NATS_DEFAULT_PORT
    except ValueError:
        raise StoreError(f"store URL {url!r} has a bad port") from None
    options = {key: values[-1] for key, values in parse_qs(split.query).items()}
    unknown = set(options) - {"subject", "replicas", "create"}
    if unknown:
        raise StoreError(
            f"store URL {url!r} has unknown option(s) {', '.join(sorted(unknown))}; "
            "known: subject, replicas, create"
        )
    subject = options.get("subject", f"ackservice.{stream}")
    try:
        replicas = int(options.get("replicas", "1"))
    except ValueError:
        replicas = 0
    if not 1 <= replicas <= 5:
        raise StoreError(f"store URL {url!r}: replicas must be from 1 to 5 (JetStream's limit)")
    create = options.get("create", "true").lower()
    if create not in ("true", "false"):
        raise StoreError(f"store URL {url!r}: create must be true or false")
    netloc = split.netloc.rsplit("@", 1)
    host_port = netloc[-1] if split.port else f"{netloc[-1]}:{port}"
    auth = f"{netloc[0]}@" if len(netloc) == 2 else ""
    return JetStreamURL(
        servers=f"{split.scheme}://{auth}{host_port}",
        stream=stream,
        subject=subject,
        replicas=replicas,
        create=create == "true",
    )
