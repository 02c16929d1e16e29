"""ackservice: every message answered with an acknowledgment that proves it arrived intact.

The wire protocol is in ``ackservice.protocol`` (sans-IO), the server in
``ackservice.server`` and the async client in ``ackservice.client``.
"""

from __future__ import annotations

__version__ = "0.1.0"
