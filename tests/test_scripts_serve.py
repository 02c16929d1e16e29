"""``scripts/serve``, the README's way to run the server, as a user runs it."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from support import poll_until

ROOT = Path(__file__).resolve().parent.parent


def _venv_is_set_up() -> bool:
    """Whether scripts/serve would start at once (no pip install into .venv first)."""
    stamp = ROOT / ".venv" / ".installed-dev"
    if not (ROOT / ".venv" / "bin" / "python").exists() or not stamp.exists():
        return False
    cksum = subprocess.run(
        ["cksum", "pyproject.toml"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return stamp.read_text().strip() == cksum.stdout.split()[0]


@pytest.mark.skipif(not _venv_is_set_up(), reason="scripts/serve would set up .venv first")
def test_relative_paths_are_the_callers(tmp_path: Path) -> None:
    """Run from another directory, scripts/serve reads and writes relative paths there, as
    any command does: it ran the server in the repository, so ``--port-file port`` was
    written there (and ``--tls-cert server.pem`` was not found)."""
    server = subprocess.Popen(
        [ROOT / "scripts" / "serve", "--port", "0", "--port-file", "port", "--store", "none"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        poll_until(
            lambda: (tmp_path / "port").exists() or (ROOT / "port").exists(),
            timeout=15,
            what="the port file",
        )
        assert (tmp_path / "port").read_text().startswith("127.0.0.1:")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        (ROOT / "port").unlink(missing_ok=True)
    assert server.returncode == 0
