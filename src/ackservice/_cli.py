"""Command-line plumbing shared by the server and client entry points.

Every setting is a flag and an ``ACKSERVICE_*`` environment variable; the flag wins. Bad
values, from either source, end the program with one line on stderr and exit code 2, never
a traceback or argparse's multi-line usage dump.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

__all__ = [
    "EXIT_USAGE",
    "SettingsParser",
    "host_name",
    "int_in_range",
    "log_format",
    "log_level",
    "non_negative_int",
    "port_number",
    "positive_int",
    "seconds",
    "seconds_up_to",
    "server_port",
    "setting_name",
    "setting_names",
    "switch",
    "with_plain_defaults",
]

EXIT_USAGE = 2
ENV_PREFIX = "ACKSERVICE_"

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("auto", "console", "json")


def buffered_stdout() -> None:
    """Give standard output a buffer if it has none (``PYTHONUNBUFFERED``, ``python -u``,
    common in containers): the client and the store CLI write a line per message and flush
    on their own schedule (at a prompt, a tick, the end of a run, every fifth of a second
    while following), so unbuffered, every line was a system call of its own (an export of
    1,000,000 messages: 1,000,000 writes, 30% more time). A terminal stays line-buffered."""
    out = sys.stdout
    if out is not sys.__stdout__:
        return  # replaced by whoever runs us (a test's capture): theirs to buffer
    if out is None:
        return  # started with standard output closed
    raw = getattr(out, "buffer", None)
    if not isinstance(raw, io.RawIOBase):
        return  # buffered already
    # A file object of its own on descriptor 1 that never closes it: neither wrapper, this
    # one or the original (still sys.__stdout__), can then close the other's.
    own = io.FileIO(raw.fileno(), "wb", closefd=False)
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(own),
        encoding=out.encoding,
        errors=out.errors,
        line_buffering=own.isatty(),
    )


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise ValueError(f"expected an integer >= 0, got {text!r}")
    return value


def int_in_range(lowest: int, highest: int) -> Callable[[str], int]:
    """A parser for an integer from ``lowest`` to ``highest``; its ``range_text`` (shown in
    ``--help``) says so."""

    def parse(text: str) -> int:
        value = _int(text)
        if not lowest <= value <= highest:
            raise ValueError(f"expected an integer from {lowest} to {highest}, got {text!r}")
        return value

    parse.range_text = f"{lowest} to {highest}"  # type: ignore[attr-defined]
    return parse


def seconds_up_to(highest: float) -> Callable[[str], float]:
    """A parser for a positive, finite number of seconds up to ``highest``."""

    def parse(text: str) -> float:
        value = seconds(text)
        if value > highest:
            raise ValueError(
                f"expected a number of seconds above 0 and at most {highest:g}, got {text!r}"
            )
        return value

    parse.range_text = f"above 0, at most {highest:g}"  # type: ignore[attr-defined]
    return parse


def port_number(text: str) -> int:
    """A TCP port, 0 to 65535 (0 lets the system pick a free one)."""
    value = _int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a port from 0 to 65535, got {text!r}")
    return value


def server_port(text: str) -> int:
    """A TCP port to connect to, 1 to 65535."""
    value = _int(text)
    if not 1 <= value <= 65535:
        # Not port_number's message: "from 0" for -1 would invite a 0 that is refused next.
        raise ValueError(f"expected a port from 1 to 65535, got {text!r}")
    return value


def host_name(text: str) -> str:
    """A non-empty host name or address."""
    if not text.strip():
        raise ValueError("expected a host name or address, got an empty string")
    return text.strip()


def switch(text: str) -> bool:
    """1/0, true/false, yes/no, on/off (any case)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected 1/0, true/false, yes/no or on/off, got {text!r}")


def seconds(text: str) -> float:
    """A positive, finite duration in seconds."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"expected a positive number of seconds, got {text!r}")
    return value


def log_level(text: str) -> str:
    """One of the standard level names, in any case."""
    level = text.lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return level


def log_format(text: str) -> str:
    """``auto`` (console on a terminal, JSON lines otherwise), ``console`` or ``json``."""
    fmt = text.lower()
    if fmt not in LOG_FORMATS:
        raise ValueError(f"expected one of {', '.join(LOG_FORMATS)}, got {text!r}")
    return fmt


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


class SettingsParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose settings also read ``ACKSERVICE_*`` environment variables.

    Errors are one line (``prog: error: ... (see --help)``) and exit code 2.
    """

    def __init__(
        self,
        *args: Any,
        environ: dict[str, str] | None = None,
        env_prefix: str = ENV_PREFIX,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._environ = os.environ if environ is None else environ
        self._env_prefix = env_prefix
        # (dest, flag, variable, parser, default) of each setting, flag-or-environment.
        self._settings: list[tuple[str, str, str, Callable[[str], Any], Any]] = []

    def _names(self, flag: str) -> tuple[str, str]:
        """The attribute name and environment variable of ``flag``."""
        dest = flag.removeprefix("--").replace("-", "_")
        return dest, self._env_prefix + dest.upper()

    def add_setting(
        self,
        flag: str,
        parse: Callable[[str], Any],
        default: Any,
        help: str,
        *,
        metavar: str | None = None,
        default_text: str | None = None,
        repeatable: bool = False,
    ) -> None:
        """Add ``flag`` (``--max-message-bytes``), backed by ``ACKSERVICE_MAX_MESSAGE_BYTES``.

        A ``repeatable`` flag may be given several times: its value is then the list of
        parsed values (the environment variable and the default give one value).
        """
        dest, env = self._names(flag)
        shown = default_text if default_text is not None else default
        range_text = getattr(parse, "range_text", None)
        limits = f"range: {range_text}; " if range_text else ""
        self.add_argument(
            flag,
            dest=dest,
            type=_argparse_type(parse),
            default=None,
            metavar=metavar or dest.upper(),
            help=f"{help} ({limits}default: {shown}; env: {env})",
            action="append" if repeatable else "store",
        )
        self._settings.append((dest, flag, env, parse, default))

    def add_switch(self, flag: str, help: str) -> None:
        """Add an on/off ``flag`` (``--json``), backed by e.g. ``ACKSERVICE_JSON=1``."""
        dest, env = self._names(flag)
        self.add_argument(
            flag,
            dest=dest,
            action="store_const",
            const=True,
            default=None,
            help=f"{help} (env: {env})",
        )
        self._settings.append((dest, flag, env, switch, False))

    def add_list(self, flag: str, help: str, *, metavar: str) -> None:
        """Add a repeatable ``flag``, backed by one shell-quoted variable named in the plural."""
        dest, env = self._names(flag)
        env += "S"
        self.add_argument(
            flag,
            dest=dest,
            action="append",
            default=None,
            metavar=metavar,
            help=f"{help} (repeatable; env: {env}, split like a shell line)",
        )
        self._settings.append((dest, flag, env, shlex.split, []))

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: None = None
    ) -> argparse.Namespace:
        parsed = super().parse_args(args, namespace)
        names: dict[str, str] = {}
        for dest, flag, env, parse, default in self._settings:
            names[dest] = flag
            if getattr(parsed, dest) is not None:
                continue  # the flag wins over the environment
            raw = self._environ.get(env)
            if raw is None or raw == "":
                setattr(parsed, dest, default)
                continue
            names[dest] = env
            try:
                setattr(parsed, dest, parse(raw))
            except ValueError as exc:
                self.error(f"environment variable {env}: {exc}")
        setattr(parsed, _NAMES_ATTRIBUTE, names)
        return parsed

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


_NAMES_ATTRIBUTE = "_setting_names"


def setting_name(args: argparse.Namespace, dest: str) -> str:
    """What to call setting ``dest`` in a message about its value: its environment variable
    if the value came from there, else its flag (given, or the default's).

    An error that named ``--tls-cert`` for a path set in ``ACKSERVICE_TLS_CERT`` sent the
    reader to a command line that has no such flag.
    """
    names: dict[str, str] = getattr(args, _NAMES_ATTRIBUTE, {})
    return names.get(dest, "--" + dest.replace("_", "-"))


def setting_names(args: argparse.Namespace, flags: Sequence[str]) -> dict[str, str]:
    """``setting_name`` of each of ``flags``, by flag (``{"--tls-ca": "ACKSERVICE_CLIENT_TLS_CA"}``
    when the value came from there): what the server's and the client's TLS messages call
    each file."""
    return {flag: setting_name(args, flag.removeprefix("--").replace("-", "_")) for flag in flags}


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap ``parse`` so argparse reports its own message instead of a generic one."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def with_plain_defaults(parser: SettingsParser) -> Callable[..., None]:
    """``parser.add_setting``, printing a float default as people write it (5, not 5.0),
    so that every default in ``--help`` looks alike."""

    def add(flag: str, parse: Callable[[str], Any], default: Any, help: str, **kw: Any) -> None:
        if isinstance(default, float) and "default_text" not in kw:
            kw["default_text"] = f"{default:g}"
        parser.add_setting(flag, parse, default, help, **kw)

    return add
