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
]


class AckServiceError(Exception):
    """Base class of every error ackservice raises about the service or the network."""


class ProtocolError(AckServiceError, ValueError):
    """The peer sent bytes that are not valid protocol (for example a malformed reply line)."""


class ConnectError(AckServiceError):
    """The server could not be reached (after every retry the caller allowed)."""


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
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
