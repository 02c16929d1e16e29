"""Scenario 13, a half-open peer: a client process that vanishes without FIN or RST
(simulated by freezing it with SIGSTOP) is freed by the idle timeout."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import trio
from rel_checker import History, check
from rel_harness import poll_until

from conftest import Report, StartServer
from support import LineReader

IDLE_TIMEOUT = 1.0
DRAIN_TIMEOUT = 0.5

# The client: one message and its ACK, then (optionally) half a line, then it waits to be
# frozen. It prints its address and the reply; it never exits by itself before 60 s.
CLIENT = """
import socket, sys, time
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sock.sendall(b"@" + sys.argv[2].encode() + b"|before the freeze\\n")
reply = sock.makefile("rb").readline().decode().strip()
sock.sendall(sys.argv[3].encode())
host, port = sock.getsockname()[:2]
print(f"{host}:{port} {reply}", flush=True)
time.sleep(60)
"""


@pytest.mark.slow
@pytest.mark.parametrize("tail", ["", "half a line"], ids=["between-messages", "mid-line"])
async def test_frozen_client_is_freed_by_the_idle_timeout(
    start_server: StartServer, report: Report, tail: str
) -> None:
    """A client gets its ACK (and, in one variant, sends half a line), then is frozen with
    SIGSTOP: it will never read, answer or close. The server tells it ``ERR 0
    idle-timeout`` after the idle timeout, gives up waiting for it after the drain timeout,
    closes the connection (reason ``idle-timeout``) and is back to its baseline
    descriptors, all while the client is still frozen."""
    server = await start_server(
        recording=True,
        flags=["--idle-timeout", str(IDLE_TIMEOUT), "--drain-timeout", str(DRAIN_TIMEOUT)],
    )
    pid = "frozen-" + ("mid" if tail else "between")
    client = await trio.lowlevel.open_process(
        [sys.executable, "-c", CLIENT, str(server.port), pid, tail], stdout=subprocess.PIPE
    )
    try:
        assert client.stdout is not None
        with trio.fail_after(20):
            address, reply = (await LineReader(client.stdout).line()).decode().split(" ", 1)
            assert reply.startswith("ACK 1 ")
            client.send_signal(signal.SIGSTOP)
            frozen_at = trio.current_time()

            def closed() -> list[dict[str, object]]:
                return [
                    event
                    for event in server.events_named("connection_closed")
                    if event["peer"] == address
                ]

            await poll_until(lambda: bool(closed()), 0.02)
            freed_after = trio.current_time() - frozen_at
            [event] = closed()
            settled = await server.assert_healthy()
        assert client.poll() is None, "the client was to stay frozen throughout"
    finally:
        client.kill()
        await client.wait()

    assert event["reason"] == "idle-timeout"
    assert event["messages"] == 1
    duration = float(event["duration"])  # type: ignore[arg-type]
    assert IDLE_TIMEOUT <= duration <= IDLE_TIMEOUT + DRAIN_TIMEOUT + 1.0
    history = History()
    payload = b"@%s|before the freeze" % pid.encode()
    history.written(pid, payload)
    history.acked(pid, len(payload), int(reply.split()[3], 16))
    verdict = check(history, server.records())
    verdict.assert_valid()
    report(
        idle_timeout_s=IDLE_TIMEOUT,
        drain_timeout_s=DRAIN_TIMEOUT,
        connection_lasted_s=duration,
        freed_after_freeze_s=round(freed_after, 2),
        descriptors_settled_s=round(settled, 3),
    )
