"""TLS as a user runs it: the server, the client and the store reader as real processes, with
real certificates (trustme): mutual TLS through the client CLI, the identity back out of the
store, and two workers serving TLS on one port."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import server_process
from tls_support import CLIENT_COMMON_NAME, TLSFiles


def serving_tls(tls_files: TLSFiles) -> list[str]:
    """The server's flags for its certificate and key."""
    return ["--tls-cert", str(tls_files.server_cert), "--tls-key", str(tls_files.server_key)]


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", *args], input=stdin, capture_output=True, timeout=60, check=False
    )


def test_mutual_tls_lines_come_back_from_the_store_with_their_sender(
    tmp_path: Path, tls_files: TLSFiles
) -> None:
    store = f"sqlite:{tmp_path / 'tls.db'}"
    lines = [b"line %d" % i for i in range(500)]
    with server_process(
        tmp_path / "server.log",
        "--store",
        store,
        *serving_tls(tls_files),
        "--tls-client-ca",
        str(tls_files.ca),
    ) as server:
        assert server.wait_for_event("listening")["tls"] == "mutual"
        sent = run(
            "ackservice.client",
            "--port",
            str(server.port),
            "--tls-ca",
            str(tls_files.ca),
            "--tls-cert",
            str(tls_files.client_cert),
            "--tls-key",
            str(tls_files.client_key),
            "--quiet",
            stdin=b"\n".join(lines) + b"\n",
        )
        assert sent.returncode == 0, sent.stderr
        refused = run(
            "ackservice.client", "--port", str(server.port), "--tls-ca", str(tls_files.ca), "x"
        )
        assert refused.returncode == 3
        assert b"certificate required" in refused.stderr
        # Logged a few ms after the client saw its last ACK (the log writer thread).
        signed = server.wait_for_event("connection_closed")
        assert signed["identity"].endswith(f",CN={CLIENT_COMMON_NAME}")
    exported = run("ackservice.store", "export", "--store", store, "--format", "json")
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [r["payload"].encode() for r in records] == lines
    assert {r["identity"] for r in records} == {signed["identity"]}


def test_two_workers_serve_tls_on_one_port(tmp_path: Path, tls_files: TLSFiles) -> None:
    with server_process(
        tmp_path / "server.log",
        "--workers",
        "2",
        "--store",
        "none",
        *serving_tls(tls_files),
    ) as server:
        for _ in range(4):
            sent = run(
                "ackservice.client", "--port", str(server.port), "--tls-ca", str(tls_files.ca), "hi"
            )
            assert sent.returncode == 0, sent.stderr
            assert sent.stdout.startswith(b"message 1: ACK 1 2 ")


def test_a_plaintext_client_on_a_tls_port_is_told_what_to_do_once(
    tmp_path: Path, tls_files: TLSFiles
) -> None:
    """The client without --tls on a TLS port: one line, exit 3, the server's words then the
    client's flags, once (the server's detail named the client's flags too, so the line said
    "connect with TLS (the client's --tls or --tls-ca)); ... connect with --tls (or --tls-ca)")."""
    with server_process(
        tmp_path / "server.log",
        "--store",
        "none",
        *serving_tls(tls_files),
    ) as server:
        refused = run("ackservice.client", "--port", str(server.port), "hello")
    assert refused.returncode == 3, refused.stderr
    assert refused.stderr.decode() == (
        f"python -m ackservice.client: error: 127.0.0.1:{server.port} refused this client "
        "(tls-required: this port serves TLS only; reconnect with TLS); "
        "connect with --tls (or --tls-ca); 1 message not acknowledged\n"
    )
