"""Scenario 15, log hygiene: 10,000 messages carrying a unique marker, plus malformed input
carrying it too; the marker never appears in any log, at any level. (There is no
debug-with-payloads option: payloads are never logged.)"""

from __future__ import annotations

import base64
import sys
import uuid
from pathlib import Path

import pytest
import trio
from rel_checker import History, check, message_key
from rel_harness import ServerUnderTest, pipelined_client, reset_socket

from ackservice.protocol import DEFAULT_MAX_MESSAGE_BYTES
from conftest import Report, StartServer

MESSAGES = 10_000
REJECT_PREFIX = "refuse-me"


def leaks(text: bytes, marker: bytes) -> list[str]:
    """The forms of ``marker`` found in ``text``: as is, upper case, hex, or base64 at any
    of the three alignments a prefix can give it (the middle of the encoding, which does
    not depend on the bytes around the marker)."""
    forms = {"raw": marker, "upper": marker.upper(), "hex": marker.hex().encode()}
    for shift in range(3):
        forms[f"base64+{shift}"] = base64.b64encode(b"\0" * shift + marker)[4:-4]
    return [name for name, form in forms.items() if form in text]


async def malformed_input(server: ServerUnderTest, marker: bytes) -> None:
    """The marker inside everything that makes the server log a warning or an error."""
    oversized = b"x" * DEFAULT_MAX_MESSAGE_BYTES + marker + b"\n"
    pieces = [
        oversized,
        b"\x00" + marker + b"\xff\xfe\n",
        b"\xc3\x28" + marker + b"\r\r\n",
        REJECT_PREFIX.encode() + marker + b"\n",
        b"\r" + marker + b"\r\n\n\n",
    ]
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        for piece in pieces:
            await stream.send_all(piece)
        await stream.send_eof()
        while await stream.receive_some():
            pass
    # Reset in the middle of a line that carries the marker.
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(b"partial " + marker)
    await trio.sleep(0.05)
    reset_socket(stream.socket)


async def client_cli(port: int, marker: bytes, workdir: Path) -> tuple[bytes, bytes]:
    """``python -m ackservice.client`` at debug level sending marked lines; its stdout and
    stderr (where its logs go)."""
    lines = b"".join(b"%d %s\n" % (i, marker) for i in range(100))
    result = await trio.run_process(
        [
            sys.executable,
            "-m",
            "ackservice.client",
            *("--port", str(port), "--log-level", "debug", "--log-format", "json"),
        ],
        stdin=lines,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("recording", [True, False], ids=["hook", "no-hook"])
async def test_payloads_never_reach_the_logs(
    start_server: StartServer, report: Report, recording: bool, tmp_path: Path
) -> None:
    """The server runs at ``--log-level debug``. 10,000 messages carry a unique marker, and
    so do an oversized line, NUL and 0xFF bytes, invalid UTF-8, stray CRs, a message the
    application rejects (hook only), and a line cut by a reset. The client CLI, also at
    debug level, sends 100 marked lines. Neither log holds the marker in any form (as
    is, upper case, hex, base64), though they do hold the events for all of it."""
    marker = b"MARK" + uuid.uuid4().hex.encode()
    server = await start_server(
        recording=recording,
        log_level="debug",
        **({"reject_prefix": REJECT_PREFIX} if recording else {}),
    )
    history = History()
    payloads = [b"@m%d|%s message %d" % (i, marker, i) for i in range(MESSAGES)]
    with trio.fail_after(60):
        run = await pipelined_client(server.port, payloads, history)
        await malformed_input(server, marker)
        client_out, client_err = await client_cli(server.port, marker, tmp_path)
    assert run.acked == MESSAGES
    await server.assert_healthy()

    server_log = server.log_path.read_bytes()
    assert not leaks(server_log, marker)
    assert not leaks(client_err, marker)
    assert not leaks(client_out, marker)
    # The logs did see it all: debug events per message, warnings for the bad input.
    assert len(server.events_named("message_acked")) >= MESSAGES
    assert server.events_named("message_too_large")
    assert [e["reason"] for e in server.events_named("connection_closed")].count("reset") == 1
    assert b'"connected"' in client_err
    if recording:
        assert server.events_named("message_rejected")
        records = [r for r in server.records() if r.pid is not None]
        verdict = check(history, records)
        verdict.assert_valid()
        assert all(message_key(p, "", 0) in history.acks for p in payloads)
    report(
        messages=MESSAGES,
        server_log_bytes=len(server_log),
        server_log_events=len(server.events()),
        client_log_bytes=len(client_err),
        marker_found=0,
    )


def test_leak_detector_finds_every_form() -> None:
    """The detector itself: each form of the marker is found."""
    marker = b"MARKabc123"
    assert leaks(b"..." + marker, marker) == ["raw"]
    assert leaks(marker.hex().encode(), marker) == ["hex"]
    assert leaks(base64.b64encode(marker), marker) == ["base64+0"]
    assert leaks(base64.b64encode(b"x" + marker), marker) == ["base64+1"]
    assert leaks(base64.b64encode(b"xy" + marker + b"z"), marker) == ["base64+2"]
    assert leaks(b"unrelated", marker) == []
