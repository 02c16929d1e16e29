"""The load generator over TLS, with real certificates, against the library's AckHandler
behind ``trio.serve_ssl_over_tcp``: every mode completes with no error, and TLS settings
that cannot work are refused before the run."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import trio

from ackservice.bench.cli import main
from ackservice.bench.load import run_load
from ackservice.bench.spec import LoadSpec, TLSSpec
from ackservice.errors import ConnectError
from ackservice.server import server_tls_context
from tls_support import TLSFiles, serve_ack_tls


@pytest.fixture
async def tls_port(nursery: trio.Nursery, tls_files: TLSFiles) -> int:
    return await serve_ack_tls(
        nursery, server_tls_context(tls_files.server_cert, tls_files.server_key)
    )


@pytest.mark.parametrize(
    "mode",
    [
        {"window": 16, "messages": 200},
        {"window": 4, "rate": 2000.0, "messages": 200},
        # A full handshake per message: fewer of them.
        {"churn": True, "messages": 40},
    ],
    ids=["closed loop", "open loop", "churn"],
)
async def test_every_mode_runs_over_tls_without_errors(
    tls_port: int, tls_files: TLSFiles, mode: dict[str, object]
) -> None:
    """Closed loop, open loop and churn over TLS: every message acknowledged, no error.
    A TLS connection cannot half-close, so it ends with close_notify once every reply is
    in; the server takes that as the clean end it is."""
    spec = LoadSpec(
        port=tls_port,
        connections=4,
        size=100,
        duration=None,
        tls=TLSSpec(ca=str(tls_files.ca)),
        **mode,  # type: ignore[arg-type]
    )
    with trio.fail_after(30):
        result = await run_load(spec)
    assert result.error_total == 0, result.errors
    assert result.acks == result.sent == mode["messages"]


async def test_an_untrusted_server_is_a_connect_error(tls_port: int, tls_files: TLSFiles) -> None:
    """A certificate the CA does not vouch for: no connection opens, and the error says
    why in the client's words."""
    spec = LoadSpec(port=tls_port, connections=2, tls=TLSSpec(ca=str(tls_files.other_ca)))
    with pytest.raises(ConnectError, match=r"certificate did not verify.*check --tls-ca"):
        await run_load(spec)


async def test_bench_cli_over_tls(tls_port: int, tls_files: TLSFiles) -> None:
    """``python -m ackservice.bench --tls-ca`` as a real process: a short run, zero errors,
    and the report says TLS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACKSERVICE_")}
    with trio.fail_after(60):
        done = await trio.run_process(
            [
                sys.executable,
                "-m",
                "ackservice.bench",
                "--port",
                str(tls_port),
                "--tls-ca",
                str(tls_files.ca),
                "--tls-server-name",
                "localhost",
                "--connections",
                "4",
                "--window",
                "8",
                "--duration",
                "0.5",
                "--warmup",
                "0",
                "--json",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["settings"]["tls"] is True
    assert report["errors"]["total"] == 0
    assert report["acks"] > 0


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (["--tls-ca", "{missing}"], "cannot read --tls-ca '{missing}': No such file"),
        (["--tls-cert", "{cert}"], "--tls-cert applies only with --tls or --tls-ca"),
        (
            ["--tls", "--spawn"],
            "--tls with --spawn needs a TLS server: add --server-arg=--tls-cert",
        ),
    ],
)
def test_tls_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tls_files: TLSFiles,
    flags: list[str],
    complaint: str,
) -> None:
    """Unusable TLS files, TLS flags without TLS, and --spawn (a plain server) with TLS:
    one line, exit 2, before anything starts."""
    names = {"missing": str(tmp_path / "missing.pem"), "cert": str(tls_files.client_cert)}
    with pytest.raises(SystemExit) as exit_:
        main([flag.format(**names) for flag in flags], environ={})
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("python -m ackservice.bench: error: ")
    assert complaint.format(**names) in line


def test_spec_carries_tls_to_worker_processes(tls_files: TLSFiles) -> None:
    """``--procs`` pickles the spec: the TLS settings travel as file names."""
    spec = LoadSpec(connections=4, tls=TLSSpec(ca=str(tls_files.ca), server_name="localhost"))
    shares = [pickle.loads(pickle.dumps(share)) for share in spec.split(2)]
    assert all(share.tls == spec.tls for share in shares)
