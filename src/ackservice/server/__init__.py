"""The ackservice server: embed ``AckHandler`` or ``serve`` in any Trio application.

Use ``server = await nursery.start(serve, ServerConfig(port=0))``, then ``server.port``;
or pass an ``AckHandler`` to ``trio.serve_tcp``. README.md shows both. Give ``serve`` a
``store`` (``ackservice.store``) to keep every message before its ACK.
"""

from __future__ import annotations

from ..errors import Reject
from .config import ServerConfig
from .handler import AckHandler, ServerStats
from .hook import MessageContext, MessageHook
from .listener import Server, serve
from .tls import TLSConfigError, server_tls_context

__all__ = [
    "AckHandler",
    "MessageContext",
    "MessageHook",
    "Reject",
    "Server",
    "ServerConfig",
    "ServerStats",
    "TLSConfigError",
    "serve",
    "server_tls_context",
]
