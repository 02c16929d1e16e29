"""Fixtures the store tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nats_support import NatsServer


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with JetStream on a free loopback port, stopped by PID at the end."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    yield server
    server.stop()
