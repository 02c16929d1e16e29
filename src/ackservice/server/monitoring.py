"""The monitoring endpoint: ``GET /metrics``, ``/healthz`` and ``/readyz`` over HTTP/1.1.

Three fixed GET paths do not need an HTTP library (h11 is not among our dependencies, and a
web framework would be most of the process); what they need is to be robust against the
clients a port on a network meets: a request head is bounded (8 KiB, as nginx's default
``client_header_buffer_size`` is 1 KiB and its large buffers 8 KiB), a client has 5 s to send
it (one that connects and never sends is dropped, as Prometheus itself times scrapes out
after 10 s), at most 16 clients are served at once (beyond that, a newcomer takes the place of
the oldest client still silent, so idle connections cannot shut the health check out; if all
16 are being answered, the newcomer is closed at once), and every
response closes its connection (no keep-alive state to get wrong). Request parsing is plain
synchronous code (``parse_request_head``); the Trio side only moves bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog
import trio

from .sockets import format_address

__all__ = [
    "MAX_CLIENTS",
    "MAX_REQUEST_BYTES",
    "REQUEST_TIMEOUT",
    "BadRequest",
    "MetricsPortError",
    "MonitoringApp",
    "Response",
    "format_address",
    "open_monitoring_listeners",
    "parse_request_head",
    "serve_monitoring",
]

log = structlog.get_logger(__name__)

MAX_REQUEST_BYTES: Final = 8192
REQUEST_TIMEOUT: Final = 5.0
MAX_CLIENTS: Final = 16
# Writing the response is bounded too: a client that never reads cannot hold a slot.
_SEND_TIMEOUT: Final = 5.0

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"
METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


class BadRequest(Exception):
    """The request head is not one we answer; ``status`` says how to refuse it."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = _TEXT

    def encode(self, *, head_only: bool = False) -> bytes:
        """The whole response, closing the connection."""
        head = (
            f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Unknown')}\r\n"
            f"Content-Type: {self.content_type}\r\n"
            f"Content-Length: {len(self.body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        return head if head_only else head + self.body


def parse_request_head(data: bytes) -> tuple[str, str] | None:
    """The method and path (query string dropped) of the request head in ``data``, or None
    while the head is not complete.

    Raises:
        BadRequest: too long (431) or not an HTTP/1.x request line (400).
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")  # bare newlines, as some hand-typed clients send
    if end < 0:
        if len(data) >= MAX_REQUEST_BYTES:
            raise BadRequest(431, "request head too long")
        return None
    if end > MAX_REQUEST_BYTES:
        raise BadRequest(431, "request head too long")
    line = data[: data.find(b"\n")].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise BadRequest(400, "not an HTTP/1.x request")
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, "request line is not ASCII") from None
    return method, target.split("?", 1)[0]


class MonitoringApp:
    """What each path answers.

    Args:
        render_metrics: the Prometheus text exposition, made at each scrape.
        accepting: whether the server accepts connections (``/healthz``: 200, else 503).
        store_available: whether the store takes messages (``/readyz``, with ``accepting``).
        stopping: whether a graceful shutdown began, when not accepting can also mean
            that no worker serves yet (a supervisor); without it, not accepting is stopping.
    """

    def __init__(
        self,
        render_metrics: Callable[[], bytes],
        accepting: Callable[[], bool],
        store_available: Callable[[], bool],
        *,
        stopping: Callable[[], bool] | None = None,
    ) -> None:
        self._render_metrics = render_metrics
        self._accepting = accepting
        self._store_available = store_available
        self._stopping = stopping

    def _not_accepting(self) -> Response:
        # The body is what an operator reads when a health check fails: say which it is.
        if self._stopping is None or self._stopping():
            return Response(503, b"shutting down\n")
        return Response(503, b"no worker serving yet\n")

    def respond(self, method: str, path: str) -> Response:
        if method not in ("GET", "HEAD"):
            return Response(405, b"only GET and HEAD\n")
        if path == "/metrics":
            return Response(200, self._render_metrics(), METRICS_CONTENT_TYPE)
        if path == "/healthz":
            if self._accepting():
                return Response(200, b"ok\n")
            return self._not_accepting()
        if path == "/readyz":
            if not self._accepting():
                return self._not_accepting()
            if not self._store_available():
                return Response(503, b"store unavailable\n")
            return Response(200, b"ready\n")
        return Response(404, b"try /metrics, /healthz or /readyz\n")


async def serve_monitoring(
    listeners: list[trio.SocketListener],
    app: MonitoringApp,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer monitoring requests on ``listeners`` until cancelled."""
    clients = _Clients(app)
    await trio.serve_listeners(clients.serve_one, listeners, task_status=task_status)


class _Clients:
    def __init__(self, app: MonitoringApp) -> None:
        self._app = app
        self._active = 0
        # The scopes of the clients still waiting for their request head, oldest first.
        self._silent: dict[trio.CancelScope, None] = {}

    async def serve_one(self, stream: trio.SocketStream) -> None:
        """Answer one request and close; never raises into the accept loop."""
        if self._active >= MAX_CLIENTS:
            if not self._silent:
                await trio.aclose_forcefully(stream)
                return
            oldest = next(iter(self._silent))
            del self._silent[oldest]
            oldest.cancel()  # dropped, as at its request timeout
        self._active += 1
        try:
            await self._answer(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            pass  # the client went away or stalled: nothing to tell anyone
        except Exception:
            log.exception("monitoring_request_failed")
        finally:
            self._active -= 1
            await trio.aclose_forcefully(stream)

    async def _answer(self, stream: trio.SocketStream) -> None:
        request = None
        data = b""
        with trio.move_on_after(REQUEST_TIMEOUT) as waiting:
            self._silent[waiting] = None
            try:
                while request is None:
                    chunk = await stream.receive_some(MAX_REQUEST_BYTES)
                    if not chunk:
                        return
                    data += chunk
                    request = parse_request_head(data)
            except BadRequest as exc:
                response = Response(exc.status, f"{exc}\n".encode())
                with trio.fail_after(_SEND_TIMEOUT):
                    await stream.send_all(response.encode())
                return
            finally:
                self._silent.pop(waiting, None)
        if request is None:
            return  # connected and never sent a whole request: dropped
        method, path = request
        try:
            response = self._app.respond(method, path)
        except Exception:
            log.exception("monitoring_request_failed", path=path)
            response = Response(500, b"internal error\n")
        with trio.fail_after(_SEND_TIMEOUT):
            await stream.send_all(response.encode(head_only=method == "HEAD"))


class MetricsPortError(Exception):
    """The ``--metrics-port`` could not be bound.

    Attributes:
        host, port: the address that could not be bound.
        reason: why, in words.
        errno: the ``OSError``'s errno, if it had one.
    """

    def __init__(self, host: str, port: int, reason: str, errno: int | None = None) -> None:
        self.host = host
        self.port = port
        self.reason = reason
        self.errno = errno
        super().__init__(self.describe())

    def describe(
        self, host_setting: str = "--metrics-host", port_setting: str = "--metrics-port"
    ) -> str:
        """The one-line error, naming the settings to check as the user gave them."""
        return (
            f"cannot serve metrics on {format_address((self.host, self.port))}: {self.reason}; "
            f"check {host_setting} and {port_setting}"
        )


async def open_monitoring_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Bind the monitoring endpoint (plain SO_REUSEADDR, never SO_REUSEPORT: every scrape
    must reach the one process that sees all the counts).

    Raises:
        MetricsPortError: it could not be bound; the message names the settings to check.
    """
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise MetricsPortError(host, port, exc.strerror or str(exc), exc.errno) from exc
