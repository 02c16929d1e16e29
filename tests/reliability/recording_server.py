"""A test server: ``ackservice.server.serve`` whose application hook records every message.

    python tests/reliability/recording_server.py --record FILE [--boot N] [--hook-delay S]
        [--reject-prefix TEXT] [--nofile N] [any flag of python -m ackservice.server]

The hook appends one line per accepted message to FILE (see ``rel_checker.Recorded``) with
a plain ``os.write`` on an ``O_APPEND`` descriptor, and only then returns, so the server's
ACK always follows the record. Nothing is buffered in the process: a line written is in
the kernel's page cache and survives a SIGKILL of the server (no fsync: the scenarios kill
processes, not the machine). Several boots of the server may share one FILE; ``--boot``
tells their connection ids apart.

Unlike ``python -m ackservice.server`` this does not fit ``--max-connections`` to the
open-file limit, so ``--nofile`` can starve it of descriptors on purpose (scenario 12).
Signals behave as in the real CLI: the first SIGTERM/SIGINT shuts down gracefully (exit
0), a second one exits at once (130).
"""

from __future__ import annotations

import functools
import os
import resource
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import trio

from ackservice.errors import Reject
from ackservice.logconfig import configure_logging
from ackservice.server import MessageContext, MessageHook
from ackservice.server.cli import build_parser, config_from_args, serve_until_signalled
from ackservice.server.tls import server_tls_context

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rel_checker import Recorded, payload_id

EXIT_START_FAILED = 1


def recording_hook(
    record_fd: int, boot: int, delay: float, reject_prefix: bytes | None
) -> MessageHook:
    """The application: optionally slow, optionally refusing, always recording first."""

    async def record(payload: bytes, context: MessageContext) -> None:
        if delay:
            await trio.sleep(delay)
        if reject_prefix is not None and payload.startswith(reject_prefix):
            raise Reject("refused by the recording server")
        line = Recorded(
            boot,
            context.conn_id,
            context.peer,
            context.seq,
            len(payload),
            zlib.crc32(payload),
            payload_id(payload),
        ).line()
        if os.write(record_fd, line) != len(line):
            # An unrecorded message must not be acknowledged: this becomes internal-error.
            raise OSError("short write to the record file")

    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--record", type=Path, required=True, help="file to append records to")
    parser.add_argument("--boot", type=int, default=1, help="this run's number in the records")
    parser.add_argument("--hook-delay", type=float, default=0.0, help="seconds per message")
    parser.add_argument("--reject-prefix", default=None, help="refuse payloads starting so")
    parser.add_argument("--nofile", type=int, default=None, help="RLIMIT_NOFILE, soft and hard")
    args = parser.parse_args(argv)
    if args.nofile is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))
    configure_logging(args.log_level, args.log_format, max_queued_events=args.log_queue)
    # Not fitted to the open-file limit, unlike the real CLI: see the module docstring.
    config = config_from_args(args, max_connections=args.max_connections)
    record_fd = os.open(args.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    reject = None if args.reject_prefix is None else args.reject_prefix.encode()
    hook = recording_hook(record_fd, args.boot, args.hook_delay, reject)
    tls = None
    if args.tls_cert is not None:  # the real CLI's TLS flags, served the same way
        tls = server_tls_context(args.tls_cert, args.tls_key, args.tls_client_ca)
    try:
        return trio.run(functools.partial(serve_until_signalled, config, on_message=hook, tls=tls))
    except OSError as exc:
        print(f"recording_server: error: {exc}", file=sys.stderr)
        return EXIT_START_FAILED


if __name__ == "__main__":
    sys.exit(main())
