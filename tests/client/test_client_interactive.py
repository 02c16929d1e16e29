"""The client on a terminal, driven through a real pseudo-terminal with pexpect: the prompt,
round-trip times, leaving with Ctrl-D or Ctrl-C, and the live progress line."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pexpect
import trio
from client_fakes import StartServer, client_env

from ackservice.errors import Reject
from ackservice.server import MessageContext, Server
from support import wait_until

# pexpect waits at most this long for each expected output (a hung client fails fast).
EXPECT_TIMEOUT = 15


def spawn_client(*args: str) -> pexpect.spawn:
    return pexpect.spawn(
        sys.executable,
        ["-m", "ackservice.client", *args],
        env=client_env(),
        encoding="utf-8",
        timeout=EXPECT_TIMEOUT,
    )


def finish(child: pexpect.spawn) -> int:
    """Wait for the client to exit; its exit status (never a traceback on the way)."""
    child.expect(pexpect.EOF)
    child.close()
    assert "Traceback" not in (child.before or "")
    assert child.exitstatus is not None
    return child.exitstatus


async def test_each_line_typed_is_sent_and_acknowledged(server: Server) -> None:
    """A prompt; each line is acknowledged with its round-trip time; Ctrl-D leaves, exit 0."""

    def session() -> int:
        child = spawn_client("--port", str(server.port))
        child.expect(f"connected to 127.0.0.1:{server.port}")
        child.expect("> ")
        child.sendline("hello")
        child.expect(r"message 1: ACK 1 5 3610a686 \(\d+\.\d\d ms\)")
        child.expect("> ")
        child.sendline("")
        child.expect(r"message 2: ACK 2 0 00000000 ")
        child.expect("> ")
        child.sendeof()
        return finish(child)

    assert await trio.to_thread.run_sync(session) == 0
    await wait_until(lambda: server.handler.stats.acked == 2)  # counted at close


async def test_ctrl_c_at_the_prompt_leaves_cleanly(server: Server) -> None:
    """Ctrl-C ends the session like Ctrl-D: no traceback, exit code from what was sent."""

    def session() -> int:
        child = spawn_client("--port", str(server.port))
        child.expect("> ")
        child.sendline("one")
        child.expect("message 1: ACK 1 3 ")
        child.expect("> ")
        child.sendintr()
        return finish(child)

    assert await trio.to_thread.run_sync(session) == 0


async def test_a_refused_line_is_shown_and_sets_exit_code_1(start_server: StartServer) -> None:
    """A refusal is shown with the server's reason; the session goes on; exit code 1."""

    async def no_shouting(payload: bytes, context: MessageContext) -> None:
        if payload.isupper():
            raise Reject("please do not shout")

    server = await start_server(on_message=no_shouting)

    def session() -> int:
        child = spawn_client("--port", str(server.port))
        child.expect("> ")
        child.sendline("HEY")
        child.expect("message 1: ERR 1 rejected please do not shout")
        child.expect("> ")
        child.sendline("hey")
        child.expect("message 2: ACK 2 3 ")
        child.expect("> ")
        child.sendeof()
        return finish(child)

    assert await trio.to_thread.run_sync(session) == 1


async def test_piped_input_shows_live_progress_on_a_terminal(
    server: Server, tmp_path: Path
) -> None:
    """stdin from a file, stderr on a terminal: a progress line redrawn in place, then the
    summary."""
    lines = tmp_path / "lines.txt"
    lines.write_bytes(b"".join(b"%d\n" % i for i in range(5000)))
    command = shlex.join(
        [sys.executable, "-m", "ackservice.client", "-q", "--port", str(server.port)]
    )

    def run() -> str:
        child = pexpect.spawn(
            "bash",
            ["-c", f"exec {command} < {shlex.quote(str(lines))}"],
            env=client_env(),
            encoding="utf-8",
            timeout=EXPECT_TIMEOUT,
        )
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        return child.before or ""

    output = await trio.to_thread.run_sync(run)
    assert "\r\x1b[Ksent " in output
    assert "in flight" in output
    assert "sent 5000, acked 5000, rejected 0, unacked 0 in " in output
