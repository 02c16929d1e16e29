"""``python -m ackservice.bench`` as a real process: the report, exit codes, settings."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from typing import Any

import pexpect
import pytest
import trio

from ackservice.bench.cli import build_parser, main
from ackservice.bench.histogram import LatencyHistogram
from ackservice.bench.report import render_text
from ackservice.bench.result import LoadResult
from ackservice.bench.spec import LoadSpec
from ackservice.bench.verify import ERROR_KINDS
from ackservice.protocol import MessageFramer, ack_line, err_line

BENCH = [sys.executable, "-m", "ackservice.bench"]


def run_bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BENCH, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_spawn_smoke_run_reports_json_and_no_errors() -> None:
    """The one-command benchmark, --spawn --duration 1 --json: exit 0, a complete JSON
    report with zero errors and sane numbers, nothing on stderr (not a terminal), and the
    spawned server stopped cleanly."""
    done = run_bench("--spawn", "--duration", "1", "--warmup", "0", "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    report = json.loads(done.stdout)
    assert report["tool"] == "ackservice.bench"
    assert report["mode"] == "closed-loop"
    assert report["target"]["spawned"] is True
    assert report["errors"] == {"total": 0, **dict.fromkeys(ERROR_KINDS, 0)}
    assert report["acks"] > 0
    assert report["acks_per_s"] > 0
    assert report["mb_per_s"] > 0
    assert report["elapsed_s"] == pytest.approx(1.0, abs=0.05)
    latency = report["latency_us"]
    assert latency["count"] > 0
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99_9"]
    assert latency["p99_9"] <= latency["max"]
    assert report["server"]["exit_code"] == 0
    assert set(report["settings"]) >= {"connections", "window", "size", "rate", "procs"}


def test_procs_merge_the_workers_results() -> None:
    """--procs 2 with --messages: the workers' counts and histograms add up exactly."""
    done = run_bench(
        "--spawn",
        "--procs",
        "2",
        "--connections",
        "4",
        "--window",
        "8",
        "--messages",
        "3000",
        "--warmup",
        "0",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["sent"] == report["acks"] == report["latency_us"]["count"] == 3000
    assert report["connections"] == 4
    assert report["settings"]["procs"] == 2
    assert report["errors"]["total"] == 0


def test_spawn_finds_the_port_of_a_server_that_does_not_log_it() -> None:
    """With --server-arg=--log-level=warning the server never logs 'listening'; --spawn
    still finds its port."""
    done = run_bench(
        "--spawn",
        "--server-arg=--log-level=warning",
        "--messages",
        "100",
        "--warmup",
        "0",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["acks"] == 100


async def sloppy_server(stream: trio.SocketStream) -> None:
    """Gets every third reply wrong in a different way."""
    framer = MessageFramer(1 << 20)
    seq = 0
    async with stream:
        while data := await stream.receive_some(65536):
            replies = []
            for payload in framer.feed(data):
                assert isinstance(payload, bytes)
                seq += 1
                reply = ack_line(seq, payload)
                if seq % 9 == 3:
                    reply = reply[:-9] + b"00000000\n"
                elif seq % 9 == 6:
                    reply = ack_line(seq + 1, payload)
                elif seq % 9 == 0:
                    reply = err_line(seq, "rejected", "no room")
                replies.append(reply)
            await stream.send_all(b"".join(replies))


async def test_wrong_replies_exit_1_with_errors_by_kind() -> None:
    """Against a server that answers wrongly, the bench exits 1 and the JSON report counts
    each kind of error."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, sloppy_server, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        done = await trio.run_process(
            [
                *BENCH,
                *("--port", str(port), "--connections", "1", "--window", "4"),
                *("--messages", "27", "--warmup", "0", "--json"),
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        nursery.cancel_scope.cancel()
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    errors = {kind: count for kind, count in report["errors"].items() if count}
    assert errors == {"total": 9, "crc": 3, "seq": 3, "err_reply": 3}
    assert report["err_codes"] == {"rejected": 3}
    assert report["acks"] == 18


def test_no_server_exits_3_with_one_line() -> None:
    """Nothing listening: exit 3 and one line on stderr that says what to do."""
    done = run_bench("--port", str(closed_port()), "--duration", "1")
    assert done.returncode == 3
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert "connection refused" in done.stderr
    assert "--spawn" in done.stderr


def test_a_spawned_server_that_cannot_start_exits_3() -> None:
    """--spawn with a server flag it refuses: exit 3 with the server's own complaint."""
    done = run_bench("--spawn", "--server-arg=--max-message-bytes=-1")
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1
    assert "max-message-bytes" in done.stderr


@pytest.mark.parametrize(
    ("argv", "env", "complaint"),
    [
        (["--window", "0"], {}, "--window: expected a positive integer"),
        (["--churn", "--window", "4"], {}, "--window does not apply to --churn"),
        (["--procs", "3", "--connections", "2"], {}, "--procs 3 needs at least 3"),
        (["--server-arg=--log-level=debug"], {}, "--server-arg only applies with --spawn"),
        (["--port", "0"], {}, "--spawn picks a free one"),
        (["--rate", "-5"], {}, "--rate: expected a positive number"),
        (["--duration", "7200"], {}, "at most 3600"),
        ([], {"ACKSERVICE_BENCH_CONNECTIONS": "many"}, "ACKSERVICE_BENCH_CONNECTIONS"),
        ([], {"ACKSERVICE_BENCH_JSON": "maybe"}, "ACKSERVICE_BENCH_JSON"),
    ],
)
def test_bad_settings_exit_2_with_one_line(
    argv: list[str], env: dict[str, str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad flag or environment variable: one line on stderr, exit 2, nothing run."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv, environ=env)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert complaint in err


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--port", "-1"], "argument --port: expected a port from 1 to 65535, got '-1'"),
        (["--warmup", "-1"], "argument --warmup: expected a number of seconds from 0 to 3600"),
        # Unbounded before: 1e30 meant waiting forever for a silent server.
        (
            ["--timeout", "1e30"],
            "argument --timeout: expected a number of seconds above 0 and at most 86400",
        ),
        (
            ["--connect-timeout", "1e30"],
            "argument --connect-timeout: expected a number of seconds above 0 and at most 3600",
        ),
    ],
)
def test_a_refused_value_is_told_the_range_allowed(args: list[str], complaint: str) -> None:
    """The complaint names what is accepted: -1 for --port was told "from 0 to 65535" (0 is
    refused next), -1 for --warmup "a positive number" (0, no warm-up, is allowed)."""
    done = run_bench(*args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert complaint in done.stderr


def test_every_setting_has_an_environment_variable_and_flags_win() -> None:
    """Each setting reads ACKSERVICE_BENCH_*; a flag overrides its variable; switches take
    1/true/yes/on; --server-arg's variable is split like a shell line."""
    env = {
        "ACKSERVICE_BENCH_CONNECTIONS": "7",
        "ACKSERVICE_BENCH_WINDOW": "3",
        "ACKSERVICE_BENCH_RATE": "250.5",
        "ACKSERVICE_BENCH_JSON": "yes",
        "ACKSERVICE_BENCH_SPAWN": "1",
        "ACKSERVICE_BENCH_SERVER_ARGS": "--log-level 'warning'",
        "ACKSERVICE_HOST": "0.0.0.0",  # the server's variable: not the bench's business
    }
    args = build_parser(env).parse_args(["--window", "5"])
    assert args.connections == 7
    assert args.window == 5
    assert args.rate == 250.5
    assert args.json is True
    assert args.spawn is True
    assert args.server_arg == ["--log-level", "warning"]
    assert args.host == "127.0.0.1"
    help_text = build_parser({}).format_help()
    for name in ("HOST", "PORT", "CONNECTIONS", "WINDOW", "SIZE", "DURATION", "MESSAGES"):
        assert f"ACKSERVICE_BENCH_{name}" in help_text
    for name in ("WARMUP", "RATE", "PROCS", "TIMEOUT", "CHURN", "SPAWN", "JSON", "SERVER_ARGS"):
        assert f"ACKSERVICE_BENCH_{name}" in help_text


def test_progress_line_on_a_terminal() -> None:
    """With stderr on a terminal, a live progress line is shown and erased before the
    summary table."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "ackservice.bench", "--spawn", "--duration", "1.5", "--warmup", "0"],
        timeout=30,
        encoding="utf-8",
    )
    try:
        child.expect(r"replies/s")
        child.expect(r"\x1b\[K")
        child.expect(r"throughput")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def a_result(**changes: Any) -> LoadResult:
    histogram = LatencyHistogram()
    for micros in (50, 60, 70, 2_000):
        histogram.record(micros * 1_000)
    fields: dict[str, Any] = {
        "histogram": histogram,
        "elapsed": 2.0,
        "acks": 4_000,
        "replies": 4_000,
        "sent": 4_000,
        "connections": 2,
        "errors": dict.fromkeys(ERROR_KINDS, 0),
        "err_codes": {},
        "cpu": [0.5],
        "cpu_elapsed": [2.0],
        "size": 100,
    }
    fields.update(changes)
    return LoadResult(**fields)


def test_the_human_report_says_what_was_measured() -> None:
    """The summary names the load, the rates, the percentiles and the errors by kind."""
    errors = dict.fromkeys(ERROR_KINDS, 0) | {"crc": 2, "err_reply": 1}
    text = render_text(
        a_result(errors=errors, err_codes={"too-large": 1}),
        LoadSpec(connections=2, window=8, size=100, warmup=1.0),
        procs=1,
    )
    assert "2 connections x 8 in flight, 100-byte messages, closed loop" in text
    assert "2,000 acks/s" in text
    assert "0.20 MB/s" in text
    assert "p50 60 µs" in text
    assert "max 2.00 ms" in text
    assert "errors      3: crc 2, err_reply 1 (too-large 1)" in text
    assert "note" not in text


def test_the_human_report_warns_when_the_client_was_the_bottleneck() -> None:
    """A load generator process near 100% of a core is called out, with the remedy."""
    text = render_text(a_result(cpu=[1.96]), LoadSpec(), procs=1)
    assert "98% of a core" in text
    assert "--procs 2" in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """``--version`` prints the installed package's version and exits 0."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"], environ={})
    assert exit_info.value.code == 0
    version = importlib.metadata.version("ackservice")
    assert capsys.readouterr().out == f"python -m ackservice.bench {version}\n"


@pytest.mark.parametrize(
    "server_arg", ["--server-arg=--port=9000", "--server-arg=--port", "--server-arg=--por=1"]
)
def test_spawn_refuses_a_server_port(server_arg: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--spawn`` picks the port; a ``--port`` for the server is refused: one line, exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--spawn", server_arg], environ={})
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("python -m ackservice.bench: error: --server-arg --por")
    assert "--spawn picks the server's port itself" in line


def test_json_errors_are_json_on_stdout() -> None:
    """With ``--json``, a failure still prints one JSON object on stdout (and its line on
    stderr): nothing listening exits 3 with ``{"error": ..., "exit_code": 3}``."""
    done = run_bench("--json", "--port", str(closed_port()), "--duration", "1")
    assert done.returncode == 3
    error = json.loads(done.stdout)
    assert error["exit_code"] == 3
    assert "connection refused" in error["error"]
    assert done.stderr.count("\n") == 1


def test_json_usage_errors_are_json_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    """With ``--json`` (flag or ACKSERVICE_BENCH_JSON), a usage error is a JSON object too."""
    for argv, env in (
        (["--json", "--window", "0"], {}),
        (["--window", "0"], {"ACKSERVICE_BENCH_JSON": "1"}),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv, environ=env)
        assert exit_info.value.code == 2
        captured = capsys.readouterr()
        assert json.loads(captured.out)["exit_code"] == 2
        assert captured.err.count("\n") == 1


def test_ctrl_c_reports_and_exits_130() -> None:
    """A first Ctrl-C ends the measurement early: the report (marked interrupted) is still
    printed, and the exit code is 130, not 0."""
    process = subprocess.Popen(
        [*BENCH, "--spawn", "--duration", "60", "--warmup", "0", "--json", "--connections", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)  # the spawned server is up and the measurement under way
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    assert json.loads(out)["interrupted"] is True


def test_spawn_learns_the_port_from_the_server_port_file() -> None:
    """--spawn asks the server for a --port-file and reads the port there (no log parsing,
    no /proc), so it works at any server log level and on any system."""
    from ackservice.bench.spawn import start_server

    server = start_server("127.0.0.1", ["--log-level", "warning", "--store", "none"])
    try:
        port_file = server.workdir / "server.port"
        assert port_file.read_text() == f"127.0.0.1:{server.port}\n"
        assert server.log_path.read_text() == ""  # nothing logged that could tell the port
    finally:
        assert server.stop() == 0
