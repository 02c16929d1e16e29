"""``python -m ackservice.client`` over TLS as a real process, with real certificates: the
round trip, and every refusal as one line and exit 3, at once (never retried)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import trio
from client_fakes import RunClient, StartFake, StartServer
from client_support import STARTUP_SLACK, assert_one_line_error

import ackservice.client.tls
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


@pytest.mark.parametrize("tls_flag", ["--tls", "--tls-ca"])
async def test_tls_client_on_a_plain_port_exits_3(
    start_fake: StartFake, tls_files: TLSFiles, run_client: RunClient, tls_flag: str
) -> None:
    """A plaintext server that closes on the ClientHello: the line says the port does
    not seem to serve TLS, and which flags to drop: given only --tls-ca (which implies
    --tls), the line said "(drop --tls)", a flag not on the command line."""

    async def closes(stream: trio.abc.Stream) -> None:
        await stream.receive_some()

    port = await start_fake(closes)
    flags = ["--tls"] if tls_flag == "--tls" else ["--tls-ca", str(tls_files.ca)]
    run = await run_client("--port", str(port), *flags, "hello")
    assert run.returncode == 3
    assert_one_line_error(
        run,
        "the server did not answer in TLS",
        "(if not, connect without --tls and --tls-ca)",
    )


@pytest.mark.parametrize(
    ("code", "complaint"),
    [
        ("forbidden", "the server's --allow does not admit this client's address"),
        ("tls-required", "connect with --tls (or --tls-ca)"),
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
        (["--tls-ca", "{missing}"], "cannot read --tls-ca '{missing}': No such file"),
        (
            ["--tls", "--tls-cert", "{directory}"],
            "cannot read --tls-cert '{directory}': it is a directory, not a regular file",
        ),
        (
            ["--tls-ca", "{junk}"],
            "no PEM certificate in --tls-ca '{junk}': it has no -----BEGIN CERTIFICATE----- "
            "line; give a PEM file, or convert a DER one: openssl x509 -inform DER",
        ),
        (
            ["--tls", "--tls-cert", "{cert}", "--tls-key", "{junk}"],
            "no PEM private key in --tls-key '{junk}': it has no -----BEGIN ...PRIVATE KEY----- "
            "line; give a PEM file, or convert a DER one: openssl pkey -inform DER",
        ),
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
    one line naming the flag, the file and the problem (and, for a file that is not PEM,
    what to do), before any connection."""
    junk = tmp_path / "junk.der"
    junk.write_bytes(b"\x30\x82\x01\x0a not PEM\n")
    names = {
        "junk": str(junk),
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


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({"TLS_CA": "{missing}"}, "cannot read ACKSERVICE_CLIENT_TLS_CA '{missing}': No such file"),
        (
            {"TLS_CA": "{ca}", "TLS_CERT": "{directory}"},
            "cannot read ACKSERVICE_CLIENT_TLS_CERT '{directory}': it is a directory",
        ),
        (
            {"TLS_CA": "{junk}"},
            "no PEM certificate in ACKSERVICE_CLIENT_TLS_CA '{junk}': it has no -----BEGIN",
        ),
        (
            {"TLS": "1", "TLS_CERT": "{cert}", "TLS_KEY": "{other_key}"},
            "the key in ACKSERVICE_CLIENT_TLS_KEY '{other_key}' does not match the certificate "
            "in ACKSERVICE_CLIENT_TLS_CERT '{cert}'",
        ),
        (
            {"TLS": "1", "TLS_CERT": "{cert}"},
            "no private key in ACKSERVICE_CLIENT_TLS_CERT '{cert}': give --tls-key as well",
        ),
        ({"TLS_KEY": "{key}"}, "ACKSERVICE_CLIENT_TLS_KEY applies only with --tls or --tls-ca"),
        ({"TLS": "1", "TLS_KEY": "{key}"}, "ACKSERVICE_CLIENT_TLS_KEY needs --tls-cert"),
    ],
    ids=["ca", "cert", "not-pem", "mismatch", "cert-without-key", "key-without-tls", "key-alone"],
)
def test_a_tls_file_from_the_environment_is_named_by_its_variable(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tls_files: TLSFiles,
    settings: dict[str, str],
    complaint: str,
) -> None:
    """A TLS setting that came from an ``ACKSERVICE_CLIENT_*`` variable is called by that
    variable in the error line, as the server does, not by a flag that is on no command
    line the reader could look at."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    names = {
        "ca": str(tls_files.ca),
        "cert": str(tls_files.client_cert),
        "directory": str(tmp_path),
        "junk": str(junk),
        "key": str(tls_files.client_key),
        "missing": str(tmp_path / "missing.pem"),
        "other_key": str(tls_files.other_client_key),
    }
    environ = {f"ACKSERVICE_CLIENT_{k}": v.format(**names) for k, v in settings.items()}
    with pytest.raises(SystemExit) as exit_:
        main(["x"], environ=environ)
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("python -m ackservice.client: error: ")
    assert complaint.format(**names) in line


def test_a_tls_flag_given_over_its_variable_is_named_as_the_flag(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """With both ``--tls-ca`` and ``ACKSERVICE_CLIENT_TLS_CA`` set, the flag's file is used,
    and the error about it names the flag."""
    flag_file = tmp_path / "flag.pem"
    environ = {"ACKSERVICE_CLIENT_TLS_CA": str(tmp_path / "variable.pem")}
    with pytest.raises(SystemExit) as exit_:
        main(["--tls-ca", str(flag_file), "x"], environ=environ)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        f"python -m ackservice.client: error: cannot read --tls-ca {str(flag_file)!r}: "
        "No such file or directory (see --help)\n"
    )


def test_an_unreadable_tls_file_says_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file the client may not read: the setting, the file and the system's reason. (The
    refusal is simulated: mode 000 does not stop root, who runs these tests in CI.)"""
    locked = tmp_path / "locked.pem"
    locked.write_text("-----BEGIN CERTIFICATE-----\n")

    def refuse(path: object) -> bytes:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(ackservice.client.tls, "read_regular_file", refuse)
    with pytest.raises(SystemExit) as exit_:
        main(["x"], environ={"ACKSERVICE_CLIENT_TLS_CA": str(locked)})
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        f"python -m ackservice.client: error: cannot read ACKSERVICE_CLIENT_TLS_CA "
        f"{str(locked)!r}: Permission denied (see --help)\n"
    )


async def test_a_missing_ca_from_the_environment_is_one_line_from_the_process(
    run_client: RunClient, tmp_path: Path
) -> None:
    """``ACKSERVICE_CLIENT_TLS_CA=/nonexistent python -m ackservice.client hi``: exit 2 and
    exactly one line naming the variable, no traceback."""
    missing = tmp_path / "nonexistent"
    run = await run_client("hi", env={"ACKSERVICE_CLIENT_TLS_CA": str(missing)})
    assert run.returncode == 2
    assert run.stdout == b""
    assert run.stderr.decode() == (
        f"python -m ackservice.client: error: cannot read ACKSERVICE_CLIENT_TLS_CA "
        f"{str(missing)!r}: No such file or directory (see --help)\n"
    )
