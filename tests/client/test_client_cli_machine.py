"""Machine-readable output (``--json``, ``--log-format json``): every line on stdout and
stderr is a JSON object; ``--host HOST:PORT``; ``--version``."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import re

import pytest
from client_fakes import RunClient

from ackservice.client.cli import host_and_port, main
from ackservice.server import Server
from support import run_with_stderr_closed


def json_lines(output: bytes) -> list[dict[str, object]]:
    """Every line parsed as a JSON object (fails on any line that is not one)."""
    return [json.loads(line) for line in output.decode().splitlines()]


@pytest.mark.parametrize("flags", [["--json"], ["--log-format", "json"], ["--log-format=json"]])
async def test_piped_summary_is_a_json_object(
    server: Server, run_client: RunClient, flags: list[str]
) -> None:
    """With ``--json`` or ``--log-format json`` the summary on stderr is a JSON object."""
    run = await run_client("--port", str(server.port), *flags, stdin=b"a\nb\n")
    assert run.returncode == 0
    (summary,) = json_lines(run.stderr)
    assert summary["event"] == "summary"
    assert {k: summary[k] for k in ("sent", "acked", "rejected", "unacked", "not_sent")} == {
        "sent": 2,
        "acked": 2,
        "rejected": 0,
        "unacked": 0,
        "not_sent": 0,
    }
    assert summary["interrupted"] is False
    if "--json" in flags:
        assert [reply["status"] for reply in json_lines(run.stdout)] == ["acked", "acked"]


async def test_errors_and_logs_are_json_lines(run_client: RunClient, unused_port: int) -> None:
    """An unreachable server with ``--json`` and info logging: every stderr line (log events
    and the final error) is JSON, and the error is an ``"event": "error"`` object."""
    run = await run_client(
        "--port", str(unused_port), "--json", "--log-level", "debug", "--retry-for", "0", "x"
    )
    assert run.returncode == 3
    events = json_lines(run.stderr)
    assert events[-1]["event"] == "error"
    assert "cannot connect to 127.0.0.1:" in str(events[-1]["error"])
    assert run.stdout == b""


def test_a_usage_error_with_json_is_a_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad setting with ``--json``: still one line on stderr, exit 2, and it is JSON."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--json", "--window", "0", "x"], environ={})
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    error = json.loads(line)
    assert error["event"] == "error"
    assert "--window" in error["error"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.org", ("example.org", None)),
        ("127.0.0.1:9000", ("127.0.0.1", 9000)),
        ("localhost:1", ("localhost", 1)),
        ("::1", ("::1", None)),
        ("[::1]", ("::1", None)),
        ("[::1]:9000", ("::1", 9000)),
    ],
)
def test_host_takes_an_optional_port(text: str, expected: tuple[str, int | None]) -> None:
    """``--host`` is a name or address, with ``:PORT`` (IPv6 in brackets for a port)."""
    assert host_and_port(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1:", "127.0.0.1:http", "[::1]9000", "[::1", ":80"])
def test_host_with_a_bad_port_is_refused(text: str) -> None:
    """A malformed ``HOST:PORT`` is a usage error naming the form expected."""
    with pytest.raises(ValueError, match="expected"):
        host_and_port(text)


async def test_host_with_port_connects_there(server: Server, run_client: RunClient) -> None:
    """``--host 127.0.0.1:PORT`` connects to PORT (the default --port is not used)."""
    run = await run_client("--host", f"127.0.0.1:{server.port}", "hello")
    assert run.returncode == 0, run.stderr
    assert run.stdout.decode().startswith("message 1: ACK 1 5 ")


@pytest.mark.parametrize(
    "argv",
    [["--host", "127.0.0.1:9000", "--port", "9001"], ["--host", "[::1]:9000", "--port", "1"]],
)
def test_host_port_conflicting_with_port_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A port in ``--host`` and a different ``--port``: one line, exit 2, nothing sent."""
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "x"], environ={})
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("python -m ackservice.client: error: --host gives port 9000")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """``--version`` prints the installed package's version and exits 0."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"], environ={})
    assert exit_info.value.code == 0
    version = importlib.metadata.version("ackservice")
    assert capsys.readouterr().out == f"python -m ackservice.client {version}\n"


@pytest.mark.parametrize("command", ["client", "bench"])
def test_help_text_is_uniform(command: str) -> None:
    """Every option's help has at most one parenthesis (the default/env note, never a second
    one beside it), every setting shows its default, and floats are not printed as 5.0."""
    module = importlib.import_module(f"ackservice.{command}.cli")
    parser = module.build_parser({})
    for action in parser._actions:
        if not action.option_strings or action.help in (None, argparse.SUPPRESS):
            continue
        text = str(action.help)
        assert text.count("(") <= 1, text
        # Valued settings (switches and repeatable lists are annotated by the shared parser).
        if action.nargs is None and not isinstance(action, argparse._AppendAction):
            assert "default: " in text, text  # "(default: ..." or "(range: ...; default: ..."
        assert not re.search(r"default: \d+\.0[;)]", text), text


def test_a_json_usage_error_with_standard_error_closed_stays_off_standard_output() -> None:
    """With ``--json`` and descriptor 2 closed, a usage error still exits 2, and its JSON
    object goes nowhere rather than onto standard output, among the replies' objects."""
    done = run_with_stderr_closed("ackservice.client", "--json", "--window", "0", "x")
    assert done.returncode == 2
    assert done.stdout == b""
