"""``--procs N``: the same load from N processes, so the load generator is not the bottleneck.

Each worker is a fresh interpreter (multiprocessing's "spawn" start method: no state forked
from the parent) running one ``LoadGenerator`` over its share of the connections, messages
and rate. The parent talks to each over a pipe:

    worker -> parent   ("ready",) | ("cannot-connect", message, failed_attempts)
    parent -> worker   ("go", start)        start: a time.perf_counter() value
    worker -> parent   ("progress", elapsed, measuring, replies, errors)   about once a second
    parent -> worker   ("stop",)            Ctrl-C: end the measurement now
    worker -> parent   ("result", LoadResult.to_dict()) | ("failed", message)

Every worker connects first and they all start at the same instant (perf_counter is the
system's monotonic clock, shared by every process), so the windows line up and the counters
add up; the histograms merge bucket by bucket. A worker whose parent disappears stops.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import signal
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any, Final

import trio

from ..errors import ConnectError
from .histogram import LatencyHistogram
from .load import LoadGenerator, raise_open_file_limit
from .result import LoadResult, Progress, Snapshot
from .spec import MAX_RUN_SECONDS, LoadSpec
from .verify import ERROR_KINDS

__all__ = ["STOP_SIGNALS", "Interrupted", "WorkerError", "run_workers"]

# The first ends the measurement early (the run still reports), the second abandons it.
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)

# A fresh interpreter importing trio takes a fraction of a second, more on a busy machine.
_STARTUP_SECONDS: Final = 30.0
# Lead time between "go" and the common start, so every worker hears it before it is due.
_START_DELAY: Final = 0.05
_POLL_SECONDS: Final = 0.2
_JOIN_SECONDS: Final = 5.0


class WorkerError(Exception):
    """A worker process failed or stopped answering."""


class Interrupted(Exception):
    """A second Ctrl-C or SIGTERM: abandon the run."""


class _Worker:
    __slots__ = ("index", "pipe", "process", "snapshot")

    def __init__(
        self, index: int, process: BaseProcess, pipe: multiprocessing.connection.Connection
    ) -> None:
        self.index = index
        self.process = process
        self.pipe = pipe
        self.snapshot: tuple[float, bool, int, int] | None = None

    def send(self, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError):  # it may have exited already
            self.pipe.send(message)

    def receive(self) -> tuple[Any, ...]:
        try:
            message: tuple[Any, ...] = self.pipe.recv()
        except (EOFError, OSError):
            self.process.join(_JOIN_SECONDS)
            raise WorkerError(
                f"worker {self.index} exited unexpectedly (code {self.process.exitcode})"
            ) from None
        if message[0] == "failed":
            raise WorkerError(f"worker {self.index} failed: {message[1]}")
        return message


def run_workers(spec: LoadSpec, procs: int, progress: Progress | None = None) -> LoadResult:
    """Run ``spec`` spread over ``procs`` worker processes; return the merged result.

    A first Ctrl-C or SIGTERM ends the measurement early and still reports; a second
    abandons the run.

    Raises:
        ConnectError: no worker could open a single connection.
        WorkerError: a worker crashed or did not finish in time.
        Interrupted: the run was abandoned by a second signal.
    """
    context = multiprocessing.get_context("spawn")
    workers: list[_Worker] = []
    interrupts = 0
    finished = False

    def on_stop_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupts
        interrupts += 1

    previous_handlers = {signum: signal.signal(signum, on_stop_signal) for signum in STOP_SIGNALS}
    try:
        for index, share in enumerate(spec.split(procs)):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=worker_main,
                args=(theirs, share, progress is not None),
                name=f"ackservice-bench-{index}",
                daemon=True,
            )
            process.start()
            theirs.close()
            workers.append(_Worker(index, process, ours))

        # Every worker connects and says so.
        results: list[LoadResult] = []
        ready: list[_Worker] = []
        failures: list[str] = []
        deadline = time.monotonic() + _STARTUP_SECONDS + spec.connect_timeout
        for worker, message in _each_reply(workers, deadline, lambda: interrupts > 0):
            if message[0] == "ready":
                ready.append(worker)
            elif message[0] == "cannot-connect":
                failures.append(message[1])
                results.append(_connect_failures(spec, message[2]))
        if interrupts:
            raise Interrupted
        if not ready:
            raise ConnectError(failures[0])

        # All start at once.
        start = time.perf_counter() + _START_DELAY
        for worker in ready:
            worker.send(("go", start))
        deadline = (
            time.monotonic()
            + spec.warmup
            + (spec.duration if spec.duration is not None else MAX_RUN_SECONDS)
            + 2 * spec.reply_timeout
            + _STARTUP_SECONDS
        )
        stop_sent = False

        def interrupted() -> bool:
            nonlocal stop_sent
            if interrupts >= 2:
                raise Interrupted
            if interrupts and not stop_sent:
                stop_sent = True
                for worker in ready:
                    worker.send(("stop",))
            return False

        for _, message in _each_reply(ready, deadline, interrupted, progress):
            if message[0] == "result":
                results.append(LoadResult.from_dict(message[1]))
        finished = True
        return LoadResult.merge(results)
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        for worker in workers:
            # Finished workers exit by themselves; after a failure, do not wait for them.
            worker.process.join(_JOIN_SECONDS if finished else 0.1)
            if worker.process.is_alive():
                worker.process.terminate()  # SIGTERM to its PID
                worker.process.join(_JOIN_SECONDS)
            worker.pipe.close()


def _each_reply(
    workers: list[_Worker],
    deadline: float,
    interrupted: Callable[[], bool],
    progress: Progress | None = None,
) -> list[tuple[_Worker, tuple[Any, ...]]]:
    """Wait for one final message from each worker (relaying progress); in worker order."""
    pending = {worker.pipe: worker for worker in workers}
    replies: dict[int, tuple[_Worker, tuple[Any, ...]]] = {}
    while pending:
        if interrupted():
            return []
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            late = [str(worker.index) for worker in pending.values()]
            which = f"worker {late[0]}" if len(late) == 1 else f"workers {', '.join(late)}"
            raise WorkerError(f"{which} did not answer in time")
        for pipe in multiprocessing.connection.wait(
            list(pending), timeout=min(remaining, _POLL_SECONDS)
        ):
            worker = pending[pipe]  # type: ignore[index]
            message = worker.receive()
            if message[0] == "progress":
                worker.snapshot = message[1:]
                if progress is not None:
                    progress(_combined(workers))
                continue
            replies[worker.index] = (worker, message)
            del pending[pipe]  # type: ignore[arg-type]
    return [replies[index] for index in sorted(replies)]


def _combined(workers: list[_Worker]) -> Snapshot:
    snapshots = [worker.snapshot for worker in workers if worker.snapshot is not None]
    return Snapshot(
        elapsed=max(s[0] for s in snapshots),
        measuring=any(s[1] for s in snapshots),
        replies=sum(s[2] for s in snapshots),
        errors=sum(s[3] for s in snapshots),
    )


def _connect_failures(spec: LoadSpec, attempts: int) -> LoadResult:
    """The result of a worker that could not open any connection."""
    errors = dict.fromkeys(ERROR_KINDS, 0)
    errors["connect"] = attempts
    return LoadResult(
        histogram=LatencyHistogram(),
        elapsed=0.0,
        acks=0,
        replies=0,
        sent=0,
        connections=0,
        errors=errors,
        err_codes={},
        cpu=[],
        size=spec.size,
    )


# -- in the worker process ---------------------------------------------------------------------


def worker_main(
    pipe: multiprocessing.connection.Connection, spec: LoadSpec, progress: bool
) -> None:
    """The entry point of a worker process: run the load, report over ``pipe``."""
    # Ctrl-C reaches the whole process group; it is the parent's to handle (it says "stop").
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        trio.run(_work, pipe, spec, progress)
    except Exception as exc:
        with contextlib.suppress(OSError):
            pipe.send(("failed", f"{type(exc).__name__}: {exc}"))
    finally:
        pipe.close()


async def _work(
    pipe: multiprocessing.connection.Connection, spec: LoadSpec, progress: bool
) -> None:
    raise_open_file_limit(spec.connections)
    generator = LoadGenerator(spec)
    try:
        await generator.connect()
    except ConnectError as exc:
        pipe.send(("cannot-connect", str(exc), generator.tally.errors["connect"]))
        return
    pipe.send(("ready",))
    with trio.fail_after(_STARTUP_SECONDS):
        message = await _receive(pipe)
    if message is None or message[0] != "go":
        return  # the parent gave up (or asked to stop before the start)
    start = trio.current_time() + (message[1] - time.perf_counter())

    def report(snapshot: Snapshot) -> None:
        pipe.send(
            ("progress", snapshot.elapsed, snapshot.measuring, snapshot.replies, snapshot.errors)
        )

    result: LoadResult | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_obey_parent, pipe, generator, nursery.cancel_scope)
        result = await generator.run(start, on_progress=report if progress else None)
        nursery.cancel_scope.cancel()
    if result is not None:
        pipe.send(("result", result.to_dict()))


async def _receive(pipe: multiprocessing.connection.Connection) -> tuple[Any, ...] | None:
    """The parent's next message; ``None`` once the parent is gone."""
    await trio.lowlevel.wait_readable(pipe.fileno())
    try:
        message: tuple[Any, ...] = pipe.recv()
    except (EOFError, OSError):
        return None
    return message


async def _obey_parent(
    pipe: multiprocessing.connection.Connection,
    generator: LoadGenerator,
    everything: trio.CancelScope,
) -> None:
    """Stop early when the parent says so; abandon everything if the parent is gone."""
    while True:
        message = await _receive(pipe)
        if message is None:
            everything.cancel()
            return
        if message[0] == "stop":
            generator.stop()
