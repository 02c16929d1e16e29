"""TLS for the client and the bench: the context, the handshake, and what a failure means.

Every TLS failure the client can meet is final: retrying cannot fix a certificate. Each
becomes a ``TLSError`` whose message is one line: what failed, OpenSSL's reason, and what to
do. Where each failure surfaces (measured with Trio's ``SSLStream`` over loopback):

- a certificate that does not verify (wrong CA, wrong name): ``do_handshake``, as a
  ``trio.BrokenResourceError`` whose ``__cause__`` is an ``ssl.SSLCertVerificationError``;
- a port that does not serve TLS: ``do_handshake`` too; ``WRONG_VERSION_NUMBER`` when the
  server answered in plaintext, ``SSLEOFError`` when it closed the connection;
- a server that refuses the client certificate: with TLS 1.3 the client's handshake has
  already completed when the server checks the certificate, so its alert
  (``certificate required``, ``unknown ca``) arrives on the first ``receive_some`` after the
  handshake, as a ``BrokenResourceError`` caused by an ``ssl.SSLError`` (with TLS 1.2, in
  ``do_handshake``). ackservice's server sends that alert. A server that closes without
  sending it (Trio's own ``SSLStream`` does not flush it when its handshake fails) looks
  like any truncated connection: the client cannot tell it from a crash, so that one is
  retried.
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
from collections.abc import Callable, Mapping
from typing import Any, Final, NoReturn

import trio

from .. import _cli
from .._files import pem_problem, read_regular_file
from ..errors import TLSError

__all__ = [
    "TLS_CLOSE_TIMEOUT",
    "client_tls_context",
    "close_stream",
    "context_from_flags",
    "is_truncated",
    "start_tls",
    "tls_refusal",
]

# Sending close_notify is one small write; it waits only when the peer stopped reading and
# the socket buffer is full, and then no clean end is possible anyway.
TLS_CLOSE_TIMEOUT: Final = 1.0

StrPath = str | os.PathLike[str]

# OpenSSL's reasons when the peer's bytes are not TLS at all (a plaintext server answered).
_NOT_TLS_REASONS: Final = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "UNKNOWN_PROTOCOL",
        "HTTP_REQUEST",
        "PACKET_LENGTH_TOO_LONG",
        "RECORD_LAYER_FAILURE",
        "UNEXPECTED_EOF_WHILE_READING",
    }
)
# X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH: the certificate is
# valid, for another name.
_NAME_MISMATCH_CODES: Final = frozenset({62, 64})
_CLIENT_CERTIFICATE_ALERTS: Final = frozenset(
    {
        "BAD_CERTIFICATE",
        "UNKNOWN_CA",
        "CERTIFICATE_UNKNOWN",
        "UNSUPPORTED_CERTIFICATE",
        "CERTIFICATE_EXPIRED",
        "CERTIFICATE_REVOKED",
        "ACCESS_DENIED",
        "DECRYPT_ERROR",
    }
)
_NO_COMMON_GROUND_ALERTS: Final = frozenset(
    {"PROTOCOL_VERSION", "HANDSHAKE_FAILURE", "INSUFFICIENT_SECURITY"}
)
_GENERAL_HINT: Final = "check --tls-ca, --tls-server-name and --tls-cert"
_OPENSSL_TEXT: Final = re.compile(r"^\[[^\]]*\]\s*(?P<text>.*?)\s*(?:\(_ssl\.c:\d+\))?$")


def client_tls_context(
    ca: StrPath | None = None,
    cert: StrPath | None = None,
    key: StrPath | None = None,
) -> ssl.SSLContext:
    """A TLS context for connecting to an ackservice server, verifying its certificate.

    Args:
        ca: PEM file of the CA(s) to trust instead of the system's (a private CA); ``None``
            trusts the system's CAs.
        cert: PEM file with the client certificate (and its chain), for servers that
            require one (mutual TLS); it may hold the private key too.
        key: PEM file with the client certificate's private key, when it is not in ``cert``.

    Returns:
        A context with TLS 1.2 as the minimum, hostname checking and certificate
        verification on (``ssl.create_default_context``), and the client certificate
        loaded if given. Pass it to ``open_client(tls=...)``.

    Raises:
        ValueError: a file cannot be read, holds no PEM certificate or key, the key is
            passphrase-protected, or the key does not match the certificate; the one-line
            message names the file and the problem.
    """
    return _tls_context(ca, cert, key, _FILE_NAMES)


# What messages call each file, by the flag that gives it: the library's words here; the
# CLIs' the setting as it was given (``--tls-ca``, or ``ACKSERVICE_CLIENT_TLS_CA`` when the
# value came from there), as the server's do.
_FILE_NAMES: Final = {
    "--tls-ca": "the TLS CA file",
    "--tls-cert": "the TLS client certificate",
    "--tls-key": "the TLS client key",
}


def _tls_context(
    ca: StrPath | None, cert: StrPath | None, key: StrPath | None, names: Mapping[str, str]
) -> ssl.SSLContext:
    """``client_tls_context``, its messages calling each file by ``names[flag]``."""
    if key is not None and cert is None:
        raise ValueError("a TLS client key needs its certificate (give cert as well)")
    cafile = None
    if ca is not None:
        _require_pem(ca, names["--tls-ca"], "certificate")
        cafile = os.fspath(ca)
    try:
        # With a CA file, that file alone is trusted; without, the system's CAs.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    except ssl.SSLError as exc:
        raise ValueError(
            f"cannot load {names['--tls-ca']} {cafile!r}: {_openssl_text(exc)}; check that "
            "each certificate in it is whole (openssl x509 -in FILE -noout -text)"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        _load_client_certificate(context, cert, key, names)
    return context


def _load_client_certificate(
    context: ssl.SSLContext, cert: StrPath, key: StrPath | None, names: Mapping[str, str]
) -> None:
    cert_name = f"{names['--tls-cert']} {os.fspath(cert)!r}"
    cert_text = _require_pem(cert, names["--tls-cert"], "certificate")
    if key is None:
        if b"PRIVATE KEY-----" not in cert_text:
            raise ValueError(
                f"no private key in {cert_name}: give {names['--tls-key']} as well "
                "(or put the key in the certificate file)"
            )
        key_text, key_name = cert_text, cert_name
    else:
        key_text = _require_pem(key, names["--tls-key"], "private key")
        key_name = f"{names['--tls-key']} {os.fspath(key)!r}"
    if b"ENCRYPTED" in key_text:
        raise ValueError(
            f"the key in {key_name} is passphrase-protected, which is not supported; "
            "decrypt it (openssl pkey -in KEY -out PLAIN_KEY)"
        )

    def no_passphrase() -> str:
        # Without a callback OpenSSL would prompt on the terminal, and hang a service.
        raise ValueError(f"the key in {key_name} is passphrase-protected")

    try:
        context.load_cert_chain(
            os.fspath(cert), None if key is None else os.fspath(key), password=no_passphrase
        )
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(
                f"the key in {key_name} does not match the certificate in {cert_name}"
            ) from None
        where = cert_name if key is None else f"{cert_name} and {key_name}"
        raise ValueError(
            f"cannot load the certificate and key from {where}: {_openssl_text(exc)}"
        ) from None


def _require_pem(path: StrPath, setting: str, kind: str) -> bytes:
    """The file's bytes, after checking that it can be read and holds a PEM ``kind``
    (``certificate`` or ``private key``); ``setting`` is what messages call it."""
    name = f"{setting} {os.fspath(path)!r}"
    try:
        text = read_regular_file(path)
    except OSError as exc:
        # The server's words (server/tls.py), so that both say it alike.
        raise ValueError(f"cannot read {name}: {exc.strerror or exc}") from None
    problem = pem_problem(text, name, kind)
    if problem is not None:
        raise ValueError(problem)
    return text


async def start_tls(
    transport: trio.abc.Stream, context: ssl.SSLContext, server_name: str
) -> trio.SSLStream[Any]:
    """Run the TLS handshake over ``transport``; the stream is verified when this returns.

    ``https_compatible=False``: closing sends close_notify, and a peer that closes without
    one is reported as a truncation, not taken for a clean end.

    Raises:
        TLSError: verification failed, the server refused the handshake, or it does not
            speak TLS (final; ``transport`` is closed).
        trio.BrokenResourceError: the connection was reset during the handshake (not
            about TLS: retried like a refused connection).
    """
    stream = trio.SSLStream(transport, context, server_hostname=server_name)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLError):
            raise _handshake_failure(cause) from cause
        raise
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


def tls_refusal(exc: BaseException, server: str) -> TLSError | None:
    """The ``TLSError`` behind a broken TLS stream to ``server``, or ``None`` if it is not one.

    A fatal alert (the server refused the client certificate) or a record that fails to
    decrypt is final. A connection closed without close_notify (``SSLEOFError``) is not:
    the server may have crashed or restarted, exactly as for a reset over plain TCP.
    """
    cause = exc.__cause__
    if not isinstance(cause, ssl.SSLError) or isinstance(
        cause, ssl.SSLEOFError | ssl.SSLSyscallError
    ):
        return None
    reason = cause.reason or ""
    return TLSError(
        f"{server} refused the TLS connection: {_openssl_text(cause)}; {_alert_hint(reason)}",
        reason,
    )


def is_truncated(exc: BaseException) -> bool:
    """Whether a broken TLS stream ended without close_notify (the TCP connection closed)."""
    return isinstance(exc.__cause__, ssl.SSLEOFError)


async def close_stream(stream: trio.abc.Stream) -> None:
    """Close ``stream``; a TLS stream first sends close_notify, so the server sees a clean
    end rather than a truncation. Bounded by ``TLS_CLOSE_TIMEOUT`` and shielded, since it
    runs where the connection's tasks are being cancelled."""
    if isinstance(stream, trio.SSLStream):
        deadline = trio.current_time() + TLS_CLOSE_TIMEOUT
        # Broken: the server went first; the socket is closed all the same.
        with (
            trio.CancelScope(deadline=deadline, shield=True),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await stream.aclose()
    await trio.aclose_forcefully(stream)


def _handshake_failure(cause: ssl.SSLError) -> TLSError:
    reason = cause.reason or ""
    text = _openssl_text(cause)
    if isinstance(cause, ssl.SSLCertVerificationError):
        if cause.verify_code in _NAME_MISMATCH_CODES:
            hint = (
                "check --tls-server-name (a name in the server's certificate; the default "
                "is the host connected to)"
            )
        else:
            hint = "check --tls-ca (the CA that signed the server's certificate)"
        return TLSError(
            f"TLS handshake failed: the server's certificate did not verify: "
            f"{cause.verify_message.rstrip('.')}; {hint}",
            reason,
        )
    if isinstance(cause, ssl.SSLEOFError | ssl.SSLSyscallError) or reason in _NOT_TLS_REASONS:
        return TLSError(
            f"the server did not answer in TLS ({text}); is the port serving TLS? "
            "(if not, connect without --tls and --tls-ca)",
            reason,
        )
    if "_ALERT_" in reason:
        return TLSError(
            f"the server refused the TLS handshake: {text}; {_alert_hint(reason)}", reason
        )
    return TLSError(f"TLS handshake failed: {text}; {_GENERAL_HINT}", reason)


def _alert_hint(reason: str) -> str:
    """What to do about the alert named by OpenSSL's ``reason`` (``TLSV1_ALERT_UNKNOWN_CA``)."""
    alert = reason.partition("_ALERT_")[2]
    if alert == "CERTIFICATE_REQUIRED":
        return "the server requires a client certificate: give --tls-cert (and --tls-key)"
    if alert in _CLIENT_CERTIFICATE_ALERTS:
        return (
            "the server did not accept the client certificate: check --tls-cert and "
            "--tls-key (signed by a CA the server trusts, and still valid)"
        )
    if alert in _NO_COMMON_GROUND_ALERTS:
        return "no TLS version or cipher in common with the server (TLS 1.2 is the minimum)"
    return _GENERAL_HINT


def _openssl_text(exc: ssl.SSLError) -> str:
    """OpenSSL's words without the decoration: ``tlsv13 alert certificate required``."""
    raw = exc.strerror if isinstance(exc.strerror, str) else str(exc)
    match = _OPENSSL_TEXT.match(raw)
    text = match.group("text") if match else raw
    return text or (exc.reason or type(exc).__name__).lower().replace("_", " ")


def context_from_flags(args: Any, error: Callable[[str], NoReturn]) -> ssl.SSLContext | None:
    """The TLS context the CLI flags (``--tls``, ``--tls-ca``, ``--tls-cert``, ``--tls-key``,
    ``--tls-server-name`` in ``args``) ask for, ``None`` for plain TCP; flags that do not
    fit together, or files that cannot serve, go to ``error`` (a usage error, one line
    naming the setting as it was given: the flag, or its environment variable)."""
    names = _cli.setting_names(args, ("--tls-ca", "--tls-cert", "--tls-key", "--tls-server-name"))
    if not (args.tls or args.tls_ca):
        for flag in ("--tls-cert", "--tls-key", "--tls-server-name"):
            if getattr(args, flag.removeprefix("--").replace("-", "_")) is not None:
                error(f"{names[flag]} applies only with --tls or --tls-ca")
        return None
    if args.tls_key is not None and args.tls_cert is None:
        error(f"{names['--tls-key']} needs --tls-cert (the certificate the key belongs to)")
    try:
        return _tls_context(args.tls_ca, args.tls_cert, args.tls_key, names)
    except ValueError as exc:
        error(str(exc))
