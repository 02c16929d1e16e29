"""systemd's side for the tests: a notify socket to receive READY=1/STOPPING=1 on, and the
exec step of socket activation (an inherited socket as descriptor 3, LISTEN_PID set)."""

from __future__ import annotations

import socket
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Plays systemd's exec step: the inherited socket becomes descriptor 3 and LISTEN_PID the
# pid of the process that will serve (this one, as it execs the server).
_ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def socket_activated(fd: int) -> dict[str, Any]:
    """``server_process`` options that start the server as systemd would with the listening
    socket ``fd`` (add ``LISTEN_FDS`` to its ``env``)."""
    return {"prefix": [sys.executable, "-c", _ACTIVATE, str(fd)], "pass_fds": [fd]}


@contextmanager
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in the abstract namespace, as systemd's NOTIFY_SOCKET, and its
    ``@name``."""
    name = f"ackservice-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(15)
        yield sock, "@" + name


def notify_fields(datagram: bytes) -> dict[str, str]:
    """A notification's ``KEY=value`` lines as a dict."""
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())
