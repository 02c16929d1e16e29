"""Helpers the client CLI tests share: the slack a client process is given to start, and
the one-line error its failures must end with.

Imported by name (pytest puts this directory on ``sys.path``); the name ``client_support``
keeps it apart from ``tests/support.py`` and any other test directory's helpers.
"""

from __future__ import annotations

import subprocess

# A client process needs a fraction of a second to start; bounds below allow for a busy
# machine without hiding a client that waits for the wrong thing.
STARTUP_SLACK = 3.0


def assert_one_line_error(run: subprocess.CompletedProcess[bytes], *fragments: str) -> str:
    """stderr holds exactly one ``error:`` line (no traceback), containing ``fragments``."""
    stderr = run.stderr.decode()
    assert "Traceback" not in stderr
    errors = [
        line
        for line in stderr.splitlines()
        if line.startswith("python -m ackservice.client: error:")
    ]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0]
    return errors[0]
