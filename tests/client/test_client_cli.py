"""``python -m ackservice.client`` as a real process against the real server: arguments,
piped stdin, ``--json`` and ``--quiet``; usage errors through ``main()`` directly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zlib

import pytest
import trio
from client_fakes import RunClient, StartServer, client_env

from ackservice.client.cli import main
from ackservice.errors import Reject
from ackservice.server import MessageContext, Server
from support import wait_until


def lines(output: bytes) -> list[str]:
    return output.decode().splitlines()


async def interrupt(process: trio.Process) -> bytes:
    """Ctrl-C the client: it ends with exit code 130; what it wrote on stderr."""
    process.send_signal(signal.SIGINT)
    with trio.fail_after(10):
        assert await process.wait() == 130
    assert process.stderr is not None
    stderr = b""
    while chunk := await process.stderr.receive_some():
        stderr += chunk
    return stderr


async def test_arguments_are_sent_one_message_each(server: Server, run_client: RunClient) -> None:
    """Each argument is a message; one line per reply on stdout; exit 0."""
    run = await run_client("--port", str(server.port), "hello", "second message")
    assert run.returncode == 0, run.stderr
    first, second = lines(run.stdout)
    assert first.startswith("message 1: ACK 1 5 3610a686 (")
    assert second.startswith(f"message 2: ACK 2 14 {zlib.crc32(b'second message'):08x} (")
    assert run.stderr == b""


async def test_piped_lines_are_all_acknowledged(server: Server, run_client: RunClient) -> None:
    """100,000 piped lines: every one acknowledged, in order, and a summary on stderr."""
    count = 100_000
    stdin = b"".join(b"line %d\n" % i for i in range(1, count + 1))
    run = await run_client("--port", str(server.port), stdin=stdin)
    assert run.returncode == 0, run.stderr[-500:]
    output = lines(run.stdout)
    assert len(output) == count
    assert output[-1].startswith(f"message {count}: ACK {count} 11 ")
    (summary,) = lines(run.stderr)
    assert summary.startswith(f"sent {count}, acked {count}, rejected 0, unacked 0 in ")
    await wait_until(lambda: server.handler.stats.acked == count)  # counted at close


async def test_quiet_prints_only_the_summary(server: Server, run_client: RunClient) -> None:
    """``--quiet`` with nothing wrong: stdout empty, stderr just the summary."""
    run = await run_client("--port", str(server.port), "--quiet", stdin=b"a\r\nb\n\nc")
    assert run.returncode == 0
    assert run.stdout == b""
    assert lines(run.stderr)[0].startswith("sent 4, acked 4, rejected 0, unacked 0 in ")
    assert len(lines(run.stderr)) == 1


async def test_json_prints_one_object_per_reply(server: Server, run_client: RunClient) -> None:
    """``--json``: each stdout line is a JSON object describing one reply."""
    run = await run_client("--port", str(server.port), "--json", "hello", "")
    assert run.returncode == 0
    objects = [json.loads(line) for line in lines(run.stdout)]
    assert [(o["message"], o["status"], o["seq"], o["nbytes"], o["crc32"]) for o in objects] == [
        (1, "acked", 1, 5, "3610a686"),
        (2, "acked", 2, 0, "00000000"),
    ]
    assert all(o["rtt_ms"] >= 0 and o["attempts"] == 1 for o in objects)


async def test_refused_messages_are_reported_and_exit_1(
    start_server: StartServer, run_client: RunClient
) -> None:
    """``ERR <seq>`` replies are shown per message (code and detail); exit code 1."""

    async def refuse_secrets(payload: bytes, context: MessageContext) -> None:
        if payload.startswith(b"secret"):
            raise Reject("no secrets here")

    server = await start_server(on_message=refuse_secrets)
    run = await run_client("--port", str(server.port), stdin=b"ok\nsecret 1\nok too\n")
    assert run.returncode == 1
    output = lines(run.stdout)
    assert output[1] == "message 2: ERR 2 rejected no secrets here"
    assert lines(run.stderr)[-1].startswith("sent 3, acked 2, rejected 1, unacked 0 in ")


async def test_json_reports_refusals_too(start_server: StartServer, run_client: RunClient) -> None:
    """``--json`` describes a refusal with its code and detail."""

    async def refuse_all(payload: bytes, context: MessageContext) -> None:
        raise Reject("maintenance")

    server = await start_server(on_message=refuse_all)
    run = await run_client("--port", str(server.port), "--json", "x")
    assert run.returncode == 1
    (refusal,) = [json.loads(line) for line in lines(run.stdout)]
    assert (refusal["status"], refusal["code"], refusal["detail"]) == (
        "rejected",
        "rejected",
        "maintenance",
    )


async def test_line_over_the_limit_is_skipped_and_reported(
    server: Server, run_client: RunClient
) -> None:
    """A line longer than ``--max-message-bytes`` is not sent; the others are; exit 1."""
    stdin = b"fits\n" + b"y" * 11 + b"\nfits too\n"
    run = await run_client("--port", str(server.port), "--max-message-bytes", "10", stdin=stdin)
    assert run.returncode == 1
    output = lines(run.stdout)
    assert output[1] == "message 2: not sent: longer than --max-message-bytes (10 bytes)"
    assert output[2].startswith("message 3: ACK 2 8 ")
    assert "not sent 1 (too long)" in lines(run.stderr)[-1]


async def test_settings_come_from_the_environment(server: Server, run_client: RunClient) -> None:
    """Every setting has an ``ACKSERVICE_*`` variable; here the port."""
    run = await run_client("hi", env={"ACKSERVICE_CLIENT_PORT": str(server.port)})
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize(
    ("argv", "environ", "complaint"),
    [
        (["a\nb"], {}, "message 1 contains a newline"),
        (["--port", "0", "x"], {}, "argument --port: expected a port from 1 to 65535"),
        (
            ["--window", "0", "x"],
            {},
            "argument --window: expected an integer from 1 to 65536, got '0'",
        ),
        (["--ack-timeout", "-1", "x"], {}, "argument --ack-timeout: expected a positive"),
        (
            ["x"],
            {"ACKSERVICE_CLIENT_RETRIES": "many"},
            "ACKSERVICE_CLIENT_RETRIES: expected an integer",
        ),
        (["--log-level", "loud", "x"], {}, "argument --log-level: expected one of"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str], complaint: str
) -> None:
    """A bad argument or setting: exit 2 and one line on stderr, before any connection."""
    with pytest.raises(SystemExit) as exit_:
        main(argv, environ=environ)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("python -m ackservice.client: error: ")
    assert complaint in line


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--port", "-1"], "argument --port: expected a port from 1 to 65535, got '-1'"),
        (
            ["--retry-for", "-1"],
            "argument --retry-for: expected a number of seconds from 0 to 1000000000, got '-1'",
        ),
    ],
)
async def test_a_refused_value_is_told_the_range_allowed(
    run_client: RunClient, args: list[str], complaint: str
) -> None:
    """The complaint names what is accepted: -1 for --port was told "from 0 to 65535" (0 is
    refused next), -1 for --retry-for "a positive number" (0, never retry, is allowed)."""
    run = await run_client(*args, "x")
    assert run.returncode == 2
    assert run.stderr.decode().splitlines() == [
        f"python -m ackservice.client: error: {complaint} (see --help)"
    ]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
async def test_output_that_cannot_be_written_is_not_blamed_on_the_input(server: Server) -> None:
    """Replies that cannot be written (a full disk: /dev/full) are one line naming the
    output, exit 1; they were reported as "cannot read standard input"."""
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        with trio.fail_after(30):
            run = await trio.run_process(
                [sys.executable, "-m", "ackservice.client", "--port", str(server.port), "hello"],
                stdout=full,
                capture_stderr=True,
                check=False,
                env=client_env(),
            )
    finally:
        os.close(full)
    assert run.returncode == 1
    assert run.stderr.decode().splitlines() == [
        "python -m ackservice.client: error: cannot write the output: No space left on device; "
        "check where standard output goes"
    ]


async def test_ctrl_c_stops_piped_input_with_a_summary(server: Server) -> None:
    """Interrupted while waiting for more input: the summary so far, exit 130, no hang on
    the thread still blocked reading stdin."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "ackservice.client", "--port", str(server.port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=client_env(),
    )
    try:
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        await process.stdin.send_all(b"one\ntwo\n")
        stdout = b""
        with trio.fail_after(10):
            while stdout.count(b"\n") < 2:  # the replies are shown while input is awaited
                stdout += await process.stdout.receive_some()
        stderr = await interrupt(process)
    finally:
        process.kill()
        await process.wait()
    assert lines(stderr)[-1].startswith(
        "interrupted: sent 2, acked 2, rejected 0, unacked 0, input not read after line 2 in "
    )


async def test_ctrl_c_with_replies_still_buffered_for_a_full_disk_is_one_line(
    server: Server,
) -> None:
    """Interrupted with replies still in its output buffer, and that output a full disk: the
    write fails at the last flush, and that is the run's one line (the summary follows),
    exit 130. The summary's flush raised it as a traceback, then Python's "Exception ignored"
    at exit."""
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "ackservice.client", "--port", str(server.port)],
            stdin=subprocess.PIPE,
            stdout=full,
            stderr=subprocess.PIPE,
            env=client_env(),
        )
    finally:
        os.close(full)
    try:
        assert process.stdin is not None
        assert process.stderr is not None
        await process.stdin.send_all(b"one\n")
        await wait_until(lambda: sum(c.acked for c in server.handler._connections) == 1)
        await trio.sleep(0.2)  # the client has the reply (and its ticker a failed flush)
        stderr = await interrupt(process)
    finally:
        process.kill()
        await process.wait()
    assert lines(stderr)[0] == (
        "python -m ackservice.client: error: cannot write the output: No space left on "
        "device; check where standard output goes"
    )
    assert lines(stderr)[-1].startswith("interrupted: sent 1, acked ")
    assert b"Traceback" not in stderr
    assert b"Exception ignored" not in stderr


def test_server_settings_in_the_environment_do_not_reach_the_client() -> None:
    """A shell that exports the server's settings (``ACKSERVICE_*``) does not change the
    client, whose settings are ``ACKSERVICE_CLIENT_*``; its own variables still apply."""
    from ackservice.client.cli import build_parser

    server_env = {
        "ACKSERVICE_LOG_LEVEL": "debug",
        "ACKSERVICE_MAX_MESSAGE_BYTES": "10",
        "ACKSERVICE_PORT": "1",
    }
    args = build_parser(server_env).parse_args([])
    assert (args.max_message_bytes, args.log_level) == (65536, None)  # None: the default
    assert args.port is None  # the default, 9876, applies
    own = build_parser({"ACKSERVICE_CLIENT_MAX_MESSAGE_BYTES": "10"}).parse_args([])
    assert own.max_message_bytes == 10
