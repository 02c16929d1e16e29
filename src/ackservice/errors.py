"""The exceptions ackservice raises: one base class, split by who is at fault.

As in h11, "you misused the API" (plain ``ValueError``/``TypeError``) is kept apart from
"the peer or the network failed" (everything below ``AckServiceError``).
"""

from __future__ import annotations

__all__ = [
    "AckMismatchError",
    "AckServiceError",
    "AckTimeoutError",
    "ConnectError",
    "ConnectionLostError",
    "MessageRejectedError",
    "ProtocolError",
    "Reject",
    "ServerRefusedError",
    "TLSError",
]


class AckServiceError(Exception):
    """Base class of every error ackservice raises about the service or the network."""


class ProtocolError(AckServiceError, ValueError):
    """The peer sent bytes that are not valid protocol (for example a malformed reply line)."""


class ConnectError(AckServiceError):
    """The server could not be reached (after every retry the caller allowed), or refused
    this client for good (the subclasses)."""


class TLSError(ConnectError):
    """TLS failed: the server's certificate did not verify, the handshake failed, the server
    sent an alert (it refused the client certificate), or it does not speak TLS at all.

    Never retried: a reconnect meets the same certificates. ``reason`` is OpenSSL's reason
    code (``CERTIFICATE_VERIFY_FAILED``, ``TLSV13_ALERT_CERTIFICATE_REQUIRED``, ...), or
    ``""`` when OpenSSL gave none.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class ServerRefusedError(ConnectError):
    """The server refused this client with a final ``ERR 0`` (``forbidden``: its ``--allow``
    does not admit this address; ``tls-required``: the port serves TLS only).

    Never retried: the next connection would be refused the same way.
    """

    def __init__(self, message: str, code: str, detail: str) -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


class ConnectionLostError(AckServiceError):
    """The connection ended before every message was acknowledged.

    ``reason`` is the server's ``ERR 0`` code when it said why (``busy``, ``idle-timeout``,
    ``shutting-down``), else a short description such as ``"connection reset"``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class AckTimeoutError(AckServiceError):
    """A message waited longer than the acknowledgment timeout for its reply."""


class AckMismatchError(AckServiceError):
    """A reply did not prove the message arrived intact (wrong seq, length or CRC-32)."""


class MessageRejectedError(AckServiceError):
    """The server answered a message with ``ERR <seq> <code> <detail>``."""

    def __init__(self, seq: int, code: str, detail: str) -> None:
        super().__init__(f"message {seq} not accepted: {code}: {detail}")
        self.seq = seq
        self.code = code
        self.detail = detail


class Reject(Exception):
    """Raised by a server application hook to refuse a message.

    The client receives ``ERR <seq> rejected <reason>``; the connection carries on.

    Raises:
        TypeError: ``reason`` is not a ``str`` (bytes included): here, in the hook that
            made it, rather than later in the server, where it would end the connection.
    """

    def __init__(self, reason: str) -> None:
        if not isinstance(reason, str):
            raise TypeError(f"a Reject reason must be str, not {type(reason).__name__}")
        super().__init__(reason)
        self.reason = reason
