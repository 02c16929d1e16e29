"""``python -m ackservice.store``: export, stats and prune, called as ``main`` and as a process."""

from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import IO, Any

import nats
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from ackservice.protocol import MessageFramer, message_line
from ackservice.store import cli
from ackservice.store.base import Message, StoredMessage
from ackservice.store.cli import build_parser, duration, main
from ackservice.store.jetstream_connection import AsyncioThread
from ackservice.store.sqlite import SQLiteStore
from nats_support import NatsServer, create_stream, publish_many
from support import poll_until, run_with_stderr_closed, unread_pipe_is_filling

PAYLOADS = [b"plain", b"", b"ends in cr\r", b"\r", b"\xff\xfe not utf-8", "caf\u00e9".encode()]


def make_store(path: Path, payloads: list[bytes], *, received_at: float | None = None) -> str:
    """A SQLite store at ``path`` holding ``payloads`` (the first with an identity); its URL."""

    async def fill() -> None:
        store = await SQLiteStore.open(path)
        try:
            # One commit each: each message is a chunk of its own, so a prune by id counts
            # exactly the messages below it.
            for n, payload in enumerate(payloads, 1):
                message = Message(
                    payload=payload,
                    crc32=zlib.crc32(payload),
                    received_at=time.time() if received_at is None else received_at,
                    peer="[::1]:5000",
                    conn_id=3,
                    seq=n,
                    identity="CN=alice" if n == 1 else None,
                )
                await store.store([message])
        finally:
            await store.aclose()

    trio.run(fill)
    return f"sqlite:{path}"


def frames(data: bytes) -> list[bytes]:
    """The messages a server's framer finds in ``data``."""
    framer = MessageFramer()
    found = framer.feed(data) + framer.end_of_stream()
    assert all(isinstance(frame, bytes) for frame in found)
    return [frame for frame in found if isinstance(frame, bytes)]


def run_main(argv: list[str], capsysbinary: pytest.CaptureFixture[bytes]) -> tuple[int, bytes, str]:
    """Run ``main`` (argparse errors included); return the exit code, stdout and stderr."""
    try:
        code = main(argv, environ={})
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsysbinary.readouterr()
    return code, captured.out, captured.err.decode()


@given(st.lists(st.binary().filter(lambda payload: b"\n" not in payload)))
def test_protocol_lines_frame_back_to_the_same_payloads(payloads: list[bytes]) -> None:
    """Any payloads written with ``message_line`` (what export writes) come out of the
    server's framer unchanged, trailing carriage returns and empty payloads included."""
    assert frames(b"".join(message_line(payload) for payload in payloads)) == payloads


def test_export_lines_round_trips_payloads(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """``export`` writes each payload as one protocol message: framing its output gives back
    exactly the stored payloads, in id order."""
    url = make_store(tmp_path / "store.db", PAYLOADS)
    code, out, err = run_main(["export", "--store", url], capsysbinary)
    assert (code, err) == (0, "")
    assert frames(out) == PAYLOADS


def test_export_json_fields(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """JSON lines carry the metadata, the CRC as 8 hex digits, an RFC 3339 UTC time with
    microseconds, the identity only when there is one, and the payload as text when it is
    UTF-8, else base64."""
    url = make_store(tmp_path / "store.db", PAYLOADS, received_at=1_700_000_000.25)
    code, out, _ = run_main(["export", "--store", url, "--format", "json"], capsysbinary)
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert records[0] == {
        "id": 1,
        "received_at": "2023-11-14T22:13:20.250000Z",
        "peer": "[::1]:5000",
        "conn_id": 3,
        "seq": 1,
        "nbytes": 5,
        "crc32": f"{zlib.crc32(b'plain'):08x}",
        "identity": "CN=alice",
        "payload": "plain",
    }
    assert "identity" not in records[1]
    assert records[1]["payload"] == ""
    binary = records[4]
    assert "payload" not in binary
    assert base64.b64decode(binary["payload_b64"]) == PAYLOADS[4]
    assert records[5]["payload"] == "caf\u00e9"
    assert all(re.fullmatch(r"[0-9a-f]{8}", record["crc32"]) for record in records)


def test_export_after_an_id(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """``--after ID`` starts with the message after ID."""
    url = make_store(tmp_path / "store.db", PAYLOADS)
    code, out, _ = run_main(["export", "--store", url, "--after", "4"], capsysbinary)
    assert code == 0
    assert frames(out) == PAYLOADS[4:]


def test_store_from_the_environment(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """Without ``--store``, ``ACKSERVICE_STORE`` names the store."""
    url = make_store(tmp_path / "store.db", [b"from env"])
    assert main(["export"], environ={"ACKSERVICE_STORE": url}) == 0
    assert capsysbinary.readouterr().out == b"from env\n"


def test_stats_text_and_json(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """``stats`` shows the count, bytes and first and last message; ``--json`` the same as
    one object."""
    path = tmp_path / "store.db"
    url = make_store(path, PAYLOADS, received_at=1_700_000_000.0)
    code, out, _ = run_main(["stats", "--store", url], capsysbinary)
    assert code == 0
    text = out.decode()
    assert f"store:    sqlite:{path}\n" in text
    assert "messages: 6\n" in text
    assert f"bytes:    {sum(map(len, PAYLOADS))}\n" in text
    assert "first:    id 1, 2023-11-14T22:13:20.000000Z\n" in text
    assert "last:     id 6, 2023-11-14T22:13:20.000000Z\n" in text

    code, out, _ = run_main(["stats", "--store", url, "--json"], capsysbinary)
    assert json.loads(out) == {
        "store": f"sqlite:{path}",
        "count": 6,
        "bytes": sum(map(len, PAYLOADS)),
        "first_id": 1,
        "last_id": 6,
        "first_received_at": "2023-11-14T22:13:20.000000Z",
        "last_received_at": "2023-11-14T22:13:20.000000Z",
    }


def test_stats_of_an_empty_store(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """An empty store has no first or last message (null in JSON)."""
    url = make_store(tmp_path / "store.db", [])
    code, out, _ = run_main(["stats", "--store", url, "--json"], capsysbinary)
    record = json.loads(out)
    assert (code, record["count"], record["first_id"], record["last_received_at"]) == (
        0,
        0,
        None,
        None,
    )


def test_prune_before_and_older_than(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """``prune --before`` deletes below an id, ``--older-than`` by age; each prints how many
    it deleted."""
    url = make_store(tmp_path / "store.db", PAYLOADS, received_at=time.time() - 7200)
    assert run_main(["prune", "--store", url, "--before", "3"], capsysbinary) == (
        0,
        b"deleted 2 messages\n",
        "",
    )
    assert run_main(["prune", "--store", url, "--older-than", "3h"], capsysbinary) == (
        0,
        b"deleted 0 messages\n",
        "",
    )
    assert run_main(["prune", "--store", url, "--older-than", "1h"], capsysbinary) == (
        0,
        b"deleted 4 messages\n",
        "",
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("45s", 45), ("2.5", 2.5), ("1H", 3600)],
)
def test_duration_units(text: str, seconds: float) -> None:
    """Durations take a d, h, m or s suffix, or none for seconds."""
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "3x", "0", "-5m", "inf", "nan", "1 day"])
def test_bad_durations(text: str) -> None:
    """Anything but a positive, finite number with an optional unit is refused."""
    with pytest.raises(ValueError, match="duration"):
        duration(text)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["export", "--store", "postgres://x"], "unknown store 'postgres://x'"),
        (["export", "--store", "none"], "keeps nothing"),
        (["prune", "--store", "sqlite:x.db", "--older-than", "soon"], "--older-than"),
        (["prune", "--store", "sqlite:x.db"], "one of the arguments --before --older-than"),
        (["prune", "--before", "1", "--older-than", "1d"], "not allowed with"),
        (["export", "--after", "-1"], "--after"),
        (["export", "--format", "xml"], "invalid choice"),
        ([], "COMMAND"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    argv: list[str], fragment: str, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """Bad input ends with one line on stderr, naming the problem, and exit code 2."""
    code, out, err = run_main(argv, capsysbinary)
    assert code == 2
    assert out == b""
    assert err.count("\n") == 1
    assert err.startswith("python -m ackservice.store")
    assert ": error: " in err
    assert fragment in err


def test_help_text_is_uniform() -> None:
    """Every option of every command has at most one parenthesis in its help, the
    default/env note, as the server's and the client's do; a setting with a range gives it
    first, in the same words (``range: ...; default: ...; env: ...``)."""
    parser = build_parser({})
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == {"export", "stats", "prune"}
    for command in commands.choices.values():
        for action in command._actions:
            if not action.option_strings or action.help in (None, argparse.SUPPRESS):
                continue
            text = str(action.help)
            assert text.count("(") <= 1, text
            if "at most" in text:
                assert "(range: above 0, at most " in text, text


def test_prune_help_says_a_straddling_commit_is_kept(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """``prune --before 3`` deletes fewer than the two messages below 3 when they were stored
    in one commit with message 3; its help says so, as docs/store.md does, rather than
    promising to delete "the messages with an id below ID"."""

    async def fill() -> None:
        store = await SQLiteStore.open(tmp_path / "store.db")
        try:
            batch = [
                Message(
                    payload=b"m",
                    crc32=zlib.crc32(b"m"),
                    received_at=time.time(),
                    peer="[::1]:5000",
                    conn_id=1,
                    seq=n,
                )
                for n in (1, 2, 3)
            ]
            await store.store(batch)
        finally:
            await store.aclose()

    trio.run(fill)
    url = f"sqlite:{tmp_path / 'store.db'}"
    code, out, _ = run_main(["prune", "--store", url, "--before", "3"], capsysbinary)
    assert (code, out) == (0, b"deleted 0 messages\n")
    code, out, _ = run_main(["prune", "--help"], capsysbinary)
    assert code == 0
    assert b"keeps one that straddles the limit" in b" ".join(out.split())


def test_missing_store_is_one_line_and_exit_1(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """A store that does not exist is a store failure (exit 1), reported in one line naming
    the path, and no empty file is left behind."""
    path = tmp_path / "missing.db"
    for command in (["export"], ["stats"], ["prune", "--before", "5"]):
        code, out, err = run_main([*command, "--store", f"sqlite:{path}"], capsysbinary)
        assert (code, out) == (1, b"")
        assert err == f"python -m ackservice.store: error: no store at {path}; " + (
            "check --store (the server creates it on start)\n"
        )
    assert not path.exists()


def test_an_empty_file_is_no_store_yet(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """An empty file (``touch``ed, or a server's just being created) is no store yet, as a
    server starting on it would make it one: it was "a SQLite database but not an ackservice
    store; choose another path"."""
    path = tmp_path / "empty.db"
    path.touch()
    for command in (["export"], ["stats"], ["prune", "--before", "5"]):
        code, out, err = run_main([*command, "--store", f"sqlite:{path}"], capsysbinary)
        assert (code, out) == (1, b"")
        assert err == (
            f"python -m ackservice.store: error: no store at {path}, an empty file; "
            "check --store (the server creates it on start)\n"
        )
    assert path.stat().st_size == 0


def test_a_directory_as_store_is_named_as_one(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """``--store sqlite:DIR`` says the path is a directory and what to give instead, as the
    server does, not SQLite's "unable to open database file; check that the path is a file
    you may write"."""
    for command in (["export"], ["stats"], ["prune", "--before", "5"]):
        code, out, err = run_main([*command, "--store", f"sqlite:{tmp_path}"], capsysbinary)
        assert (code, out) == (1, b"")
        assert err == (
            f"python -m ackservice.store: error: {tmp_path} is a directory; sqlite:PATH names "
            f"the database file, e.g. sqlite:{tmp_path / 'ackservice.db'}\n"
        )


def test_a_bad_store_url_suggests_only_stores_that_keep_messages(
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    """The reader's unknown-store message does not suggest ``none``, which it then refuses
    ("the store 'none' keeps nothing")."""
    code, out, err = run_main(["stats", "--store", "/tmp/x.db"], capsysbinary)
    assert (code, out) == (2, b"")
    assert "use sqlite:PATH or nats://HOST:PORT/STREAM (see --help)" in err
    assert "none" not in err


@pytest.mark.parametrize(
    ("store", "code", "line"),
    [
        (
            "sqlite:{missing}",
            1,
            "python -m ackservice.store: error: no store at {missing}; check "
            "ACKSERVICE_STORE (the server creates it on start)",
        ),
        (
            "bogus",
            2,
            "python -m ackservice.store stats: error: environment variable ACKSERVICE_STORE: "
            "unknown store 'bogus'; use sqlite:PATH or nats://HOST:PORT/STREAM (see --help)",
        ),
    ],
    ids=["missing-file", "bad-url"],
)
def test_a_store_from_the_environment_is_named_by_its_variable(
    tmp_path: Path, store: str, code: int, line: str
) -> None:
    """A store named by ``ACKSERVICE_STORE`` that cannot be used is called by that variable
    in the error, not by ``--store``, which is on no command line the reader could check."""
    values = {"missing": str(tmp_path / "missing.db")}
    env = {**os.environ, "ACKSERVICE_STORE": store.format(**values)}
    result = subprocess.run(
        _module("stats"), capture_output=True, text=True, timeout=30, check=False, env=env
    )
    assert result.returncode == code, result.stderr
    assert result.stderr == line.format(**values) + "\n"


@pytest.mark.parametrize(
    "command",
    [["export", "--after", str(2**63)], ["prune", "--before", "99999999999999999999"]],
)
def test_an_id_past_64_bits_is_a_usage_error(tmp_path: Path, command: list[str]) -> None:
    """An id no store can hold is refused as bad input (exit 2, one line), not handed to
    SQLite, which raised OverflowError: a traceback, exit 1."""
    url = make_store(tmp_path / "store.db", [b"kept"])
    result = subprocess.run(
        _module(*command, "--store", url), capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "expected an integer from" in result.stderr
    assert "9223372036854775807" in result.stderr


def test_a_payload_with_a_newline_is_refused_in_lines_format(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """A payload that cannot be one protocol line (only an embedder could store one) stops
    a lines export with exit 1 and a pointer to the JSON format."""
    url = make_store(tmp_path / "store.db", [b"fine", b"two\nlines"])
    code, out, err = run_main(["export", "--store", url], capsysbinary)
    assert (code, out) == (1, b"fine\n")
    assert "message 2 contains a newline" in err
    assert "--format json" in err


def _module(*args: str) -> list[str]:
    return [sys.executable, "-m", "ackservice.store", *args]


def test_export_through_a_real_process(tmp_path: Path) -> None:
    """``python -m ackservice.store export`` writes the same bytes a client would send, and
    the version flag answers."""
    url = make_store(tmp_path / "store.db", PAYLOADS)
    result = subprocess.run(_module("export", "--store", url), capture_output=True, check=False)
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout == b"".join(message_line(payload) for payload in PAYLOADS)
    version = subprocess.run(_module("--version"), capture_output=True, text=True, check=False)
    assert version.stdout.startswith("python -m ackservice.store 0.")


def test_closed_stdout_ends_quietly_with_141(tmp_path: Path) -> None:
    """When the reader of stdout stops early (``export | head``), export ends with exit
    code 141 (as for a tool killed by SIGPIPE) and prints nothing on stderr."""
    url = make_store(tmp_path / "store.db", [b"x" * 1000] * 2000)
    with subprocess.Popen(
        _module("export", "--store", url), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdout.read(10)
        process.stdout.close()
        stderr = process.stderr.read()
        assert process.wait(timeout=30) == 141
    assert stderr == b""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("command", [["stats"], ["export"], ["export", "--follow"]])
def test_output_that_cannot_be_written_is_one_line_and_exit_1(
    tmp_path: Path, command: list[str]
) -> None:
    """A standard output that cannot be written (a full disk: /dev/full) ends the command
    with one line naming it and exit 1, as a store failure does; it was an OSError traceback
    (and --follow's flush task's, an exception group)."""
    url = make_store(tmp_path / "store.db", [b"kept"])
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            _module(*command, "--store", url),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        "python -m ackservice.store: error: cannot write standard output: "
        "No space left on device; check where it goes"
    ]


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"]
)
def test_follow_ends_on_ctrl_c_with_130_and_on_sigterm_with_143(
    tmp_path: Path, signum: int, code: int
) -> None:
    """``export --follow`` writes messages stored after it started; Ctrl-C ends it with exit
    code 130, and SIGTERM (systemd stopping a unit, ``timeout``) the same way with 143: what
    was read written out whole, no traceback. SIGTERM killed the process, losing what was
    buffered and possibly ending the output inside a line."""
    path = tmp_path / "store.db"
    url = make_store(path, [b"first"])
    with subprocess.Popen(
        _module("export", "--store", url, "--follow"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None
        try:
            assert process.stdout.readline() == b"first\n"
            make_store(path, [b"second"])
            assert process.stdout.readline() == b"second\n"
            os.kill(process.pid, signum)
            rest, stderr = process.communicate(timeout=30)
        finally:
            if process.returncode is None:
                process.kill()
    assert process.returncode == code
    assert (rest, stderr) == (b"", b"")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_second_signal_ends_an_export_whose_output_nobody_reads(
    tmp_path: Path, signum: int
) -> None:
    """An export into a pipe nobody reads blocks in a write: the first signal cannot end it
    cleanly (the event loop is stuck in that write), a second ends it at once, by the
    signal, after one line saying what that means for the output. Neither did anything
    before (only SIGKILL ended it)."""
    url = make_store(tmp_path / "store.db", [b"x" * 1000] * 200)
    with subprocess.Popen(
        _module("export", "--store", url), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        assert process.stdout is not None
        try:
            poll_until(lambda: unread_pipe_is_filling(process.stdout.fileno()), 15, "the pipe")
            time.sleep(0.5)  # writing on: blocked now
            process.send_signal(signum)
            time.sleep(0.2)
            process.send_signal(signum)
            assert process.wait(timeout=20) == -signum
        finally:
            if process.returncode is None:
                process.kill()
        assert process.stderr is not None
        assert process.stderr.read().decode().splitlines() == [
            "python -m ackservice.store: error: stopped at once by a signal; "
            "the output may end in the middle of a message"
        ]


# The store CLI with its periodic flush of --follow put off, so that what the export read is
# still in its buffer when the signal comes.
_NO_PERIODIC_FLUSH = (
    "import sys, ackservice.store.cli as cli; cli.FOLLOW_FLUSH_INTERVAL = 3600; "
    "sys.exit(cli.main(sys.argv[1:]))"
)


@pytest.mark.parametrize("output", ["file", "/dev/full"])
def test_what_an_interrupted_export_buffered_is_written_out_or_one_line(
    tmp_path: Path, output: str
) -> None:
    """SIGTERM while ``export --follow`` holds messages in its output buffer: they are
    written out whole (a file), or the full disk is one line (``/dev/full``); exit code 143
    either way. The interpreter's last flush met the full disk: "Exception ignored" and exit
    code 120."""
    path = tmp_path / "store.db"
    url = make_store(path, [b"first"])
    out_path = tmp_path / "out" if output == "file" else Path(output)
    with out_path.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", _NO_PERIODIC_FLUSH, "export", "--store", url, "--follow"],
            stdout=out,
            stderr=subprocess.PIPE,
        )
    try:
        # The reader has the store open (then its first page comes at once).
        fds = Path(f"/proc/{process.pid}/fd")
        poll_until(lambda: any(f.resolve() == path for f in fds.iterdir()), 15, "the open store")
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.returncode is None:
            process.kill()
            process.wait()
    assert process.returncode == 143
    if output == "file":
        assert (out_path.read_bytes(), stderr) == (b"first\n", b"")
    else:
        assert stderr.decode() == (
            "python -m ackservice.store: error: cannot write standard output: "
            "No space left on device; check where it goes\n"
        )


@pytest.mark.parametrize("how", ["flag", "env"])
def test_the_wait_for_nats_is_a_setting(how: str) -> None:
    """--timeout (or its variable) bounds the wait for a NATS server that never answers: a
    listener on loopback that accepts and stays silent. One line, exit 1, well before the
    default 5 s."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"nats://127.0.0.1:{silent.getsockname()[1]}/ACKS"
        argv, env = ["stats", "--store", url], dict(os.environ)
        if how == "flag":
            argv += ["--timeout", "0.5"]
        else:
            env["ACKSERVICE_STORE_CLI_TIMEOUT"] = "0.5"
        started = time.monotonic()
        result = subprocess.run(
            _module(*argv), capture_output=True, text=True, timeout=30, check=False, env=env
        )
        waited = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "cannot reach NATS" in result.stderr
    assert waited < 4.5  # bounded by the setting, not by the default's 5 s


def test_a_bad_nats_wait_from_the_environment_is_a_usage_error() -> None:
    env = {**os.environ, "ACKSERVICE_STORE_CLI_TIMEOUT": "soon"}
    result = subprocess.run(
        _module("stats", "--store", "sqlite:x.db"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "error: environment variable ACKSERVICE_STORE_CLI_TIMEOUT: expected" in result.stderr


class _EmptyReader:
    async def messages(
        self, *, after: int = 0, follow: bool = False
    ) -> AsyncIterator[StoredMessage]:
        return
        yield


@pytest.mark.parametrize(
    ("flag", "environ", "asked"),
    [
        ([], {}, 16 * 1024 * 1024),
        (["--max-pull-bytes", "1000"], {}, 1000),
        ([], {"ACKSERVICE_STORE_CLI_MAX_PULL_BYTES": "2000"}, 2000),
        (["--max-pull-bytes", "1000"], {"ACKSERVICE_STORE_CLI_MAX_PULL_BYTES": "2000"}, 1000),
    ],
)
def test_the_bytes_an_export_pulls_at_once_is_a_setting(
    monkeypatch: pytest.MonkeyPatch, flag: list[str], environ: dict[str, str], asked: int
) -> None:
    """``export --max-pull-bytes`` (or ``ACKSERVICE_STORE_CLI_MAX_PULL_BYTES``; the flag wins)
    is what the reader asks NATS for at once, 16 MiB if neither is given."""
    opened: list[Any] = []

    @asynccontextmanager
    async def open_reader(url: str, **settings: Any) -> AsyncIterator[_EmptyReader]:
        opened.append(settings["max_pull_bytes"])
        yield _EmptyReader()

    monkeypatch.setattr(cli, "open_reader", open_reader)
    argv = ["export", "--store", "nats://127.0.0.1:4222/ACKS", *flag]
    assert main(argv, environ=environ) == 0
    assert opened == [asked]


@pytest.mark.parametrize(
    ("flag", "environ", "named"),
    [
        (["--max-pull-bytes", "0"], {}, "--max-pull-bytes"),
        (["--max-pull-bytes", "16MiB"], {}, "--max-pull-bytes"),
        (
            [],
            {"ACKSERVICE_STORE_CLI_MAX_PULL_BYTES": "lots"},
            "ACKSERVICE_STORE_CLI_MAX_PULL_BYTES",
        ),
    ],
)
def test_a_bad_max_pull_bytes_is_a_usage_error(
    capsysbinary: pytest.CaptureFixture[bytes],
    flag: list[str],
    environ: dict[str, str],
    named: str,
) -> None:
    """0, a unit or a word, from the flag or the variable: one line naming which, exit 2."""
    argv = ["export", "--store", "nats://127.0.0.1:4222/ACKS", *flag]
    with pytest.raises(SystemExit) as exit_:
        main(argv, environ=environ)
    assert exit_.value.code == 2
    err = capsysbinary.readouterr().err.decode()
    assert err.count("\n") == 1, err
    assert named in err


@pytest.fixture
def nats_stream(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server on loopback with an empty stream ACKS (subject ``ackservice.ACKS``),
    stopped by PID at the end."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        config = {"name": "ACKS", "subjects": ["ackservice.ACKS"], "storage": "file"}
        create_stream(server.url, config)
        yield server
    finally:
        server.stop()


class _Lines:
    """The lines a pipe delivers, each within a deadline (a thread reads them)."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe: IO[bytes]) -> None:
        for line in pipe:
            self._lines.put(line)
        self._lines.put(b"")  # end of file

    def next(self, timeout: float = 10.0) -> bytes:
        return self._lines.get(timeout=timeout)

    def rest(self) -> list[bytes]:
        """What came after, once the process ended (its pipe then closes)."""
        lines = []
        while line := self.next():
            lines.append(line)
        return lines


@contextmanager
def _exporting(argv: list[str]) -> Iterator[tuple[subprocess.Popen[bytes], _Lines, _Lines]]:
    """The store CLI running ``argv``, its output and errors read line by line as they come;
    killed at the end if it is still running."""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        try:
            yield process, _Lines(process.stdout), _Lines(process.stderr)
        finally:
            if process.returncode is None:
                process.kill()


def _ctrl_c_ends_quietly(process: subprocess.Popen[bytes], out: _Lines, err: _Lines) -> None:
    """Ctrl-C (SIGINT) ends a following export with 130, and nothing more on either pipe."""
    os.kill(process.pid, signal.SIGINT)
    assert process.wait(timeout=10) == 130
    assert out.rest() == []
    assert err.rest() == []


def test_nats_going_away_during_export_is_one_line_and_exit_1(nats_stream: NatsServer) -> None:
    """nats-server killed in the middle of an export (without --follow): what was read is
    written, then one line on stderr and exit 1, within the --timeout (0.5 s) and the
    closing after it. The export used to go on pulling forever, and wrote the reader's
    log lines (store_disconnected) into its output."""
    # Many pulls (PULL_BATCH = 500 each): the export is still pulling when the server goes,
    # however far a loaded machine lets it get first (a thread reads its output at once).
    payloads = [b"%04d " % number + b"x" * 195 for number in range(1, 5001)]
    publish_many(nats_stream.url, "ackservice.ACKS", payloads)
    argv = _module("export", "--store", f"{nats_stream.url}/ACKS", "--timeout", "0.5")
    with _exporting(argv) as (process, out, err):
        first = out.next()
        nats_stream.kill()
        started = time.monotonic()
        written = [first, *out.rest()]
        process.wait(timeout=10)
        waited = time.monotonic() - started
        stderr = err.rest()
    assert process.returncode == 1, stderr
    # What it wrote is what it read: the stream's first messages, in order, none missing.
    assert 1 <= len(written) < len(payloads)
    assert written == [message_line(payload) for payload in payloads[: len(written)]]
    assert len(stderr) == 1, stderr
    assert stderr[0].startswith(b"python -m ackservice.store: error: lost the connection to NATS")
    assert waited < 4


def test_follow_rides_out_a_nats_restart(nats_stream: NatsServer) -> None:
    """``export --follow`` with nats-server killed: one line on stderr says it waits (once,
    although its pulls fail for seconds), nothing is added to the output; once NATS is back
    it writes what is stored afterwards, and Ctrl-C still ends it with 130. It used to
    follow nothing forever, writing the reader's log lines into its output."""
    publish_many(nats_stream.url, "ackservice.ACKS", [b"first"])
    argv = _module("export", "--store", f"{nats_stream.url}/ACKS", "--follow", "--timeout", "0.5")
    with _exporting(argv) as (process, out, err):
        assert out.next() == b"first\n"
        nats_stream.kill()
        notice = err.next()
        time.sleep(2)  # several pulls' worth of outage
        nats_stream.start()
        publish_many(nats_stream.url, "ackservice.ACKS", [b"second"])
        assert out.next() == b"second\n"
        _ctrl_c_ends_quietly(process, out, err)
    assert notice.startswith(b"python -m ackservice.store: warning: lost the connection to NATS")
    assert b"after id 1" in notice


def test_follow_started_before_nats_waits_for_it(tmp_path: Path) -> None:
    """``export --follow`` started while NATS is down (a service started beside it, or
    before it): one line says it waits, and once NATS is up it writes the stream, then what
    is stored afterwards. It exited 1 ("cannot reach NATS") after --timeout, although it
    waits out every later outage."""
    nats_server = NatsServer(tmp_path / "nats")
    nats_server.start()  # the stream first, kept in the server's store directory
    create_stream(nats_server.url, {"name": "ACKS", "subjects": ["ackservice.ACKS"]})
    publish_many(nats_server.url, "ackservice.ACKS", [b"first"])
    nats_server.stop()
    argv = _module("export", "--store", f"{nats_server.url}/ACKS", "--follow", "--timeout", "0.5")
    try:
        with _exporting(argv) as (process, out, err):
            notice = err.next()
            time.sleep(1)  # past the --timeout: waiting, not ended
            assert process.poll() is None
            nats_server.start()
            assert out.next(timeout=20) == b"first\n"
            publish_many(nats_server.url, "ackservice.ACKS", [b"second"])
            assert out.next() == b"second\n"
            _ctrl_c_ends_quietly(process, out, err)
    finally:
        nats_server.stop()
    assert (
        notice
        == (
            f"python -m ackservice.store: warning: cannot reach NATS at {nats_server.url}/ACKS; "
            "waiting for it, to go on after id 0\n"
        ).encode()
    )


@pytest.fixture
def plain_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A NATS server on loopback without JetStream (nothing answers its API unless a test
    does), stopped by PID at the end."""
    server = NatsServer(tmp_path / "nats", jetstream=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def jetstream_answering(url: str, consumer_create: dict[str, Any]) -> Iterator[list[str]]:
    """A stand-in for JetStream on a plain NATS server: its API's ``STREAM.INFO`` says the
    stream is there, ``CONSUMER.CREATE`` answers ``consumer_create`` (an error), anything
    else an empty object. Yields the subjects asked so far."""
    asked: list[str] = []

    async def answer(msg: Any) -> None:
        asked.append(msg.subject)
        if ".STREAM.INFO." in msg.subject:
            body: dict[str, Any] = {"config": {}, "state": {"messages": 0}}
        elif ".CONSUMER.CREATE." in msg.subject:
            body = consumer_create
        else:
            body = {}
        await msg.respond(json.dumps(body).encode())

    async def serve() -> nats.NATS:
        nc = await nats.connect(servers=[url], allow_reconnect=False)
        await nc.subscribe("$JS.API.>", cb=answer)
        await nc.flush()
        return nc

    # The store's own asyncio thread, as the reader runs nats-py.
    runner = AsyncioThread("jetstream-stand-in")
    try:
        nc = runner.submit(serve()).result(10)
        try:
            yield asked
        finally:
            runner.submit(nc.close()).result(10)
    finally:
        runner.close()


def test_follow_waits_out_a_cluster_between_leaders(plain_nats: NatsServer) -> None:
    """``export --follow`` whose consumer JetStream refuses with ``503 JetStream system
    temporarily unavailable`` (err_code 10008, a cluster electing a meta leader) keeps
    asking, says the wait once on stderr and still answers Ctrl-C with 130. It used to
    end at the first such answer, exit 1 (``cannot read stream ACKS: JetStream system
    temporarily unavailable (err_code 10008)``)."""
    unavailable = {
        "error": {
            "code": 503,
            "err_code": 10008,
            "description": "JetStream system temporarily unavailable",
        }
    }
    argv = _module("export", "--store", f"{plain_nats.url}/ACKS", "--follow", "--timeout", "1")
    with (
        jetstream_answering(plain_nats.url, unavailable) as asked,
        _exporting(argv) as (process, out, err),
    ):
        notice = err.next()
        deadline = time.monotonic() + 10
        while asked.count("$JS.API.CONSUMER.CREATE.ACKS") < 3:
            assert process.poll() is None, (notice, err.rest())
            assert time.monotonic() < deadline, asked
            time.sleep(0.05)
        _ctrl_c_ends_quietly(process, out, err)
    assert notice.startswith(b"python -m ackservice.store: warning: NATS at "), notice
    assert b"JetStream system temporarily unavailable (err_code 10008)" in notice
    assert b"waiting for it, to go on after id 0" in notice


def test_follow_ends_on_a_stream_that_is_gone(plain_nats: NatsServer) -> None:
    """A refusal that no waiting mends (``stream not found``, err_code 10059) still ends
    ``export --follow`` at once with one line and exit 1."""
    gone = {"error": {"code": 404, "err_code": 10059, "description": "stream not found"}}
    argv = _module("export", "--store", f"{plain_nats.url}/ACKS", "--follow", "--timeout", "1")
    with jetstream_answering(plain_nats.url, gone):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        "python -m ackservice.store: error: cannot read stream ACKS: stream not found "
        "(err_code 10059)\n"
    )


@pytest.mark.parametrize("command", ["export", "stats"])
def test_nats_without_jetstream_is_one_line_and_exit_1(
    plain_nats: NatsServer, command: str
) -> None:
    """A NATS server that has no JetStream (nothing answers its API): one line saying so,
    exit 1, where a traceback (nats-py's NoRespondersError) used to end the command."""
    argv = _module(command, "--store", f"{plain_nats.url}/ACKS", "--timeout", "1")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "has no JetStream to answer" in result.stderr


def test_an_error_with_standard_error_closed_stays_off_standard_output(tmp_path: Path) -> None:
    """Started with descriptor 2 closed, a store it cannot read still exits 1, and its error
    line goes nowhere rather than into standard output, the data an export writes."""
    done = run_with_stderr_closed(
        "ackservice.store", "export", "--store", f"sqlite:{tmp_path}/no.db"
    )
    assert done.returncode == 1
    assert done.stdout == b""


def test_export_through_pulls_smaller_than_its_messages(nats_stream: NatsServer) -> None:
    """``export --max-pull-bytes 2000`` of messages of 100 bytes to 50 kB: every payload comes
    out once, in order (those too large for a pull each alone), exit 0."""
    payloads = [b"a" * 100, b"b" * 50_000, b"c" * 100, b"d" * 1500, b"e" * 3000, b"f" * 100]
    publish_many(nats_stream.url, "ackservice.ACKS", payloads)
    argv = ["export", "--store", f"{nats_stream.url}/ACKS", "--max-pull-bytes", "2000"]
    result = subprocess.run(_module(*argv), capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert result.stdout == b"".join(message_line(payload) for payload in payloads)
