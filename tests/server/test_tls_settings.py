"""The server's TLS settings and record parsing, without a connection: certificate files,
the CLI's refusal of a bad one, ``--allow`` matching, TLS record boundaries."""

from __future__ import annotations

import ipaddress
import os
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from ackservice.server import TLSConfigError, server_tls_context
from ackservice.server.cli import main as server_main
from ackservice.server.handler import _allowed
from ackservice.server.tls import RecordBoundaries
from tls_support import TLSFiles


def test_allow_matches_ipv4_mapped_addresses() -> None:
    networks = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32"))
    assert _allowed("192.0.2.9", networks)
    assert _allowed("::ffff:192.0.2.9", networks)
    assert _allowed("2001:db8::1", networks)
    assert not _allowed("127.0.0.1", networks)
    assert not _allowed("::1", networks)
    assert not _allowed("not an address", networks)


def test_unusable_certificate_files_are_named(tls_files: TLSFiles, tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match=r"cannot read --tls-cert '.*missing.pem'"):
        server_tls_context(tmp_path / "missing.pem")
    with pytest.raises(TLSConfigError, match="does not match the certificate"):
        server_tls_context(tls_files.server_cert, tls_files.client_key)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TLSConfigError, match="no PEM certificate in --tls-cert") as info:
        server_tls_context(garbage)
    assert str(info.value).endswith("openssl x509 -inform DER -in FILE -out FILE.pem")
    with pytest.raises(TLSConfigError, match="no PEM private key in --tls-key") as info:
        server_tls_context(tls_files.server_cert, garbage)
    assert str(info.value).endswith("openssl pkey -inform DER -in FILE -out FILE.pem")
    with pytest.raises(TLSConfigError, match=r"no private key in --tls-cert .* --tls-key"):
        server_tls_context(tls_files.server_cert)  # the chain without its key
    with pytest.raises(TLSConfigError, match="client CA"):
        server_tls_context(tls_files.server_cert, tls_files.server_key, garbage)


def test_a_fifo_or_directory_is_refused_at_once(tls_files: TLSFiles, tmp_path: Path) -> None:
    """A FIFO given as a certificate (a mistake) once blocked start-up until something
    wrote to it; now it, and a directory, are refused with one line naming the flag."""
    fifo = tmp_path / "cert.fifo"
    os.mkfifo(fifo)
    cases = [
        ((fifo,), "--tls-cert", "FIFO or device"),
        ((tls_files.server_cert, fifo), "--tls-key", "FIFO or device"),
        ((tls_files.server_cert, tls_files.server_key, tmp_path), "--tls-client-ca", "directory"),
    ]
    for args, flag, kind in cases:
        errors: list[BaseException] = []

        def load(args: tuple[Path, ...] = args, errors: list[BaseException] = errors) -> None:
            try:
                server_tls_context(*args)
            except TLSConfigError as exc:
                errors.append(exc)

        loader = threading.Thread(target=load, daemon=True)  # a hang must fail, not block
        loader.start()
        loader.join(10)
        assert not loader.is_alive(), f"{flag} {args[-1]}: still opening"
        [error] = errors
        assert f"cannot read {flag}" in str(error)
        assert f"{kind}, not a regular file" in str(error)


def test_a_passphrase_protected_key_is_refused_without_a_prompt(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    """OpenSSL would ask for the passphrase on the terminal (a start-up waiting for a
    typist; without a terminal, "cannot read --tls-cert: Invalid argument"): one line
    instead, naming the flag, for a key of its own and one in the certificate file."""
    key = serialization.load_pem_private_key(tls_files.server_key.read_bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    key_file = tmp_path / "encrypted-key.pem"
    key_file.write_bytes(encrypted)
    both = tmp_path / "cert-and-encrypted-key.pem"
    both.write_bytes(tls_files.server_cert.read_bytes() + encrypted)
    for args, flag in [((tls_files.server_cert, key_file), "--tls-key"), ((both,), "--tls-cert")]:
        with pytest.raises(TLSConfigError, match=f"the key in {flag} .* is passphrase-protected"):
            server_tls_context(*args)


def test_cli_exits_2_with_one_line_for_a_bad_certificate(
    tls_files: TLSFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    code = server_main(
        [
            "--port",
            "0",
            "--tls-cert",
            str(tls_files.server_cert),
            "--tls-key",
            str(tls_files.client_key),
        ],
        environ={},
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "does not match" in err
    assert "Traceback" not in err


@given(
    st.lists(st.integers(0, 17000), min_size=1, max_size=8),
    st.lists(st.integers(1, 40000), max_size=12),
)
def test_record_boundaries_are_followed_through_any_slicing(
    lengths: list[int], cuts: list[int]
) -> None:
    """After every piece, ``tail`` is the bytes of the last, incomplete record fed."""
    stream = b"".join(
        bytes([23, 3, 3, length >> 8, length & 0xFF]) + b"\x00" * length for length in lengths
    )
    ends = []
    at = 0
    for length in lengths:
        at += 5 + length
        ends.append(at)
    positions = sorted({min(cut, len(stream)) for cut in cuts} | {len(stream)})
    boundaries = RecordBoundaries()
    fed = 0
    for position in positions:
        boundaries.feed(stream[fed:position])
        fed = position
        last_end = max([0, *(end for end in ends if end <= fed)])
        assert boundaries.tail == fed - last_end
