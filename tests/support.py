"""Helpers shared by the test modules (importable as ``support`` via pytest's pythonpath)."""

from __future__ import annotations

import array
import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from ackservice.protocol import MessageFramer, Oversized

Connect = Callable[[int], Awaitable[trio.SocketStream]]
"""The ``connect`` fixture: open a loopback connection to a port, closed after the test."""


class LineReader:
    """Reads newline-terminated reply lines from a stream, as a client would."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self._framer = MessageFramer(1 << 20)
        self._lines: list[bytes] = []
        self.eof = False

    async def line(self) -> bytes:
        """The next line, without its newline; b"" never appears except for empty lines."""
        while not self._lines:
            if self.eof:
                raise EOFError("stream ended before the next line")
            data = await self.stream.receive_some(65536)
            frames = self._framer.feed(data) if data else self._framer.end_of_stream()
            self.eof = not data
            self._lines += [f for f in frames if not isinstance(f, Oversized)]
        return self._lines.pop(0)

    async def lines(self, count: int) -> list[bytes]:
        return [await self.line() for _ in range(count)]

    async def at_eof(self) -> bool:
        """Whether the stream ends with no further line."""
        try:
            extra = await self.line()
        except EOFError:
            return True
        raise AssertionError(f"expected EOF, got another line: {extra!r}")


class ServerProcess:
    """``python -m ackservice.server`` as a real process, its JSON logs in a file."""

    def __init__(
        self,
        log_path: Path,
        *args: str,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
        pass_fds: Sequence[int] = (),
        started_event: str | None = "listening",
    ) -> None:
        """Start the server with ``args``; ``prefix``: a wrapper command it is run through
        (which must end by exec-ing the rest); ``pass_fds``: descriptors it inherits;
        ``started_event``: the log event to wait for (``port`` is 0 unless it has one; None:
        do not wait, the test knows another way)."""
        self.log_path = log_path
        self._log_file = log_path.open("wb")
        self.process = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "ackservice.server",
                "--port",
                "0",
                "--log-format",
                "json",
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
            env={**os.environ, **(env or {})},
            cwd=log_path.parent,  # the default store (sqlite:ackservice.db) goes there
            pass_fds=pass_fds,
        )
        self.port = 0
        if started_event is not None:
            self.port = int(self.wait_for_event(started_event, timeout=15).get("port", 0))

    @property
    def pid(self) -> int:
        return self.process.pid

    def events(self) -> list[dict[str, Any]]:
        """Every log event so far (non-JSON lines, such as tracebacks, fail the parse)."""
        text = self.log_path.read_text()
        # A line still being written (no newline yet) is left for the next look.
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def wait_for_event(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == name:
                    return event
            if self.process.poll() is not None:
                raise AssertionError(f"server exited ({self.process.returncode}) before {name!r}")
            time.sleep(0.02)
        raise AssertionError(f"no {name!r} event within {timeout} s: {self.log_path.read_text()}")

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log_file.close()


@contextmanager
def server_process(log_path: Path, *args: str, **options: Any) -> Iterator[ServerProcess]:
    """A ``ServerProcess`` (same arguments), killed at the end if still running."""
    server = ServerProcess(log_path, *args, **options)
    try:
        yield server
    finally:
        server.stop()


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until it holds; fail the test if it takes over 5 seconds."""
    with trio.fail_after(5):
        while not condition():  # noqa: ASYNC110 - polls state that has no event to wait on
            await trio.sleep(0.005)


@contextmanager
def small_tmpfs(mount_point: Path, size: int | str) -> Iterator[Path]:
    """A real tmpfs of ``size`` (bytes, or with a suffix: ``"64k"``) mounted at
    ``mount_point``, a full disk to order: unmounted at the end (lazily if a process still
    holds a file there). Skips the test, with the reason, when mounting is not permitted
    (it needs root)."""
    import pytest

    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


def poll_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``condition`` (every 20 ms) until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or condition}")
        time.sleep(0.02)


def unread_pipe_is_filling(read_fd: int) -> bool:
    """Whether the pipe whose read end is ``read_fd`` holds half its capacity unread: its
    writer, writing on, will soon block (pages are not always filled to the last byte, so
    "full" is not a number to wait for)."""
    capacity = fcntl.fcntl(read_fd, getattr(fcntl, "F_GETPIPE_SZ", 1032))
    unread = array.array("i", [0])
    fcntl.ioctl(read_fd, termios.FIONREAD, unread)
    return unread[0] >= capacity // 2


def run_with_stderr_closed(*args: str) -> subprocess.CompletedProcess[bytes]:
    """``python -m ...`` run to its end with its descriptor 2 closed (``2>&-``) and its
    standard output captured: what a command must not mistake for a place to write errors
    (``print`` to a ``None`` ``sys.stderr`` writes to standard output)."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        stdout=subprocess.PIPE,
        preexec_fn=lambda: os.close(2),  # the child's own descriptor 2
        timeout=30,
        check=False,
    )
