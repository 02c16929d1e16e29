"""Reading the small files a setting names (certificates, keys, CAs) without hanging."""

from __future__ import annotations

import os
import stat

__all__ = ["read_regular_file"]


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
