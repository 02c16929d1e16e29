"""Fixtures for the reliability scenarios: server processes that never outlive a test, and
a place to report each scenario's figures."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rel_harness import FULL, ServerUnderTest

StartServer = Callable[..., Awaitable[ServerUnderTest]]
Report = Callable[..., None]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """``server = await start_server(recording=True, flags=[...])``: a running server
    process, warmed up, its baselines taken; killed at the end of the test if still up."""
    servers: list[ServerUnderTest] = []

    async def start(**kwargs: Any) -> ServerUnderTest:
        server = ServerUnderTest(tmp_path, **kwargs)
        servers.append(server)
        return await server.started()

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Report:
    """``report(name=value, ...)``: a scenario's measured figures. They are shown with the
    test's result (``-rA``) and, when RELIABILITY_RESULTS names a file (scripts/reliability.py
    sets it), appended to it as one JSON object per call."""

    def add(**figures: Any) -> None:
        for name, value in figures.items():
            request.node.user_properties.append((name, value))
        path = os.environ.get("RELIABILITY_RESULTS")
        if path:
            entry = {
                "test": request.node.nodeid,
                "scale": "full" if FULL else "quick",
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **figures,
            }
            with Path(path).open("a") as results:
                results.write(json.dumps(entry) + "\n")

    return add


@pytest.fixture(params=["sqlite", "nats"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store URL, once per store: a SQLite file in the test's directory, or a stream on a
    nats-server of its own."""
    from store_harness import running_nats  # it imports this module's types

    if request.param == "sqlite":
        yield f"sqlite:{tmp_path / 's.db'}"
        return
    with running_nats(tmp_path / "nats") as nats:
        yield f"{nats.url}/RELIABILITY"
