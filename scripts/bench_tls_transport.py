"""What the server's TLS transport adds to a read and its reply, in process, against the plain
socket transport: the server side of a socketpair, ``read_nowait`` then ``try_send`` per
request, timed alone (the client's work is not counted). Compare the difference with
``bench_tls_record.py``, OpenSSL's own cost for the same records: what is left is the
transport's Python (docs/benchmarks.md).

    taskset -c 0 .venv/bin/python scripts/bench_tls_transport.py --cert C --key K --ca CA
    # pipelined: 64 messages per record and per reply
    taskset -c 0 .venv/bin/python scripts/bench_tls_transport.py ... --messages 64
"""

from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import threading
import time

import trio

from ackservice.server.readiness import current_hub
from ackservice.server.tls_transport import TLSTransport
from ackservice.server.transport import SocketTransport, Transport

_REQUEST = b"x" * 63 + b"\n"
_REPLY = b"ACK 1 63 12345678\n"


async def _connected(
    kind: str, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> tuple[Transport, socket.socket]:
    """The server's transport and the client's socket (TLS-wrapped for ``tls``)."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    if kind == "plain":
        return SocketTransport(current_hub(), sock=ours), theirs
    transport = TLSTransport(current_hub(), server_context, sock=ours, drain_timeout=1)
    client: list[ssl.SSLSocket] = []
    # The client's blocking handshake in a thread while the transport's runs here.
    thread = threading.Thread(
        target=lambda: client.append(
            client_context.wrap_socket(theirs, server_hostname="127.0.0.1")
        )
    )
    thread.start()
    established = await transport.handshake(trio.current_time() + 10)
    thread.join()
    assert established
    return transport, client[0]


def _per_message(transport: Transport, client: socket.socket, messages: int, count: int) -> float:
    request, reply = _REQUEST * messages, _REPLY * messages
    spent = 0.0
    for _ in range(count):
        client.sendall(request)
        transport.may_have_more = True  # as the hub's edge would say
        started = time.perf_counter()
        data = transport.read_nowait()
        transport.try_send(reply)
        spent += time.perf_counter() - started
        assert data == request, "a request did not arrive whole: lower --messages"
        received = 0
        while received < len(reply):
            received += len(client.recv(65536))
    return spent / count


async def _main(args: argparse.Namespace) -> None:
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(args.cert, args.key)
    server_context.num_tickets = 0  # as the server's own context
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.load_verify_locations(args.ca)
    medians = {}
    for kind in ("plain", "tls"):
        transport, client = await _connected(kind, server_context, client_context)
        rounds = [
            _per_message(transport, client, args.messages, args.count) * 1e6
            for _ in range(args.repeat)
        ]
        medians[kind] = statistics.median(rounds)
        shown = ", ".join(f"{r:.2f}" for r in rounds)
        print(f"{kind:5} read + reply: median {medians[kind]:.2f} µs ({shown})")
        client.close()
    print(
        f"TLS adds {medians['tls'] - medians['plain']:.2f} µs per read of {args.messages} "
        "message(s) and its reply"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--messages", type=int, default=1, help="messages per record")
    parser.add_argument("--count", type=int, default=20_000, help="reads per round")
    parser.add_argument("--repeat", type=int, default=7, help="rounds; the median is shown")
    trio.run(_main, parser.parse_args())


if __name__ == "__main__":
    main()
