"""``--spawn``: run ``python -m ackservice.server`` for the benchmark, then stop it.

The server listens on a free port (``--port 0``) and writes it to its ``--port-file`` (in
its temporary working directory) once listening, whatever its log level: the file appears
whole (written, then renamed), so seeing it is seeing the port. Its JSON logs go to a
temporary file rather than a pipe, since a pipe nobody reads fills up and would stall the
server in the middle of the measurement. It runs in its
own process group, so a Ctrl-C meant for the benchmark does not also start its shutdown
(which would make it answer ``ERR 0 shutting-down``); it is stopped by PID with SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

__all__ = ["SpawnError", "SpawnedServer", "start_server"]

_POLL_INTERVAL: Final = 0.02
_PORT_FILE: Final = "server.port"


class SpawnError(Exception):
    """The server could not be started."""


class SpawnedServer:
    """A server process started by ``start_server``.

    Attributes:
        process: the ``python -m ackservice.server`` process.
        port: the port it listens on.
        log_path: its log (JSON lines), removed by ``stop`` unless the server failed.
    """

    def __init__(
        self, process: subprocess.Popen[bytes], port: int, log_path: Path, workdir: Path
    ) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path
        self.workdir = workdir
        """The server's working directory (its default store), removed by ``stop``."""
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (a graceful shutdown), wait up to ``timeout`` s, else SIGKILL.

        Returns:
            the server's exit code (negative: killed by that signal).
        """
        process = self.process
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout)
        self.exit_code = process.returncode
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.exit_code == 0:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
        return self.exit_code


def start_server(host: str, extra_args: Sequence[str] = (), timeout: float = 15.0) -> SpawnedServer:
    """Start the server on ``host`` and a free port; return once it listens.

    Args:
        host: the address to listen on (and the only one the benchmark connects to).
        extra_args: more server flags (``--log-level warning``); ``--port``, ``--port-file``
            and ``--log-format`` are set here and come last, so they win. ``--host`` is
            repeatable, so one in ``extra_args`` adds an address; the benchmark still
            connects to ``host`` only.
        timeout: seconds to wait for the server to listen.

    Raises:
        SpawnError: the server exited or did not listen in time (the message says why).
    """
    fd, name = tempfile.mkstemp(prefix="ackservice-bench-server-", suffix=".log")
    log_path = Path(name)
    # The server's default store (a SQLite file in its working directory) is measured as
    # users run it, and goes away with the run.
    workdir = Path(tempfile.mkdtemp(prefix="ackservice-bench-server-"))
    command = [
        sys.executable,
        "-m",
        "ackservice.server",
        *extra_args,
        "--host",
        host,
        "--port",
        "0",
        "--port-file",
        str(workdir / _PORT_FILE),
        "--log-format",
        "json",
    ]
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=fd,
            process_group=0,
            cwd=workdir,
        )
    except OSError as exc:
        log_path.unlink()
        shutil.rmtree(workdir, ignore_errors=True)
        raise SpawnError(f"cannot start the server: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    try:
        port = _wait_for_port(process, workdir / _PORT_FILE, log_path, timeout)
    except BaseException:  # including a Ctrl-C: never leave the server behind
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return SpawnedServer(process, port, log_path, workdir)


def _wait_for_port(
    process: subprocess.Popen[bytes], port_file: Path, log_path: Path, timeout: float
) -> int:
    deadline = time.monotonic() + timeout
    while True:
        port = _port_in(port_file)
        if port is not None:
            return port
        if process.poll() is not None:
            last_line = _last_line(log_path)
            with contextlib.suppress(OSError):
                log_path.unlink()
            raise SpawnError(
                f"the server exited with code {process.returncode} before listening: {last_line}"
            )
        if time.monotonic() > deadline:
            raise SpawnError(f"the server did not listen within {timeout:g} s (log: {log_path})")
        time.sleep(_POLL_INTERVAL)


def _port_in(port_file: Path) -> int | None:
    """The port in the server's port file (``host:port`` lines), once it exists."""
    try:
        first = port_file.read_text().splitlines()[0]
        return int(first.rsplit(":", 1)[1])
    except (OSError, IndexError, ValueError):
        return None  # not written yet (it appears whole, by a rename)


def _last_line(log_path: Path) -> str:
    lines = log_path.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(no output)"
