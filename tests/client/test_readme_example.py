"""The client docs stay true: the library example runs as printed, and the settings table
lists every flag the CLI has.

The example block is marked ``<!-- example: client ... -->``; it is run from every document
that has one (docs/client.md, and README.md once the README carries it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from trio.testing import MockClock

from ackservice.client.cli import build_parser
from ackservice.server import Server

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = re.compile(r"<!-- example: client .*?-->\n```python\n(.*?)```", re.DOTALL)
# Every document that carries the example, by name, with its text.
DOCUMENTS = {
    path.name: path.read_text()
    for path in (ROOT / "docs" / "client.md", ROOT / "README.md")
    if path.exists() and EXAMPLE.search(path.read_text())
}


def example_main(name: str) -> object:
    """The example's ``main``, defined by running the block (not as ``__main__``)."""
    match = EXAMPLE.search(DOCUMENTS[name])
    assert match is not None
    namespace: dict[str, object] = {"__name__": "client_example"}
    exec(compile(match.group(1), name, "exec"), namespace)
    return namespace["main"]


def test_the_client_docs_carry_the_example() -> None:
    """docs/client.md has the example block (so the tests below always run it)."""
    assert "client.md" in DOCUMENTS


@pytest.mark.parametrize("name", DOCUMENTS)
async def test_library_example_prints_what_the_docs_say(
    name: str, server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against a real server, the example prints the verified ACK and 1000 of 1000."""
    main = example_main(name)
    await main(server.port)  # type: ignore[operator]
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["ACK 1 5 3610a686", "1000 of 1000 acknowledged"]
    assert "`ACK 1 5 3610a686` and `1000 of 1000 acknowledged`" in DOCUMENTS[name]


@pytest.mark.parametrize("name", DOCUMENTS)
async def test_library_example_reports_an_unreachable_server(
    name: str, unused_port: int, capsys: pytest.CaptureFixture[str], mock_clock: MockClock
) -> None:
    """The example's error handling works: nothing listening prints one ``failed:`` line
    (after the default 30 s of retries, which the mock clock skips through: it jumps
    whenever everything has waited 10 ms of real time, so real refusals still happen)."""
    mock_clock.autojump_threshold = 0.01
    main = example_main(name)
    await main(unused_port)  # type: ignore[operator]
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"failed: cannot connect to 127.0.0.1:{unused_port}: ")


def test_every_client_setting_is_in_the_settings_table() -> None:
    """Each CLI flag, with its environment variable, has a row in docs/client.md."""
    text = DOCUMENTS["client.md"]
    parser = build_parser({})
    for action in parser._actions:
        flag = action.option_strings[0] if action.option_strings else None
        if flag is None or flag in ("-h", "--json", "-q", "--version"):
            continue
        env = "ACKSERVICE_CLIENT_" + flag.removeprefix("--").replace("-", "_").upper()
        assert f"| `{flag}` | `{env}` |" in text, flag
