"""Closing a connection so that its last line is really delivered."""

from __future__ import annotations

from collections.abc import Callable

import trio

from ..protocol import CONNECTION_SEQ, err_line

__all__ = ["close_with_error"]

_DRAIN_READ_SIZE = 65536


async def close_with_error(
    stream: trio.abc.Stream,
    code: str,
    detail: str,
    drain_timeout: float,
    *,
    on_sent: Callable[[], object] | None = None,
) -> None:
    """Send ``ERR 0 <code> <detail>`` so that the peer really receives it, then stop.

    Closing a socket that still has unread input makes the kernel send a reset, which can
    destroy replies still in flight. So: send the line, half-close, then read and discard
    until the peer closes too or ``drain_timeout`` passes. The caller closes the stream.
    ``on_sent`` is called once the line is written, so a caller cancelled during the drain
    still knows the client was told.
    """
    with trio.move_on_after(drain_timeout):
        try:
            await stream.send_all(err_line(CONNECTION_SEQ, code, detail))
            if on_sent is not None:
                on_sent()
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            while await stream.receive_some(_DRAIN_READ_SIZE):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
