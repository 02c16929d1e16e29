"""Reading the small files a setting names (certificates, keys, CAs) without hanging, and
saying what is wrong with one that is not PEM."""

from __future__ import annotations

import os
import stat
from typing import Final

__all__ = ["pem_problem", "read_regular_file"]

# Per kind of PEM file: the marker that must be in it, the line a reader looks for, and how
# to convert the DER file that most often stands in its place.
_PEM_KINDS: Final = {
    "certificate": (
        b"CERTIFICATE-----",
        "-----BEGIN CERTIFICATE-----",
        "openssl x509 -inform DER -in FILE -out FILE.pem",
    ),
    "private key": (
        b"PRIVATE KEY-----",
        "-----BEGIN ...PRIVATE KEY-----",
        "openssl pkey -inform DER -in FILE -out FILE.pem",
    ),
}


def pem_problem(text: bytes, name: str, kind: str) -> str | None:
    """The one-line error for a file (``name``: its setting and path, as messages call it)
    of ``text`` that holds no PEM ``kind`` (``certificate`` or ``private key``); None if
    it holds one. OpenSSL's own word for it is "PEM lib"."""
    marker, banner, convert = _PEM_KINDS[kind]
    if b"-----BEGIN " in text and marker in text:
        return None
    return (
        f"no PEM {kind} in {name}: it has no {banner} line; give a PEM file, or convert a DER "
        f"one: {convert}"
    )


def read_regular_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the regular file at ``path``.

    Opened without blocking: a FIFO named by mistake would otherwise hold the open until some
    process writes to it, a start-up that hangs without a word. A FIFO, a device or a
    directory is refused instead.

    Raises:
        OSError: it cannot be opened or read, or is not a regular file (``strerror`` says
            which, for a one-line message).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO or device"
            raise OSError(0, f"it is {kind}, not a regular file")
        with os.fdopen(os.dup(fd), "rb") as file:
            return file.read()
    finally:
        os.close(fd)
