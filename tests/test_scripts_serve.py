"""``scripts/serve``, the README's way to run the server, as a user runs it."""

from __future__ import annotations

import os
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
    try:
        _serves_from(tmp_path, ROOT / "scripts" / "serve")  # the port file appears there
    finally:
        (ROOT / "port").unlink(missing_ok=True)


def _serves_from(cwd: Path, script: Path | str, env: dict[str, str] | None = None) -> None:
    """Run ``script`` (scripts/serve, by some path) in ``cwd`` with a port file there; it
    must start the server (the port file appears) and end cleanly on SIGTERM."""
    server = subprocess.Popen(
        [script, "--port", "0", "--port-file", "port", "--store", "none"],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        poll_until(
            lambda: (cwd / "port").exists() or server.poll() is not None,
            timeout=15,
            what="the port file",
        )
        assert server.poll() is None, server.communicate()[1].decode()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        assert server.stderr is not None
        server.stderr.close()
    assert server.returncode == 0


@pytest.mark.skipif(not _venv_is_set_up(), reason="scripts/serve would set up .venv first")
def test_modules_in_the_callers_directory_are_not_imported(tmp_path: Path) -> None:
    """``python -m`` puts the current directory first on ``sys.path``: run in the caller's
    directory, a ``json.py`` there (any module the server imports) replaced the standard
    library's, and the server did not start."""
    (tmp_path / "json.py").write_text("raise SystemExit('the json.py of the caller')\n")
    _serves_from(tmp_path, ROOT / "scripts" / "serve")


@pytest.mark.skipif(not _venv_is_set_up(), reason="scripts/serve would set up .venv first")
def test_an_exported_cdpath_does_not_garble_the_repository(tmp_path: Path) -> None:
    """With ``CDPATH`` exported, ``cd`` to a relative path found through it prints where it
    went: captured in ``$(cd ... && pwd)``, the repository's path came out twice and the
    script failed at once."""
    (tmp_path / "repo").symlink_to(ROOT)
    _serves_from(tmp_path, "repo/scripts/serve", env={**os.environ, "CDPATH": "."})
