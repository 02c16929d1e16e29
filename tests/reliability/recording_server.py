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
import signal
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import structlog
import trio

from ackservice.errors import Reject
from ackservice.logconfig import configure_logging
from ackservice.server import MessageContext, MessageHook, Server, ServerConfig, serve
from ackservice.server.cli import build_parser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rel_checker import Recorded, payload_id

log = structlog.get_logger("ackservice.server.cli")

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_FORCED = 130


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


async def serve_until_signalled(config: ServerConfig, hook: MessageHook) -> int:
    listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def run_server(*, task_status: trio.TaskStatus[Server]) -> None:
                await serve(config, on_message=hook, listeners=listeners, task_status=task_status)
                nursery.cancel_scope.cancel()  # shut down gracefully: stop watching signals

            server: Server = await nursery.start(run_server)
            async for signum in signals:
                name = signal.Signals(signum).name
                if server.handler.shutting_down:
                    log.warning("forced_exit", signal=name)
                    nursery.cancel_scope.cancel()
                    return EXIT_FORCED
                log.info("signal_received", signal=name)
                server.shutdown()
    return EXIT_OK


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
    configure_logging(args.log_level, args.log_format)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        max_message_bytes=args.max_message_bytes,
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout,
        send_timeout=args.send_timeout,
        shutdown_grace=args.shutdown_grace,
        drain_timeout=args.drain_timeout,
        tcp_keepalive=args.tcp_keepalive,
    )
    record_fd = os.open(args.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    reject = None if args.reject_prefix is None else args.reject_prefix.encode()
    hook = recording_hook(record_fd, args.boot, args.hook_delay, reject)
    try:
        return trio.run(functools.partial(serve_until_signalled, config, hook))
    except OSError as exc:
        print(f"recording_server: error: {exc}", file=sys.stderr)
        return EXIT_START_FAILED


if __name__ == "__main__":
    sys.exit(main())
