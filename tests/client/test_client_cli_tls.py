"""``python -m ackservice.client`` over TLS as a real process, with real certificates: the
round trip, and every refusal as one line and exit 3, at once (never retried)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import trio
from client_fakes import RunClient, StartFake, StartServer
from test_client_cli_faults import STARTUP_SLACK, assert_one_line_error

from ackservice.client.cli import main
from ackservice.protocol import err_line
from ackservice.server import server_tls_context
from tls_support import TLSFiles, serve_ack_tls


def reply_lines(run: subprocess.CompletedProcess[bytes]) -> list[str]:
    return run.stdout.decode().splitlines()


@pytest.fixture
async def tls_port(nursery: trio.Nursery, tls_files: TLSFiles) -> int:
    """The library's AckHandler over TLS (trio.serve_ssl_over_tcp)."""
    return await serve_ack_tls(
        nursery, server_tls_context(tls_files.server_cert, tls_files.server_key)
    )


async def test_arguments_over_tls(
    tls_port: int, tls_files: TLSFiles, run_client: RunClient
) -> None:
    """``--tls-ca`` turns TLS on and verifies the server with the private CA."""
    run = await run_client("--port", str(tls_port), "--tls-ca", str(tls_files.ca), "hello", "two")
    assert run.returncode == 0, run.stderr
    assert reply_lines(run)[0].startswith("message 1: ACK 1 5 3610a686")
    assert reply_lines(run)[1].startswith("message 2: ACK 2 3 ")


async def test_piped_input_over_tls_with_settings_from_the_environment(
    tls_port: int, tls_files: TLSFiles, run_client: RunClient
) -> None:
    """Piped lines go through TLS too; every TLS setting has its ACKSERVICE_CLIENT_*
    variable (here the CA, and the server name to verify when connecting by address)."""
    run = await run_client(
        "--quiet",
        stdin=b"".join(b"line %d\n" % i for i in range(200)),
        env={
            "ACKSERVICE_CLIENT_PORT": str(tls_port),
            "ACKSERVICE_CLIENT_TLS_CA": str(tls_files.ca),
            "ACKSERVICE_CLIENT_TLS_SERVER_NAME": "localhost",
        },
    )
    assert run.returncode == 0, run.stderr
    assert "sent 200, acked 200, rejected 0, unacked 0" in run.stderr.decode()


async def test_untrusted_certificate_exits_3_at_once(
    tls_port: int, tls_files: TLSFiles, run_client: RunClient
) -> None:
    """A server certificate the CA does not vouch for: one line, exit 3, and no retries
    (well inside the default 30 s retry budget), for piped input too (no summary)."""
    started = trio.current_time()
    run = await run_client(
        "--port", str(tls_port), "--tls-ca", str(tls_files.other_ca), stdin=b"a\n"
    )
    elapsed = trio.current_time() - started
    assert run.returncode == 3
    assert_one_line_error(
        run,
        f"cannot connect to 127.0.0.1:{tls_port}: TLS handshake failed: the server's certificate "
        "did not verify: unable to get local issuer certificate; check --tls-ca",
    )
    assert "sent" not in run.stderr.decode()
    assert elapsed < STARTUP_SLACK


async def test_wrong_server_name_exits_3_with_a_json_error(
    tls_port: int, tls_files: TLSFiles, run_client: RunClient
) -> None:
    """With ``--json`` the TLS failure is the one JSON error object on stderr."""
    run = await run_client(
        "--json",
        "--port",
        str(tls_port),
        "--tls-ca",
        str(tls_files.ca),
        "--tls-server-name",
        "elsewhere.example",
        "x",
    )
    assert run.returncode == 3
    (line,) = run.stderr.decode().splitlines()
    error = json.loads(line)
    assert error["event"] == "error"
    assert "Hostname mismatch" in error["error"]
    assert "check --tls-server-name" in error["error"]


@pytest.mark.parametrize(
    ("certificate", "exit_code", "complaint"),
    [
        ("good", 0, None),
        ("none", 3, "refused the TLS connection: tlsv13 alert certificate required; "),
        ("other CA", 3, "refused the TLS connection: tlsv1 alert unknown ca; "),
    ],
)
async def test_mutual_tls(
    start_server: StartServer,
    tls_files: TLSFiles,
    run_client: RunClient,
    certificate: str,
    exit_code: int,
    complaint: str | None,
) -> None:
    """The server, requiring a client certificate from its CA, acknowledges a client with
    one (``--tls-cert``/``--tls-key``); without one, or with one from another CA, the
    client reports the server's alert in one line and exits 3 after a single connection."""
    server = await start_server(
        tls=server_tls_context(tls_files.server_cert, tls_files.server_key, tls_files.ca)
    )
    port = server.port
    cert_flags = {
        "good": ["--tls-cert", str(tls_files.client_cert), "--tls-key", str(tls_files.client_key)],
        "none": [],
        "other CA": [
            "--tls-cert",
            str(tls_files.other_client_cert),
            "--tls-key",
            str(tls_files.other_client_key),
        ],
    }[certificate]
    run = await run_client("--port", str(port), "--tls-ca", str(tls_files.ca), *cert_flags, "hello")
    assert run.returncode == exit_code, run.stderr
    if complaint is None:
        assert reply_lines(run)[0].startswith("message 1: ACK 1 5 3610a686")
    else:
        line = assert_one_line_error(run, complaint, "--tls-cert")
        assert "reset" not in line
        assert server.handler.stats.connections == 1


async def test_tls_client_on_a_plain_port_exits_3(
    start_fake: StartFake, tls_files: TLSFiles, run_client: RunClient
) -> None:
    """A plaintext server that closes on the ClientHello: the line says the port does
    not seem to serve TLS."""

    async def closes(stream: trio.abc.Stream) -> None:
        await stream.receive_some()

    port = await start_fake(closes)
    run = await run_client("--port", str(port), "--tls", "hello")
    assert run.returncode == 3
    assert_one_line_error(run, "the server did not answer in TLS", "(drop --tls)")


@pytest.mark.parametrize(
    ("code", "complaint"),
    [
        ("forbidden", "the server's --allow does not admit this client's address"),
        ("tls-required", "the port serves TLS only: connect with --tls"),
    ],
)
async def test_final_connection_errors_exit_3(
    start_fake: StartFake, run_client: RunClient, code: str, complaint: str
) -> None:
    """``ERR 0 forbidden`` and ``ERR 0 tls-required`` (sent in plaintext by a TLS port) are
    final: one line, exit 3, one connection (the default retry budget is 30 s)."""
    connections = 0

    async def refuse(stream: trio.abc.Stream) -> None:
        nonlocal connections
        connections += 1
        await stream.send_all(err_line(0, code, "as configured"))

    port = await start_fake(refuse)
    run = await run_client("--port", str(port), stdin=b"one\ntwo\n")
    assert run.returncode == 3
    assert_one_line_error(
        run, f"127.0.0.1:{port} refused this client ({code}: as configured)", complaint
    )
    assert connections == 1


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (["--tls-ca", "{missing}"], "TLS CA file {missing}: cannot read it (No such file"),
        (["--tls", "--tls-cert", "{directory}"], "TLS client certificate {directory}: cannot read"),
        (["--tls", "--tls-cert", "{cert}", "--tls-key", "{other_key}"], "does not match"),
        (["--tls", "--tls-key", "{key}"], "--tls-key needs --tls-cert"),
        (["--tls-cert", "{cert}"], "--tls-cert applies only with --tls or --tls-ca"),
        (["--tls-server-name", "x.example"], "--tls-server-name applies only with --tls"),
    ],
)
def test_tls_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tls_files: TLSFiles,
    flags: list[str],
    complaint: str,
) -> None:
    """A CA, certificate or key that cannot be used, or TLS flags without TLS: exit 2 and
    one line naming the file and the problem, before any connection."""
    names = {
        "missing": str(tmp_path / "missing.pem"),
        "directory": str(tmp_path),
        "cert": str(tls_files.client_cert),
        "key": str(tls_files.client_key),
        "other_key": str(tls_files.other_client_key),
    }
    with pytest.raises(SystemExit) as exit_:
        main([flag.format(**names) for flag in flags] + ["x"], environ={})
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith("python -m ackservice.client: error: ")
    assert complaint.format(**names) in line
