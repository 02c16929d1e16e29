"""What the store scenarios share: the real server with a real store, the store read back
through the real ``python -m ackservice.store export``, the client CLI as a process, and
the checker's view of a store.

The scenarios judge a store the way the others judge the recording server's record file:
the exported messages become ``Recorded`` entries (``stored_records``), so the same
total-queue checker (``rel_checker.check``) compares them with the clients' ``History``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import trio
from rel_checker import History, Recorded, filler_block, make_payload, payload_id
from rel_harness import WARMUP_PREFIX, ServerUnderTest, WireTap, poll_until

from ackservice.client import Client, open_client
from ackservice.protocol import MessageFramer
from conftest import StartServer
from nats_support import NatsCluster, NatsServer

# Reading a store back: a process start, then a few hundred thousand rows at most.
EXPORT_TIMEOUT = 30.0


def plain_env() -> dict[str, str]:
    """This environment without ACKSERVICE_* settings, so only the flags given apply."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ACKSERVICE_")}


async def start_store_server(
    start_server: StartServer,
    store_url: str,
    *,
    port: int = 0,
    boot: int = 1,
    flags: Sequence[str] = (),
) -> ServerUnderTest:
    """The real ``python -m ackservice.server --store URL`` (no hook), warmed up: its
    warm-up message is stored too, and ``stored_records``/``stored_frames`` leave it out."""
    return await start_server(
        recording=False, port=port, boot=boot, flags=["--store", store_url, *flags]
    )


@contextlib.contextmanager
def running_nats(store_dir: Path) -> Iterator[NatsServer]:
    """A nats-server with JetStream on a free loopback port, stopped by PID at the end."""
    server = NatsServer(store_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def running_cluster(store_dir: Path) -> Iterator[NatsCluster]:
    """Three clustered nats-servers with JetStream on loopback, JetStream answering on each;
    every node still running is stopped by PID at the end."""
    cluster = NatsCluster(store_dir)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def export(store_url: str, fmt: str) -> bytes:
    """``python -m ackservice.store export --store URL --format FMT``'s output; it must exit 0."""
    command = [sys.executable, "-m", "ackservice.store", "export"]
    with trio.fail_after(EXPORT_TIMEOUT):
        done = await trio.run_process(
            [*command, "--store", store_url, "--format", fmt],
            capture_stdout=True,
            capture_stderr=True,
            env=plain_env(),
            check=False,
        )
    assert done.returncode == 0, f"export exited {done.returncode}: {done.stderr!r}"
    return bytes(done.stdout)


def frames(stream: bytes) -> list[bytes]:
    """The messages in a stream of protocol lines, as the server frames them."""
    framer = MessageFramer(1 << 30)
    found = framer.feed(stream) + framer.end_of_stream()
    assert all(isinstance(frame, bytes) for frame in found)
    return [frame for frame in found if isinstance(frame, bytes)]


def is_warm_up(payload: bytes) -> bool:
    return (payload_id(payload) or "").startswith(WARMUP_PREFIX)


async def stored_frames(store_url: str) -> list[bytes]:
    """Every payload in the store, in store order (``export --format lines``), warm-ups left
    out."""
    return [frame for frame in frames(await export(store_url, "lines")) if not is_warm_up(frame)]


async def stored_records(store_url: str) -> list[Recorded]:
    """Every message in the store as the checker's ``Recorded`` (``export --format json``),
    warm-ups left out. The CRC-32 the store kept must be that of the payload it kept."""
    records = []
    for line in (await export(store_url, "json")).splitlines():
        entry: dict[str, Any] = json.loads(line)
        if "payload" in entry:
            payload = entry["payload"].encode()
        else:
            payload = base64.b64decode(entry["payload_b64"])
        crc = zlib.crc32(payload)
        assert entry["crc32"] == f"{crc:08x}", f"stored CRC-32 is not the payload's: {entry}"
        assert entry["nbytes"] == len(payload)
        if is_warm_up(payload):
            continue
        # One boot for all: the scenarios' payloads carry ids, which name them across runs.
        records.append(
            Recorded(
                0,
                entry["conn_id"],
                entry["peer"],
                entry["seq"],
                len(payload),
                crc,
                payload_id(payload),
            )
        )
    return records


def sqlite_integrity(path: Path) -> str:
    """SQLite's ``PRAGMA integrity_check`` verdict on the store file (``ok`` when sound)."""
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as connection:
        rows = connection.execute("PRAGMA integrity_check").fetchall()
    return "; ".join(str(row[0]) for row in rows)


class ClientCLI:
    """``python -m ackservice.client`` as a process: stdin a file or a pipe the test writes
    to, stdout and stderr in files. Use ``open_client_cli``."""

    def __init__(self, process: trio.Process, out_path: Path, err_path: Path) -> None:
        self.process = process
        self.out_path = out_path
        self.err_path = err_path

    @property
    def stdin(self) -> trio.abc.SendStream:
        assert self.process.stdin is not None, "started with a file as stdin"
        return self.process.stdin

    def replies(self) -> list[dict[str, Any]]:
        """The ``--json`` replies printed so far (a line still being written is skipped)."""
        text = self.out_path.read_text(errors="replace")
        return [json.loads(line) for line in text.split("\n")[:-1]]

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    async def exited(self) -> int:
        """Its exit code (bound the wait with a cancel scope)."""
        return await self.process.wait()


@contextlib.asynccontextmanager
async def open_client_cli(
    workdir: Path, name: str, port: int, args: Sequence[str], stdin: Path | None = None
) -> AsyncIterator[ClientCLI]:
    """Start the client CLI (``--port port`` plus ``args``) reading ``stdin`` (a file), or a
    pipe when None; it is killed if still running when the block ends."""
    out_path = workdir / f"{name}.out"
    err_path = workdir / f"{name}.err"
    with contextlib.ExitStack() as files:
        source: Any = subprocess.PIPE if stdin is None else files.enter_context(stdin.open("rb"))
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "ackservice.client", "--port", str(port), *args],
            stdin=source,
            stdout=files.enter_context(out_path.open("wb")),
            stderr=files.enter_context(err_path.open("wb")),
            env=plain_env(),
        )
        try:
            yield ClientCLI(process, out_path, err_path)
        finally:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await process.wait()
            if process.stdin is not None:
                await trio.aclose_forcefully(process.stdin)


async def wait_for_replies(client: ClientCLI, count: int) -> None:
    """Until the client has printed ``count`` replies (bound it with a cancel scope)."""

    def enough() -> bool:
        assert client.process.poll() is None or len(client.replies()) >= count, (
            f"client exited {client.process.returncode}: {client.stderr()}"
        )
        return len(client.replies()) >= count

    await poll_until(enough, 0.02)


CLIENTS = 4
"""Clients of ``run_clients``."""

Fault = Callable[[Callable[[], int], Callable[[], int]], Awaitable[None]]
"""``fault(receipts, in_flight)``: breaks something once the run is under way."""


def client_payloads(client: int, seed: int, count: int) -> list[bytes]:
    """One client's ``count`` payloads, ids ``c<client>-<n>``, 16 to 300 bytes of random
    bytes."""
    filler = filler_block()
    rng = random.Random(seed * 100 + client)
    return [
        make_payload(f"c{client}-{n}", rng.randint(16, 300), filler, rng.randrange(1 << 20))
        for n in range(count)
    ]


async def run_clients(
    port: int, history: History, fault: Fault, messages_per_client: int
) -> dict[str, int]:
    """``CLIENTS`` pipelining ``ackservice.client`` clients (reconnecting, resending), each
    connection observed by a ``WireTap`` into ``history``, while ``fault`` strikes beside
    them; every message must end acknowledged (bound it with a cancel scope). Returns the
    clients' summed counts."""
    receipts = [0] * CLIENTS
    clients: list[Client] = []

    async def connect() -> trio.abc.Stream:
        return WireTap(await trio.open_tcp_stream("127.0.0.1", port), history)

    async def send(number: int, payloads: list[bytes]) -> None:
        async with open_client(
            "127.0.0.1", port, connect=connect, backoff_base=0.05, backoff_cap=0.5
        ) as client:
            clients.append(client)
            async for receipt in client.send_many(payloads):
                assert receipt.acked, receipt.reply
                receipts[number] += 1

    async with trio.open_nursery() as nursery:
        for number in range(CLIENTS):
            nursery.start_soon(
                send, number, client_payloads(number, seed=17, count=messages_per_client)
            )
        nursery.start_soon(fault, lambda: sum(receipts), lambda: sum(c.in_flight for c in clients))
    assert receipts == [messages_per_client] * CLIENTS
    return {
        "resent": sum(c.stats.resent for c in clients),
        "retried_unavailable": sum(c.stats.retried for c in clients),
        "connections": sum(c.stats.connections for c in clients),
    }


def all_ids(messages_per_client: int) -> set[str]:
    """The ids of every payload of ``run_clients``."""
    return {f"c{c}-{n}" for c in range(CLIENTS) for n in range(messages_per_client)}


async def check_store_outage_logged(server: ServerUnderTest) -> None:
    """One ``store_unavailable`` (an error, so allowed here), then ``store_recovered``; alive,
    no crash, descriptors back to the baseline."""
    await server.wait_for_event("store_recovered", within=10)
    assert server.count_events("store_unavailable") == 1
    await server.assert_healthy(allowed_errors=["store_unavailable"])
