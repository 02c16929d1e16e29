"""Each CLI's lines on standard error leave in one write, newline included.

Under PYTHONUNBUFFERED (this project's CI, many containers) ``print`` reaches the descriptor
twice, the text and then the newline, and a log line from a writer thread could land between
the two: ``...: error: cannot write --port-file ...{"event":"listening",...}``, seen with
``--workers``. Recording the writes shows the property without waiting for that race.
"""

from __future__ import annotations

import io
import sys

import pytest

from ackservice.client.output import Reporter, Tally
from ackservice.server import cli as server_cli
from ackservice.store import cli as store_cli


class Writes(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def test_the_servers_error_line_is_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    err = Writes()
    monkeypatch.setattr(sys, "stderr", err)
    assert server_cli._fail("cannot write --port-file 'x': No such file", 1) == 1
    assert err.calls == [
        "python -m ackservice.server: error: cannot write --port-file 'x': No such file\n"
    ]


def test_the_store_clis_lines_are_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    err = Writes()
    monkeypatch.setattr(sys, "stderr", err)
    store_cli._say("warning", "lost the connection to NATS")
    assert err.calls == ["python -m ackservice.store: warning: lost the connection to NATS\n"]


@pytest.mark.parametrize("json_err", [False, True])
def test_the_clients_lines_on_stderr_are_one_write_each(json_err: bool) -> None:
    err = Writes()
    reporter = Reporter(io.StringIO(), err, json_lines=False, quiet=False, json_err=json_err)
    reporter.error("connection lost")
    reporter.notice("connected")
    reporter.summary(Tally(), 1.0)
    assert len(err.calls) == 3
    assert all(call.endswith("\n") and call.count("\n") == 1 for call in err.calls)
