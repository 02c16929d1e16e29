"""What systemd asks of a daemon: readiness notification and socket activation.

Both are small, documented protocols (``sd_notify(3)``, ``sd_listen_fds(3)``), written here
in a few lines rather than taken from a library (python-systemd needs libsystemd and a C
compiler; sdnotify is unmaintained):

- **Notification**: one datagram of ``KEY=VALUE`` lines to the ``AF_UNIX`` socket named by
  ``$NOTIFY_SOCKET`` (a path, or an abstract name when it starts with ``@``).
- **Socket activation**: systemd binds the sockets and starts the daemon with them open as
  file descriptors 3, 4, ...; ``$LISTEN_FDS`` says how many, ``$LISTEN_PID`` which process they
  are for (a child that inherited the environment must not take them), ``$LISTEN_FDNAMES``
  their names (``FileDescriptorName=``), colon-separated.

Neither imports Trio: the CLI turns the sockets into listeners.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

import structlog

__all__ = ["LISTEN_FDS_START", "ActivatedSocket", "Notifier", "take_listen_fds"]

log = structlog.get_logger(__name__)

LISTEN_FDS_START = 3
"""The first file descriptor systemd passes (``SD_LISTEN_FDS_START``)."""

_ACTIVATION_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class Notifier:
    """Sends state changes to systemd's ``$NOTIFY_SOCKET``; does nothing when it is unset.

    A socket that cannot be reached (it does not exist, systemd is gone) is logged once as
    ``notify_failed`` and the daemon goes on: readiness is a courtesy to the service manager,
    never a reason to stop serving.

    Args:
        address: the socket's name as ``$NOTIFY_SOCKET`` gives it (``@name``: abstract).
    """

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._failed = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier for ``$NOTIFY_SOCKET``, removed from the environment so that no child
        process (a worker, a hook's subprocess) speaks for this one."""
        environ = os.environ if environ is None else environ
        return cls(environ.pop("NOTIFY_SOCKET", None))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``fields`` (``ready=1, status="..."`` becomes ``READY=1\\nSTATUS=...``);
        whether the datagram was sent."""
        if self.address is None:
            return False
        text = "".join(f"{key.upper()}={value}\n" for key, value in fields.items())
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]  # Linux's abstract namespace
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(target)
                sock.sendall(text.encode())
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning(
                    "notify_failed",
                    socket=self.address,
                    error=exc.strerror or str(exc),
                    hint="NOTIFY_SOCKET names no socket listening; is systemd running this?",
                )
            return False
        return True


@dataclass(frozen=True, slots=True)
class ActivatedSocket:
    """A listening socket passed by the service manager."""

    sock: socket.socket
    name: str


def take_listen_fds(environ: MutableMapping[str, str] | None = None) -> list[ActivatedSocket]:
    """The sockets systemd passed to this process (none when not socket-activated).

    The ``LISTEN_*`` variables are removed from the environment, as ``sd_listen_fds(1)`` does,
    so that children do not take the sockets for theirs; the descriptors are marked
    close-on-exec for the same reason.

    Raises:
        ValueError: the variables are malformed, or a descriptor is not a listening stream
            socket (a ``ListenDatagram=`` or FIFO unit, a typo in the unit file).
    """
    environ = os.environ if environ is None else environ
    fds_text = environ.get("LISTEN_FDS")
    pid_text = environ.get("LISTEN_PID")
    names_text = environ.get("LISTEN_FDNAMES")
    for variable in _ACTIVATION_VARIABLES:
        environ.pop(variable, None)
    if not fds_text:
        return []
    try:
        count = int(fds_text)
        pid = int(pid_text or "")
    except ValueError:
        raise ValueError(
            f"LISTEN_FDS={fds_text!r} and LISTEN_PID={pid_text!r} must be integers"
        ) from None
    if pid != os.getpid() or count <= 0:
        return []  # meant for another process (we inherited its environment)
    names = names_text.split(":") if names_text else []
    activated = []
    for index in range(count):
        fd = LISTEN_FDS_START + index
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ValueError(f"LISTEN_FDS: descriptor {fd} is not a socket ({exc})") from None
        if (
            sock.family not in (socket.AF_INET, socket.AF_INET6)
            or sock.type != socket.SOCK_STREAM
            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        ):
            sock.detach()  # not ours to close: the unit is misconfigured, we exit
            raise ValueError(
                f"LISTEN_FDS: descriptor {fd} is not a listening TCP socket "
                "(use ListenStream= with an IP address and port in the .socket unit)"
            )
        sock.set_inheritable(False)
        name = names[index] if index < len(names) else "unknown"
        activated.append(ActivatedSocket(sock, name))
    return activated
