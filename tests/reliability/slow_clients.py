"""A crowd of slow connections for scenario 6 (slowloris), run as its own process so that
its hundreds of tasks do not share an event loop with the clients whose latency the test
measures.

    python tests/reliability/slow_clients.py --port P --trickling 500 --silent 500
        --interval 0.5 --within 30

Opens every connection, prints ``ready`` on stdout, then the trickling ones send one byte
(never a newline) every ``--interval`` seconds while the silent ones send nothing. Each
reads what the server says until the server ends the connection, then closes. At the end
it prints one JSON object: for each connection its kind, what it was told and how long
after connecting the server ended it. Everything stops after ``--within`` seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import trio

# Connections opened at once: quick, without a burst of SYNs beyond the listen queue.
CONNECT_CONCURRENCY = 100


async def crowd(port: int, trickling: int, silent: int, interval: float) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    streams: list[tuple[str, trio.SocketStream, float]] = []
    slots = trio.Semaphore(CONNECT_CONCURRENCY)

    async def connect(kind: str) -> None:
        async with slots:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            streams.append((kind, stream, time.monotonic()))

    async with trio.open_nursery() as nursery:
        for kind in ["trickling"] * trickling + ["silent"] * silent:
            nursery.start_soon(connect, kind)
    print("ready", flush=True)

    async def slow(kind: str, stream: trio.SocketStream, connected_at: float) -> None:
        told = b""
        async with stream, trio.open_nursery() as nursery:
            if kind == "trickling":

                async def trickle() -> None:
                    try:
                        while True:
                            await trio.sleep(interval)
                            await stream.send_all(b"x")
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass

                nursery.start_soon(trickle)
            try:
                while data := await stream.receive_some():
                    told += data
                reason = "eof"
            except trio.BrokenResourceError:
                reason = "reset"
            ended_after = time.monotonic() - connected_at
            nursery.cancel_scope.cancel()
        results.append(
            {
                "kind": kind,
                "told": told.decode(errors="replace"),
                "end": reason,
                "after": round(ended_after, 4),
            }
        )

    async with trio.open_nursery() as nursery:
        for kind, stream, connected_at in streams:
            nursery.start_soon(slow, kind, stream, connected_at)
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--trickling", type=int, default=500)
    parser.add_argument("--silent", type=int, default=500)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--within", type=float, default=60.0)
    args = parser.parse_args()

    async def bounded() -> list[dict[str, object]]:
        with trio.move_on_after(args.within):
            return await crowd(args.port, args.trickling, args.silent, args.interval)
        return []

    results = trio.run(bounded)
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
