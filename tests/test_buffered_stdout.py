"""Standard output of the client and the store CLI is buffered even when Python's is not
(``PYTHONUNBUFFERED``, ``python -u``): a line per message must not be a write each."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_SHOW = """
import sys
from ackservice._cli import buffered_stdout
if sys.argv[1] == "buffer":
    buffered_stdout()
print(type(sys.stdout.buffer).__name__, sys.stdout.line_buffering, sys.stdout.encoding)
print("caf\\u00e9")
"""


@pytest.mark.parametrize(
    ("call", "expected"),
    [("buffer", "BufferedWriter False utf-8"), ("leave", "FileIO False utf-8")],
)
def test_unbuffered_standard_output_gets_a_buffer(call: str, expected: str) -> None:
    """Under ``PYTHONUNBUFFERED`` standard output is a raw file; ``buffered_stdout`` puts a
    buffer on it, with the same encoding, and what was written still comes out at exit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(
        [sys.executable, "-c", _SHOW, call], capture_output=True, env=env, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines() == [expected, "caf\u00e9"]


def test_a_buffered_standard_output_is_left_as_it_is() -> None:
    """Without ``PYTHONUNBUFFERED`` nothing changes: the interpreter's own buffer stays."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [sys.executable, "-c", _SHOW + "print(sys.stdout is sys.__stdout__)", "buffer"],
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines()[0].startswith("BufferedWriter")
    assert done.stdout.decode().splitlines()[-1] == "True"
