"""TLS for the server: its context, what a failure is called, and who the client is.

Pure helpers with no I/O of their own besides reading the certificate files; the transport
that speaks TLS on a connection is ``tls_transport.py``.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from .._files import pem_problem, read_regular_file

__all__ = [
    "RecordBoundaries",
    "TLSConfigError",
    "TLSFailure",
    "describe_ssl_error",
    "looks_like_client_hello",
    "peer_identity",
    "server_tls_context",
]

# Short names for the subject attributes people write (RFC 4514); others keep Python's name.
_ATTRIBUTE_NAMES: Final = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


class TLSConfigError(Exception):
    """A certificate, key or CA file cannot be used; the message names the file."""


class TLSFailure(Exception):
    """A connection's TLS failed (handshake, timeout, a record that does not decrypt).

    Attributes:
        reason: the close reason for the log (``tls-handshake-failed``, ``tls-required``, ...).
        detail: what happened, in words (OpenSSL's reason where there is one).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def server_tls_context(
    cert: str | Path,
    key: str | Path | None = None,
    client_ca: str | Path | None = None,
    *,
    names: Mapping[str, str] | None = None,
) -> ssl.SSLContext:
    """The server's TLS context: TLS 1.2 at least, the certificate chain in ``cert`` (its key
    in ``key``, or in ``cert`` too), and with ``client_ca`` a client certificate signed by
    that CA required of every client (mutual TLS).

    Args:
        names: what error messages call each file's setting, by flag
            (``{"--tls-cert": "ACKSERVICE_TLS_CERT"}`` when it came from the environment);
            a setting not in it is called by its flag.

    Raises:
        TLSConfigError: a file is missing, unreadable, not PEM, or the key does not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Client-initiated renegotiation (TLS 1.2) only costs the server CPU.
    context.options |= ssl.OP_NO_RENEGOTIATION
    # No TLS 1.3 session tickets: issuing them cost ~25% of a full handshake's server CPU
    # here (~370 vs ~265 us), and the clients of an ack service (ours, Trio's, the load
    # generator) hold long connections and do not resume sessions.
    context.num_tickets = 0
    names = {} if names is None else names
    cert_name = names.get("--tls-cert", "--tls-cert")
    key_name = names.get("--tls-key", "--tls-key")
    cert_text = _read(cert, cert_name)
    key_text = cert_text if key is None else _read(key, key_name)
    key_setting = cert_name if key is None else key_name
    # OpenSSL says "PEM lib" for either of these: say which.
    problem = pem_problem(cert_text, f"{cert_name} {str(cert)!r}", "certificate")
    if problem is None and key is not None:
        problem = pem_problem(key_text, f"{key_name} {str(key)!r}", "private key")
    if problem is not None:
        raise TLSConfigError(problem)
    if key is None and b"PRIVATE KEY-----" not in cert_text:
        raise TLSConfigError(
            f"no private key in {cert_name} {str(cert)!r}: give it with --tls-key "
            "(or put it in the certificate file)"
        )
    encrypted = (
        f"the key in {key_setting} {str(key or cert)!r} is passphrase-protected, which is not "
        "supported; decrypt it (openssl pkey -in KEY -out PLAIN_KEY)"
    )
    if b"ENCRYPTED" in key_text:
        raise TLSConfigError(encrypted)

    def no_passphrase() -> str:
        # Without a callback OpenSSL asks for the passphrase on the terminal: a start-up
        # that waits for a typist (or, without a terminal, a misleading "Invalid argument").
        raise TLSConfigError(encrypted)

    try:
        context.load_cert_chain(cert, key, password=no_passphrase)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(
                f"the key {str(key or cert)!r} does not match the certificate {str(cert)!r}"
            ) from None
        where = f"{str(cert)!r}" if key is None else f"{str(cert)!r} / {str(key)!r}"
        raise TLSConfigError(
            f"cannot load the certificate and key from {where}: {describe_ssl_error(exc)} "
            "(expected PEM; give the key with --tls-key unless it is in the certificate file)"
        ) from None
    except OSError as exc:
        raise TLSConfigError(f"cannot read {str(cert)!r}: {exc.strerror or exc}") from None
    if client_ca is not None:
        _read(client_ca, names.get("--tls-client-ca", "--tls-client-ca"))
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as exc:
            detail = describe_ssl_error(exc) if isinstance(exc, ssl.SSLError) else exc.strerror
            raise TLSConfigError(
                f"cannot load the client CA {str(client_ca)!r}: {detail} (expected PEM)"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _read(path: str | Path, setting: str) -> bytes:
    try:
        return read_regular_file(path)
    except OSError as exc:
        raise TLSConfigError(
            f"cannot read {setting} {str(path)!r}: {exc.strerror or exc}"
        ) from None


def describe_ssl_error(exc: ssl.SSLError) -> str:
    """OpenSSL's reason in words (``certificate verify failed: ...``), without the noise."""
    verify = getattr(exc, "verify_message", None)
    if verify:
        return f"certificate verify failed: {verify}"
    reason = exc.reason or ""
    if reason:
        return reason.lower().replace("_", " ")
    return str(exc.args[1] if len(exc.args) > 1 else exc)


def looks_like_client_hello(data: bytes) -> bool:
    """Whether ``data``, a connection's first bytes, start a TLS ClientHello: a handshake
    record (22) of TLS 1.x carrying a ClientHello (1)."""
    return len(data) >= 6 and data[0] == 0x16 and data[1] == 0x03 and data[5] == 0x01


def peer_identity(certificate: dict[str, Any] | None) -> str | None:
    """A verified client certificate's subject as one string (``O=Example,CN=alice``), in the
    certificate's own order (as ``openssl x509 -subject`` prints it); None without one."""
    if not certificate:
        return None
    parts = []
    for rdn in certificate.get("subject", ()):
        for name, value in rdn:
            text = str(value).replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")
            parts.append(f"{_ATTRIBUTE_NAMES.get(name, name)}={text}")
    return ",".join(parts) or None


_RECORD_HEADER: Final = 5  # content type, version (2 bytes), length (2 bytes)


class RecordBoundaries:
    """Follows where TLS records begin and end in a stream of bytes fed piece by piece, so a
    reader knows whether a complete record waits without asking OpenSSL (which answers "no"
    by raising an exception).

    ``tail`` is how many bytes of the last, still incomplete record were fed (0 when the
    bytes so far end on a record boundary).
    """

    __slots__ = ("_body_left", "_header", "tail")

    def __init__(self) -> None:
        self._header = b""  # a partial record header at the end of what was fed
        self._body_left = 0  # bytes still to come of the last record's body
        self.tail = 0

    def feed(self, data: bytes) -> None:
        end = len(data)
        if (
            not self._body_left
            and not self._header
            and end >= _RECORD_HEADER
            and end == _RECORD_HEADER + (data[3] << 8 | data[4])
        ):
            self.tail = 0  # exactly one whole record: request/response's every read
            return
        at = 0
        if self._body_left:
            if self._body_left > end:
                self._body_left -= end
                self.tail += end
                return
            at, self._body_left = self._body_left, 0
        elif self._header:
            header = self._header + data[: _RECORD_HEADER - len(self._header)]
            at = len(header) - len(self._header)
            if len(header) < _RECORD_HEADER:
                self._header = header
                self.tail = len(header)
                return
            self._header = b""
            body_end = at + (header[3] << 8 | header[4])
            if body_end > end:
                self._body_left = body_end - end
                self.tail = _RECORD_HEADER + end - at
                return
            at = body_end
        while at + _RECORD_HEADER <= end:
            record_end = at + _RECORD_HEADER + (data[at + 3] << 8 | data[at + 4])
            if record_end > end:
                self._body_left = record_end - end
                self.tail = end - at
                return
            at = record_end
        self._header = data[at:]
        self.tail = end - at
