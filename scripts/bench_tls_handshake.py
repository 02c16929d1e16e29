"""What OpenSSL itself costs the server per TLS connection, in process and by phase: the
server's CPU (thread time) in ``SSLObject`` calls only, the client's left out (docs/benchmarks.md:
the floor under churn over TLS). The context is the server's own (``server_tls_context``: no
session tickets); one 64-byte message and its ACK, then close_notify both ways.

    taskset -c 0 .venv/bin/python scripts/bench_tls_handshake.py --cert C --key K --ca CA

Phases: ``new`` (``wrap_bio`` and its two BIOs), ``hello`` (the ClientHello in, the server's
flight out: key exchange and signature), ``finished`` (the client's Finished and one record
in, the ACK out), ``close`` (the client's close_notify in, ours out, the objects freed).
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
import statistics
import time

from ackservice.server.tls import server_tls_context

_REQUEST = b"x" * 63 + b"\n"
_REPLY = b"ACK 1 63 12345678\n"
_PHASES = ("new", "hello", "finished", "close")


def _connection(server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> list[int]:
    """One connection; the server's thread nanoseconds in each phase."""
    clock = time.thread_time_ns
    spent = [0, 0, 0, 0]
    started = clock()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    spent[0] += clock() - started
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(client_in, client_out, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    started = clock()
    server_in.write(client_out.read())
    with contextlib.suppress(ssl.SSLWantReadError):
        server.do_handshake()
    flight = server_out.read()
    spent[1] += clock() - started
    client_in.write(flight)
    client.do_handshake()
    client.write(_REQUEST)
    started = clock()
    server_in.write(client_out.read())
    server.do_handshake()
    server.read(16384)
    server.write(_REPLY)
    reply = server_out.read()
    spent[2] += clock() - started
    client_in.write(reply)
    client.read(16384)
    with contextlib.suppress(ssl.SSLError):
        client.unwrap()
    started = clock()
    server_in.write(client_out.read())
    with contextlib.suppress(ssl.SSLZeroReturnError):
        server.read(16384)
    with contextlib.suppress(ssl.SSLError):
        server.unwrap()
    server_out.read()
    del server, server_in, server_out
    spent[3] += clock() - started
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cert", required=True, help="the server's certificate chain (PEM)")
    parser.add_argument("--key", required=True, help="its private key (PEM)")
    parser.add_argument("--ca", required=True, help="the CA that signed it (PEM)")
    parser.add_argument("--connections", type=int, default=300)
    args = parser.parse_args()
    server_context = server_tls_context(args.cert, args.key)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.load_verify_locations(args.ca)
    client_context.check_hostname = False
    for _ in range(30):  # warm-up
        _connection(server_context, client_context)
    samples = [_connection(server_context, client_context) for _ in range(args.connections)]
    totals = [sum(sample) / 1000 for sample in samples]
    phases = ", ".join(
        f"{name} {statistics.median(values) / 1000:.1f}"
        for name, values in zip(_PHASES, zip(*samples, strict=True), strict=True)
    )
    print(
        f"OpenSSL, server side, per connection (µs of thread time, medians of "
        f"{args.connections}): {statistics.median(totals):.1f} ({phases})"
    )


if __name__ == "__main__":
    main()
