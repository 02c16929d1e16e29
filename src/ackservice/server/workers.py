"""``--workers N``: a supervisor process and N worker processes serving one port.

Python serves one core per process, so the server scales over cores with processes. Each
worker is a whole server (``python -m ackservice.server`` with the same settings) that binds
the port with ``SO_REUSEPORT``: the kernel hashes each new connection onto one worker's listen
queue, and a worker serves it to the end with no hand-off between processes. The supervisor
binds the same port first with a socket that never listens (so ``--port 0`` means one port
for all, and the port stays reserved while a worker restarts) and then only watches:

- it starts the workers, each in a session of its own (a terminal's Ctrl-C reaches only the
  supervisor, which stops them in order);
- each worker sends a line of JSON on a socket pair every heartbeat interval (its counts, for
  ``/metrics``); a worker silent for ``--worker-timeout`` (stopped, stuck in a loop) is killed
  and replaced: the kernel would otherwise go on queueing half of the new connections for it;
- a worker that exits is restarted, after a backoff that doubles (0.1 s to 10 s) while
  workers keep dying young, logged as ``worker_exited`` and ``worker_started``; a worker that
  fails ``--worker-start-attempts`` starts in a row (it never says it is ready) ends the
  supervisor (``worker_start_abandoned``): the others drain, and the service manager's
  ``Restart=`` takes over;
- SIGTERM/SIGINT: ``STOPPING=1``, SIGTERM to every worker (each answers what it read, says
  ``ERR 0 shutting-down`` and exits 0 within ``--shutdown-grace``), exit 0 once every
  worker that served exited 0 (one still starting may end by the SIGTERM itself; one in a
  restart backoff is not restarted); a second signal is passed on (each worker then exits
  at once) and the exit code is 130;
- SIGHUP is passed on (every process reopens its ``--log-file``); to a worker still
  starting (no handler yet: SIGHUP would kill it) once it says it is ready;
- ``READY=1`` (systemd) once every worker serves; ``/metrics``, ``/healthz`` and ``/readyz``
  are served by the supervisor alone, from the workers' latest counts, labelled ``worker``.

With socket activation the sockets systemd passed are handed to every worker instead: they
then share one listen queue (nothing to hash; whoever accepts first serves).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog
import trio

from ..logconfig import reopen_log_file
from .systemd import ActivatedSocket, Notifier

if TYPE_CHECKING:
    # Imported when metrics are served: prometheus-client costs every process ~20 ms to load.
    from .metrics import Snapshot

__all__ = [
    "DEFAULT_WORKER_START_ATTEMPTS",
    "WORKER_ENV",
    "StartFailed",
    "SupervisorSettings",
    "WorkerRole",
    "cpu_count",
    "supervise",
]

log = structlog.get_logger(__name__)

WORKER_ENV: Final = "_ACKSERVICE_WORKER"
"""Set by the supervisor for each worker: what it needs to know (JSON). Internal: not a
setting, and removed from the worker's environment once read."""

_BACKOFF_FIRST: Final = 0.1
_BACKOFF_MAX: Final = 10.0
# A worker that served this long before dying is not "dying young": the backoff restarts.
_HEALTHY_RUN: Final = 30.0
# Before its first heartbeat a worker imports, opens its store and binds: allow more time.
_START_ALLOWANCE: Final = 30.0
# After the graceful shutdown's grace period, how long the supervisor still waits for its
# workers before killing them (they cancel what is left and log their totals).
_EXIT_MARGIN: Final = 5.0

DEFAULT_WORKER_START_ATTEMPTS: Final = 5
"""Failed starts in a row of one worker (it exits or is killed before it is ready) after
which the supervisor gives up. Five is systemd's own ``StartLimitBurst=`` default; with the
restart backoff before each (from 0.1 s, doubling) they take a few seconds: enough for a
passing hitch, and soon enough that the service manager, which sees the exit, decides what
next."""

EXIT_OK: Final = 0
EXIT_FORCED: Final = 130


def cpu_count() -> int:
    """The CPUs this process may run on (``auto``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """What a worker process was told by its supervisor."""

    worker_id: int
    channel_fd: int
    port: int
    heartbeat: float

    @classmethod
    def from_environment(cls, environ: dict[str, str] | os._Environ[str]) -> WorkerRole | None:
        text = environ.pop(WORKER_ENV, None)
        if text is None:
            return None
        fields = json.loads(text)
        return cls(int(fields["id"]), int(fields["fd"]), int(fields["port"]), fields["heartbeat"])


@dataclass(slots=True)
class SupervisorSettings:
    workers: int
    worker_argv: list[str]
    """The command of a worker: this program with the same arguments."""
    environ: Mapping[str, str]
    host: str
    port: int
    worker_timeout: float
    shutdown_grace: float
    activated: Sequence[ActivatedSocket] = ()
    notifier: Notifier = field(default_factory=lambda: Notifier(None))
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    port_file: Path | None = None
    worker_start_attempts: int = DEFAULT_WORKER_START_ATTEMPTS


@dataclass(slots=True)
class _Slot:
    """One worker position: the process filling it now, and what it last said."""

    worker_id: int
    process: trio.Process | None = None
    spawning: bool = False
    """Its process is being created (in a thread): a shutdown must wait for it too."""
    ready: bool = False
    ever_ready: bool = False
    last_heard: float = 0.0
    snapshot: Snapshot | None = None
    restarts: int = 0
    unready_starts: int = 0
    """Starts in a row whose worker has not said it is ready (yet): 0 once one does."""
    exit_code: int | None = None
    hangup_pending: bool = False
    """A SIGHUP arrived while the worker was starting: passed on once it is ready."""
    serving_at_stop: bool = False
    """Its worker was ready at the first stop signal: it must then exit 0."""
    running_at_stop: bool = False
    """A worker ran (ready or still starting) at the first stop signal; if not, the slot
    was waiting out a restart backoff and has nothing left to stop."""

    def stopped_cleanly(self, code: int | None) -> bool:
        """Whether ``code`` (its worker's exit status, None if it never ran) is a clean end
        to the graceful shutdown for this slot."""
        if self.serving_at_stop:
            return code == 0
        if not self.running_at_stop:
            return True
        # Still starting: until its signal receiver is installed, SIGTERM's default action
        # ends it, and it had nothing to drain.
        return code in (0, -signal.SIGTERM)


class StartFailed(Exception):
    """A worker cannot start: it exited before any worker served (the settings or the store
    are wrong), or failed ``worker_start_attempts`` starts in a row.

    Attributes:
        code: the failed worker's last exit code; 0 or below when it had none (killed by a
            signal, or never spawned).
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


async def supervise(
    settings: SupervisorSettings,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run the workers until a stop signal; the process exit code.

    Raises:
        OSError: the port could not be reserved.
        StartFailed: a worker exited before any worker served, or failed
            ``settings.worker_start_attempts`` starts in a row.
    """
    supervisor = _Supervisor(settings)
    return await supervisor.run(task_status)


class _Supervisor:
    def __init__(self, settings: SupervisorSettings) -> None:
        self.settings = settings
        self.slots = [_Slot(worker_id) for worker_id in range(1, settings.workers + 1)]
        self.stopping = False
        self.forced = False
        self._all_ready = trio.Event()
        self._exited = trio.Event()
        """Set (and replaced) each time a slot has no process any more: see ``_slot_emptied``."""
        self._start_failed: StartFailed | None = None
        self._port = settings.port
        self._addresses: list[tuple[str, int]] = []
        self._metrics_addresses: list[str] = []

    async def run(self, task_status: trio.TaskStatus[list[tuple[str, int]]]) -> int:
        from .sockets import bind_sockets

        settings = self.settings
        reserved: list[trio.socket.SocketType] = []
        if settings.activated:
            # Served instead of --host/--port: the port too is theirs (it is what `listening`
            # reports), never the --port default.
            self._addresses = [_format(a.sock.getsockname()) for a in settings.activated]
            self._port = self._addresses[0][1]
        else:
            if settings.port != 0:
                # A bind without SO_REUSEPORT fails if anyone holds the port, including
                # another server's SO_REUSEPORT group, which ours would otherwise join
                # silently and take a share of its connections.
                for probe in await bind_sockets(
                    settings.host, settings.port, reuse_port=False, listen=False
                ):
                    probe.close()
            # Never listening: the port is ours while workers come and go, and the kernel
            # queues no connection here.
            reserved = await bind_sockets(
                settings.host, settings.port, reuse_port=True, listen=False
            )
            self._port = reserved[0].getsockname()[1]
            self._addresses = [_format(sock.getsockname()) for sock in reserved]
        signals_to_watch = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        try:
            metrics_listeners: list[trio.SocketListener] = []
            if settings.metrics_port is not None:
                # Bound before the nursery and before any worker starts: a port in use is a
                # plain MetricsPortError (one line from the CLI) with no worker to clean up.
                from .monitoring import open_monitoring_listeners

                metrics_listeners = await open_monitoring_listeners(
                    settings.metrics_host, settings.metrics_port
                )
            with trio.open_signal_receiver(*signals_to_watch) as signals:
                async with trio.open_nursery() as nursery:
                    if metrics_listeners:
                        await nursery.start(self._serve_metrics, metrics_listeners)
                    for slot in self.slots:
                        nursery.start_soon(self._keep_running, slot, nursery.cancel_scope)
                    nursery.start_soon(self._announce_ready)
                    task_status.started(self._addresses)
                    # Until _kill_stragglers (started by the first stop signal) ends it all,
                    # once every worker exited.
                    async for signum in signals:
                        self._on_signal(signal.Signals(signum), nursery)
        finally:
            for sock in reserved:
                sock.close()
        if self._start_failed is not None:
            raise self._start_failed
        codes = [slot.exit_code for slot in self.slots]
        log.info(
            "supervisor_stopped",
            forced=self.forced,
            worker_exit_codes=codes,
            restarts=sum(slot.restarts for slot in self.slots),
        )
        if self.forced:
            return EXIT_FORCED
        clean = all(slot.stopped_cleanly(slot.exit_code) for slot in self.slots)
        return EXIT_OK if clean else 1

    # --- signals ---------------------------------------------------------------------

    def _on_signal(self, signum: signal.Signals, nursery: trio.Nursery) -> None:
        """Act on ``signum``: pass SIGHUP on; stop the workers gracefully, then at once."""
        if signum == signal.SIGHUP:
            reopen_log_file()
            self._pass_on_hangup()
            log.info("signal_forwarded", signal=signum.name)
            return
        if self.stopping:
            log.warning("forced_exit", signal=signum.name)
            self.forced = True
            self._signal_workers(signal.SIGTERM)  # their second signal: exit at once
            return
        log.info("signal_received", signal=signum.name)
        self._begin_stop()
        nursery.start_soon(self._kill_stragglers, nursery.cancel_scope)

    def _begin_stop(self) -> None:
        """Start the graceful shutdown: SIGTERM to every worker (the caller then bounds it
        with ``_kill_stragglers``)."""
        self.stopping = True
        for slot in self.slots:
            slot.serving_at_stop = slot.ready
            slot.running_at_stop = slot.process is not None
        self.settings.notifier.notify(stopping=1, status=f"shutting down {len(self.slots)} workers")
        self._signal_workers(signal.SIGTERM)

    def _pass_on_hangup(self) -> None:
        """SIGHUP to every worker that is ready; the others get it once they are.

        A starting worker has no handler for SIGHUP yet (it says ``ready`` from inside its
        signal receiver), and the default action would kill it: during the service's
        start-up that stops the whole service. It may still have opened the old log file,
        so it is not skipped, only deferred.
        """
        for slot in self.slots:
            if slot.process is None or slot.process.returncode is not None:
                continue
            if slot.ready:
                slot.process.send_signal(signal.SIGHUP)
            else:
                slot.hangup_pending = True

    def _signal_workers(self, signum: signal.Signals) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                slot.process.send_signal(signum)

    async def _kill_stragglers(self, everything: trio.CancelScope) -> None:
        """Bound the shutdown: workers still running after their grace period (plus a
        margin for their own cancellation) are killed; then stop watching signals."""
        with trio.move_on_after(self.settings.shutdown_grace + _EXIT_MARGIN):
            await self._all_exited()
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                log.error("worker_killed", worker=slot.worker_id, pid=slot.process.pid)
                slot.process.kill()
        await self._all_exited()
        everything.cancel()

    def _slot_emptied(self) -> None:
        """Wake ``_all_exited``: a worker exited, or a spawn came to nothing."""
        self._exited.set()
        self._exited = trio.Event()

    async def _all_exited(self) -> None:
        while any(slot.process is not None or slot.spawning for slot in self.slots):
            await self._exited.wait()

    # --- one worker's life -----------------------------------------------------------

    async def _keep_running(self, slot: _Slot, everything: trio.CancelScope) -> None:
        backoff = _BACKOFF_FIRST
        while not self.stopping:
            started = trio.current_time()
            slot.unready_starts += 1  # _listen sets it back to 0 once the worker is ready
            code = await self._run_worker(slot)
            if self.stopping:
                return
            if (
                code is not None
                and code > 0
                and not slot.ever_ready
                and not self._all_ready.is_set()
            ):
                # It never served, and the server has not started: the settings (or the
                # store) are wrong, and every restart would fail the same way. Only an exit
                # code says so: a death by signal (the OOM killer, an operator's kill) is
                # the process's fate, not the settings', and a restart may well serve.
                self._start_failed = StartFailed(
                    f"a worker exited with code {code} before serving", code
                )
                self.stopping = True
                self._signal_workers(signal.SIGTERM)
                everything.cancel()
                return
            if slot.unready_starts >= self.settings.worker_start_attempts:
                await self._give_up(slot, code, everything)
                return
            if trio.current_time() - started >= _HEALTHY_RUN:
                backoff = _BACKOFF_FIRST
            log.warning("worker_restarting", worker=slot.worker_id, delay=round(backoff, 3))
            await trio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)
            slot.restarts += 1

    async def _give_up(self, slot: _Slot, code: int | None, everything: trio.CancelScope) -> None:
        """End the supervisor: the worker of ``slot`` failed its last
        ``worker_start_attempts`` starts. Retrying forever would hide a service that is
        short of a worker (or of all of them) from the service manager, whose ``Restart=``
        and start limits are made for this; the workers still serving drain first."""
        ending: dict[str, object]
        if code is None:
            ending, last = {"error": "could not be spawned"}, "not spawned"
        elif code < 0:
            name = signal.Signals(-code).name
            ending, last = {"signal": name}, f"killed by {name}"
        else:
            ending, last = {"exit_code": code}, f"exit code {code}"
        log.error(
            "worker_start_abandoned",
            worker=slot.worker_id,
            attempts=slot.unready_starts,
            **ending,
            hint="its own log lines say why; the other workers drain, the supervisor exits "
            "non-zero and the service manager decides (Restart=)",
        )
        self._start_failed = StartFailed(
            f"worker {slot.worker_id} failed to start {slot.unready_starts} times in a row "
            f"(last: {last})",
            0 if code is None else code,
        )
        self._begin_stop()
        await self._kill_stragglers(everything)

    async def _run_worker(self, slot: _Slot) -> int | None:
        """Start the worker of ``slot``, watch it until it exits; its exit code, or None if
        it could not be started (logged; the caller backs off and tries again)."""
        settings = self.settings
        heartbeat = min(1.0, settings.worker_timeout / 4)
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            _log_start_failed(slot, exc)
            return None
        env = dict(settings.environ)
        role = {"id": slot.worker_id, "fd": theirs.fileno(), "port": self._port}
        env[WORKER_ENV] = json.dumps({**role, "heartbeat": heartbeat})
        pass_fds = [theirs.fileno()]
        if settings.activated:
            env["LISTEN_FDS"] = str(len(settings.activated))
            env["LISTEN_FDNAMES"] = ":".join(a.name for a in settings.activated)
            pass_fds += [a.sock.fileno() for a in settings.activated]
        slot.spawning = True
        try:
            process = await trio.lowlevel.open_process(
                settings.worker_argv,
                env=env,
                pass_fds=pass_fds,
                start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor only
                stdin=subprocess.DEVNULL,
            )
        except BaseException as exc:
            ours.close()
            slot.spawning = False
            self._slot_emptied()  # no process came of it: nothing to wait for here
            if isinstance(exc, OSError):
                _log_start_failed(slot, exc)
                return None
            raise
        finally:
            theirs.close()
        # Spawning ends as the process is known: a stop that began meanwhile (it waited for
        # this slot, _all_exited) sees it, and it is sent SIGTERM just below.
        slot.spawning = False
        slot.process, slot.ready, slot.exit_code = process, False, None
        slot.hangup_pending = False  # a new process opens the log file afresh
        if self.stopping:
            # Started while the stop signal arrived (open_process runs in a thread): it
            # missed the SIGTERM sent to the others.
            slot.running_at_stop = True
            process.send_signal(signal.SIGTERM)
        slot.last_heard = trio.current_time() + _START_ALLOWANCE
        log.info("worker_started", worker=slot.worker_id, pid=process.pid)
        channel = trio.socket.from_stdlib_socket(ours)
        try:
            async with trio.open_nursery() as watching:
                watching.start_soon(self._listen, slot, channel)
                watching.start_soon(self._watch_heartbeat, slot, process, ours)
                code = await process.wait()
                watching.cancel_scope.cancel()
        finally:
            channel.close()
            with trio.CancelScope(shield=True):
                if process.returncode is None:  # cancelled: never leave a worker behind
                    process.kill()
                    await process.wait()
            # Its last figures go too: /metrics and /readyz must not report a dead worker's
            # connections or store as current.
            slot.process, slot.ready, slot.snapshot = None, False, None
            self._slot_emptied()
        slot.exit_code = code
        fields: dict[str, object] = {"worker": slot.worker_id, "pid": process.pid}
        if code < 0:
            fields["signal"] = signal.Signals(-code).name
        else:
            fields["exit_code"] = code
        if self.stopping and slot.stopped_cleanly(code):
            log.info("worker_exited", **fields)
        else:
            log.warning("worker_exited", **fields)
        return code

    async def _listen(self, slot: _Slot, channel: trio.socket.SocketType) -> None:
        """Read the worker's lines: ``ready`` once it serves, then heartbeats with counts."""
        buffered = b""
        while True:
            data = await channel.recv(65536)
            if not data:
                return
            buffered += data
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                message = json.loads(line)
                slot.last_heard = trio.current_time()
                if "snapshot" in message:
                    slot.snapshot = message["snapshot"]
                if message.get("ready") and not slot.ready:
                    slot.ready = slot.ever_ready = True
                    slot.unready_starts = 0
                    if slot.hangup_pending and slot.process is not None:
                        slot.hangup_pending = False
                        slot.process.send_signal(signal.SIGHUP)
                    if all(other.ready for other in self.slots):
                        self._all_ready.set()

    async def _watch_heartbeat(
        self, slot: _Slot, process: trio.Process, channel: socket.socket
    ) -> None:
        timeout = self.settings.worker_timeout
        while True:
            silent_for = trio.current_time() - slot.last_heard
            if silent_for > timeout and not self.stopping and not _has_queued_data(channel):
                log.error(
                    "worker_unresponsive",
                    worker=slot.worker_id,
                    pid=process.pid,
                    silent_for=round(silent_for, 3),
                    hint="killed and replaced",
                )
                process.kill()
                return
            await trio.sleep(min(timeout / 4, 0.25))

    async def _announce_ready(self) -> None:
        await self._all_ready.wait()
        where = ", ".join(f"{host}:{port}" for host, port in self._addresses)
        # The same fields as a single server's `listening` (cli.py), where the docs send
        # operators for the port --metrics-port 0 picked and the sockets systemd passed.
        extra: dict[str, Any] = {}
        if self.settings.activated:
            extra["fd_names"] = [inherited.name for inherited in self.settings.activated]
        if self._metrics_addresses:
            extra["metrics"] = self._metrics_addresses
        log.info(
            "listening",
            addresses=[f"{host}:{port}" for host, port in self._addresses],
            port=self._port,
            workers=len(self.slots),
            pid=os.getpid(),
            socket_activation=bool(self.settings.activated),
            **extra,
        )
        if self.settings.port_file is not None:
            from .cli import write_port_file

            write_port_file(self.settings.port_file, self._addresses)
        self.settings.notifier.notify(
            ready=1, status=f"{len(self.slots)} workers serving on {where}"
        )

    # --- metrics ---------------------------------------------------------------------

    def snapshots(self) -> list[tuple[str, Snapshot]]:
        return [
            (str(slot.worker_id), slot.snapshot) for slot in self.slots if slot.snapshot is not None
        ]

    async def _serve_metrics(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]],
    ) -> None:
        from prometheus_client import generate_latest

        from .metrics import AckServiceCollector, metrics_registry
        from .monitoring import MonitoringApp, format_address, serve_monitoring

        self._metrics_addresses = [
            format_address(listener.socket.getsockname()) for listener in listeners
        ]
        log.info("metrics_listening", addresses=self._metrics_addresses)
        registry = metrics_registry(AckServiceCollector(self.snapshots))
        registry.register(_SupervisorCollector(self))

        def accepting() -> bool:
            return not self.stopping and any(slot.ready for slot in self.slots)

        def store_available() -> bool:
            stores = [snap["store"] for _, snap in self.snapshots() if snap["store"]]
            return all(store["up"] for store in stores)

        app = MonitoringApp(
            lambda: generate_latest(registry),
            accepting,
            store_available,
            stopping=lambda: self.stopping,
        )
        await serve_monitoring(listeners, app, task_status=task_status)


class _SupervisorCollector:
    """Per-worker state only the supervisor knows."""

    def __init__(self, supervisor: _Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily(
            "ackservice_worker_up",
            "1 while the worker serves and answers heartbeats.",
            labels=["worker"],
        )
        restarts = CounterMetricFamily(
            "ackservice_worker_restarts", "Times the worker was restarted.", labels=["worker"]
        )
        for slot in self._supervisor.slots:
            up.add_metric([str(slot.worker_id)], int(slot.ready))
            restarts.add_metric([str(slot.worker_id)], slot.restarts)
        yield up
        yield restarts

    def describe(self) -> list[Any]:
        return []


def _log_start_failed(slot: _Slot, exc: OSError) -> None:
    """Log that the worker of ``slot`` could not be started (out of file descriptors or
    processes): not the settings' fault, so not the end of the supervisor either."""
    log.error(
        "worker_start_failed",
        worker=slot.worker_id,
        error=exc.strerror or str(exc),
        hint="tried again after a backoff",
    )


def _has_queued_data(channel: socket.socket) -> bool:
    """Whether the worker's lines wait unread on ``channel``.

    A supervisor that was itself paused (SIGSTOP, a stalled VM) past ``--worker-timeout``
    wakes with its heartbeat checks and the heartbeats queued meanwhile ready in the same
    batch, and a check may run before ``_listen`` has read them: a worker is silent only if
    nothing is waiting either (``_listen`` then reads it and updates ``last_heard``).
    """
    try:
        return bool(channel.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # BlockingIOError: nothing queued; anything else: no heartbeat either
        return False


def _format(address: tuple[Any, ...]) -> tuple[str, int]:
    host, port = address[0], address[1]
    return (f"[{host}]" if ":" in host else host), int(port)


# --- the worker's side --------------------------------------------------------------------


async def report_to_supervisor(
    role: WorkerRole,
    snapshot: Callable[[], Snapshot],
    on_supervisor_gone: Callable[[], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Tell the supervisor this worker serves, then send a heartbeat with ``snapshot()``
    every ``role.heartbeat`` seconds, from the event loop (a stuck loop stops them); call
    ``on_supervisor_gone()`` once the supervisor is gone (its end of the channel closed)."""
    channel = trio.socket.from_stdlib_socket(socket.socket(fileno=role.channel_fd))
    # Started before the first send: a supervisor killed just now makes it fail (EPIPE),
    # and that must end in a graceful shutdown, not a start that never completed.
    task_status.started()
    with channel:
        try:
            await channel.send(json.dumps({"ready": True, "pid": os.getpid()}).encode() + b"\n")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_for_close, channel, nursery.cancel_scope)
                while True:
                    line = json.dumps({"snapshot": snapshot()}).encode() + b"\n"
                    await channel.send(line)
                    await trio.sleep(role.heartbeat)
        except OSError:
            pass
    log.warning("supervisor_gone", hint="shutting down gracefully")
    on_supervisor_gone()


async def _watch_for_close(channel: trio.socket.SocketType, scope: trio.CancelScope) -> None:
    try:
        while await channel.recv(4096):
            pass
    except OSError:
        pass
    scope.cancel()


def worker_argv(argv: Sequence[str] | None) -> list[str]:
    """A worker's command: this interpreter running the server with the same arguments."""
    return [sys.executable, "-m", "ackservice.server", *(sys.argv[1:] if argv is None else argv)]
