"""The application hook: what a server embedding ackservice supplies to accept messages."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

__all__ = ["MessageContext", "MessageHook"]


@dataclass(frozen=True, slots=True)
class MessageContext:
    """What the application hook learns about a message besides its payload."""

    conn_id: int
    peer: str
    seq: int


MessageHook = Callable[[bytes, MessageContext], Awaitable[None]]
"""``async def on_message(payload, context)``: return to accept (the ACK is sent after it
returns), raise ``Reject("reason")`` to refuse; any other exception is an internal error."""
