"""The application hook: the simple, per-message alternative to a ``Store``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog
import trio

from ..errors import Reject
from ..store.base import Failed, Message, Rejected, Unavailable, Verdict
from .ratelimit import WarningLimiter

__all__ = ["HookCommitter", "MessageContext", "MessageHook"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class MessageContext:
    """What the application hook learns about a message besides its payload."""

    conn_id: int
    peer: str
    seq: int
    identity: str | None = None
    """The authenticated client (its TLS client certificate's subject), if any."""


MessageHook = Callable[[bytes, MessageContext], Awaitable[None]]
"""``async def on_message(payload, context)``: return to accept (the ACK is sent after it
returns), raise ``Reject("reason")`` to refuse; any other exception is an internal error.
A hook that does not return within the hook timeout gets its message answered
``unavailable`` (safe to resend)."""


class HookCommitter:
    """Runs the hook for each message of a connection's read, in the connection's own task
    (so a slow hook delays only its own connection), message by message.

    Args:
        hook: the application's ``on_message``.
        timeout: seconds one call may take before its message is answered ``unavailable``.
    """

    __slots__ = ("_hook", "_timeout")

    def __init__(self, hook: MessageHook, *, timeout: float) -> None:
        self._hook = hook
        self._timeout = timeout

    def has_room(self) -> bool:
        return True  # nothing is queued: each connection waits for its own hook calls

    async def wait_for_room(self) -> None:
        """Never waits (see ``has_room``)."""

    async def commit(
        self, messages: Sequence[Message], nbytes: int, warnings: WarningLimiter | None = None
    ) -> Sequence[Verdict] | None:
        if warnings is not None:
            return [await self._call(message, warnings) for message in messages]
        own = WarningLimiter()  # called without a connection's: limit this batch alone
        try:
            return [await self._call(message, own) for message in messages]
        finally:
            own.flush()

    async def _call(self, message: Message, warnings: WarningLimiter) -> Verdict:
        context = MessageContext(message.conn_id, message.peer, message.seq, message.identity)
        with trio.move_on_after(self._timeout):
            try:
                await self._hook(message.payload, context)
            except Reject as rejection:
                return Rejected(rejection.reason)
            except (Exception, SystemExit) as exc:
                # Contained like any failure: one application bug must not stop the server.
                # Trio's Cancelled and KeyboardInterrupt still propagate (they are how the
                # server itself is stopped).
                # Rate-limited per connection: a hook failing on every message must not
                # turn each one into a traceback in the log.
                warnings.warn(log.error, "on_message_failed", seq=message.seq, exc_info=exc)
                return Failed("the application failed on this message")
            return None
        warnings.warn(log.warning, "on_message_timed_out", seq=message.seq, timeout=self._timeout)
        return Unavailable(f"the application did not answer within {self._timeout:g} s")
