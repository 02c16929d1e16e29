"""Logging set-up for the command-line programs; the only module that configures structlog.

Library code only calls ``structlog.get_logger()``: an application that embeds ackservice
keeps whatever logging configuration it already has (structlog's library/application split).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

__all__ = ["configure_logging"]


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Send structlog events, and stdlib ``logging`` records (Trio's own), to ``stream``.

    Args:
        level: the least severe level shown (``debug`` ... ``critical``).
        fmt: ``console`` (human-readable), ``json`` (one JSON object per line) or ``auto``
            (console when ``stream`` is a terminal, JSON lines otherwise, as for a daemon
            whose stderr goes to a journal or a file).
        stream: where log lines go; standard error by default.
    """
    out = sys.stderr if stream is None else stream
    is_tty = out.isatty()
    use_console = fmt == "console" or (fmt == "auto" and is_tty)
    levelno = logging.getLevelNamesMapping()[level.upper()]

    renderer: structlog.types.Processor
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(colors=is_tty)
        exception_formatter: list[structlog.types.Processor] = []
    else:
        renderer = structlog.processors.JSONRenderer()
        # Tracebacks become one "exception" string field, so each event stays one line.
        exception_formatter = [structlog.processors.format_exc_info]

    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, *exception_formatter, renderer],
        # Calls below the level are no-op methods, so disabled debug events cost one call.
        wrapper_class=structlog.make_filtering_bound_logger(levelno),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )

    # Trio reports some trouble through the stdlib (e.g. "trio.serve_listeners" when out of
    # file descriptors); render those records exactly like our own events, on the same stream.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *exception_formatter,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(levelno)
