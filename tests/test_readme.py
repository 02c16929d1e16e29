"""The README stays true: its example runs, its tables match the real settings."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import subprocess
import sys
import tomllib
import zlib
from pathlib import Path

from ackservice.client.cli import build_parser as build_client_parser
from ackservice.server.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def example(name: str) -> str:
    match = re.search(rf"<!-- example: {name} .*?-->\n```python\n(.*?)```", README, re.DOTALL)
    assert match, f"README has no example block {name!r}"
    return match.group(1)


def test_embedding_example_runs_and_prints_what_the_readme_says() -> None:
    """The embedding example, run as is, prints the two replies the README promises."""
    result = subprocess.run(
        [sys.executable, "-c", example("embed")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.splitlines() if line[:4] in ("ACK ", "ERR ")]
    assert replies == ["ACK 1 5 3610a686", "ERR 2 rejected comments are not stored"]
    assert "`ACK 1 5 3610a686` and `ERR 2 rejected comments are not stored`" in README


def test_netcat_examples_show_real_checksums() -> None:
    """The ACK lines in the netcat example are what the protocol gives for those inputs."""
    for payload in (b"hello", b"one", b"two", b"no newline at the end"):
        line = f"ACK {{seq}} {len(payload)} {zlib.crc32(payload):08x}"
        assert re.search(line.replace("{seq}", r"\d"), README), payload


def test_every_server_setting_is_in_the_configuration_table() -> None:
    """Each server flag, with its environment variable, has a row in the README table."""
    parser = build_parser({})
    flags = [
        a.option_strings[0]
        for a in parser._actions
        if a.option_strings[0] not in ("-h", "--version")
    ]
    for flag in flags:
        env = "ACKSERVICE_" + flag.removeprefix("--").replace("-", "_").upper()
        assert f"| `{flag}` | `{env}` |" in README, flag


def test_every_client_setting_is_in_the_client_table() -> None:
    """Each client setting flag, and its environment variable, appears in the README."""
    client_section = README.split("## Sending messages: the client", 1)[1].split("\n## ", 1)[0]
    parser = build_client_parser({})
    # Every setting's help names its variable (switches such as --tls included).
    settings = [a for a in parser._actions if "env: ACKSERVICE_CLIENT_" in (a.help or "")]
    assert settings, "no settings found"
    for action in settings:
        flag = action.option_strings[0]
        env = "ACKSERVICE_CLIENT_" + action.dest.upper()
        assert f"| `{flag}`" in client_section or f", `{flag}` |" in client_section, flag
        assert f"`{env}`" in client_section, env
    for flag in ("--json", "--quiet"):  # output switches, not settings, still in the table
        assert f"`{flag}` |" in client_section, flag


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs exactly the README's test command, scripts/check."""
    assert "    scripts/check        # run the whole check suite" in README
    assert "exec scripts/check" in (ROOT / ".ci" / "run").read_text()


def test_every_command_is_a_console_script() -> None:
    """``[project.scripts]`` installs each ``python -m`` command as ``ackservice-NAME``, pointing
    at its ``main``; every installed script answers ``--version``."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in ("server", "client", "bench", "store"):
        module, _, function = scripts[f"ackservice-{name}"].partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name
    version = importlib.metadata.version("ackservice")
    for name in ("server", "client", "bench", "store"):
        script = Path(sys.executable).parent / f"ackservice-{name}"
        done = subprocess.run(
            [str(script), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        assert (done.returncode, done.stdout) == (0, f"python -m ackservice.{name} {version}\n")
