"""What OpenSSL itself costs per request/response message over TLS, in process: one 64-byte
request record fed to a server ``SSLObject`` through its memory BIO and decrypted, one ACK
encrypted and taken out (docs/benchmarks.md: the floor under the TLS overhead). Also through
``SSLObject``'s C object directly, to show what the Python wrapper adds.

    taskset -c 0 .venv/bin/python scripts/bench_tls_record.py --cert C --key K --ca CA
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
import statistics
import time
from collections.abc import Callable

_REQUEST = b"x" * 63 + b"\n"
_REPLY = b"ACK 1 63 12345678\n"


def _pair(
    cert: str, key: str, ca: str
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, ssl.SSLObject, ssl.MemoryBIO]:
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.load_verify_locations(ca)
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    client = client_context.wrap_bio(client_in, client_out, server_hostname="127.0.0.1")
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        server_in.write(client_out.read())
        client_in.write(server_out.read())
    return server, server_in, server_out, client, client_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--records", type=int, default=50_000, help="per round")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the median is shown")
    args = parser.parse_args()
    server, server_in, server_out, client, client_out = _pair(args.cert, args.key, args.ca)

    def requests(count: int) -> list[bytes]:
        records = []
        for _ in range(count):
            client.write(_REQUEST)
            records.append(client_out.read())
        return records

    def per_record(read: Callable[[int], bytes], write: Callable[[bytes], int]) -> float:
        rounds = []
        for _ in range(args.repeat):
            records = requests(args.records)
            started = time.perf_counter()
            for record in records:
                server_in.write(record)
                read(16384)
                write(_REPLY)
                server_out.read()
            rounds.append((time.perf_counter() - started) / args.records)
        return statistics.median(rounds)

    wrapped = per_record(server.read, server.write)
    c_object = server._sslobj  # type: ignore[attr-defined]  # the wrapper's C object
    direct = per_record(c_object.read, c_object.write)
    print(f"{ssl.OPENSSL_VERSION}, {server.version()} {server.cipher()[0]}")  # type: ignore[index]
    print(f"through SSLObject:     {wrapped * 1e6:.2f} µs per request record and reply record")
    print(f"through its C object:  {direct * 1e6:.2f} µs")


if __name__ == "__main__":
    main()
