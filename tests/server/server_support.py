"""Helpers the server tests share: an in-process store and handler connection, a scrape of
the metrics endpoint read as samples, and the server CLI run to a start-up error.

Imported by name (pytest puts this directory on ``sys.path``); the name ``server_support``
keeps it apart from ``tests/support.py`` and any other test directory's helpers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from ackservice.server import AckHandler
from ackservice.store import Message, StoreUnavailable, Verdict
from support import LineReader

# --- an in-process store and a connection to a handler (no sockets) -----------------------


class ListStore:
    """Keeps batches in a list; ``gate`` (when set) holds each commit until it is opened;
    ``failing`` makes commits raise ``StoreUnavailable``."""

    description = "list"

    def __init__(self) -> None:
        self.batches: list[list[Message]] = []
        self.gate: trio.Event | None = None
        self.failing = False
        self.verdicts: dict[bytes, Verdict] = {}
        self.commit_started = trio.Event()

    @property
    def payloads(self) -> list[bytes]:
        return [message.payload for batch in self.batches for message in batch]

    async def store(self, batch: Sequence[Message]) -> Sequence[Verdict] | None:
        self.commit_started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise StoreUnavailable("disk full")
        verdicts = [self.verdicts.get(message.payload) for message in batch]
        self.batches.append([m for m, v in zip(batch, verdicts, strict=True) if v is None])
        return verdicts if any(v is not None for v in verdicts) else None

    async def aclose(self) -> None:
        pass


def connect(
    nursery: trio.Nursery, handler: AckHandler
) -> tuple[trio.testing.StapledStream[Any, Any], LineReader]:
    """A client stream served by ``handler`` over an in-memory pair, and a reader of its
    replies."""
    client, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(handler, server_side)
    return client, LineReader(client)


# --- the metrics endpoint of a real server process ---------------------------------------


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    """The status and body of a GET of ``path`` on the metrics port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, parsed by prometheus-client's own parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    """One sample of a scrape, by name and labels (``worker`` is ``"0"`` unless given)."""
    return samples(text)[(name, tuple(sorted({"worker": "0", **labels}.items())))]


# --- the server CLI ------------------------------------------------------------------------


def run_cli(cwd: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The server CLI run to its end (a start-up error), with ``env`` added."""
    return subprocess.run(
        [sys.executable, "-m", "ackservice.server", "--store", "none", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=20,
        env={**os.environ, **env},
        cwd=cwd,
        check=False,
    )
