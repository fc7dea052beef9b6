"""Everything a daemon does as a process: logging, limits, readiness, and signals.

All signal handling lives here. :class:`SignalQueue` is the mechanism: a
handler only queues the signal number and writes a byte to a pipe; a thread
waiting on the pipe reads the queue and acts, so nothing complicated ever runs
inside a signal handler. :class:`Service` (the daemons) and ``tcpbridge
connect`` (:mod:`bridge.connect`) both use it. The daemons, like gunicorn's
arbiter:

* SIGTERM, SIGINT: stop accepting, then drain: let live tunnels, and
  connections still opening (accepted, their websocket or target being
  dialled), finish for up to ``drain_timeout`` seconds; reset what is left,
  exit 0. Signals are still read during the drain: a second SIGTERM or SIGINT
  ends it at once (what is left is reset, exit 0), and SIGHUP is ignored.
* SIGQUIT: fast stop, at any time: stop accepting, reset every tunnel, exit 0.
* SIGHUP: re-read the configuration and apply the difference (see the daemons'
  ``apply``); an invalid file or a port that cannot be bound is logged and the
  running configuration stays in force.

It speaks systemd's notify protocol when ``NOTIFY_SOCKET`` is set: ``READY=1``
once every listener is bound, ``RELOADING=1``/``READY=1`` around a reload,
``STOPPING=1``, a live ``STATUS=`` line, and ``WATCHDOG=1`` pings while the
housekeeping thread keeps ticking (during a drain too, so ``WatchdogSec``
does not cut a long one short).

Why this module is over 450 lines: it holds all of a process's signal handling in one place, on
purpose, with the logging, limits and readiness that the same start-up and shutdown order ties to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import resource
import select
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any, Protocol

from bridge import __version__, events
from bridge.config import Config, ConfigError
from bridge.control import ControlServer, default_socket_path
from bridge.events import Event
from bridge.journal import JournalHandler, priority
from bridge.listen import ListenError
from bridge.outcome import Kind, Outcome
from bridge.registry import TunnelRegistry
from bridge.stats import Snapshot, human_bytes

log = logging.getLogger("tcpbridge")


class Daemon(Protocol):
    """What :class:`Service` drives: the frontend or the backend."""

    def bind(self) -> None: ...
    def start(self) -> None: ...
    def apply(self, config: Any) -> list[str]: ...
    def close_listeners(self) -> None: ...
    def describe(self) -> str: ...
    def listeners(self) -> list[dict[str, Any]]: ...


class Endpoint(Protocol):
    """The control socket or the metrics server: bound when created, then started and stopped."""

    def start(self) -> None: ...
    def stop(self) -> None: ...


class JournalFormatter(logging.Formatter):
    """``<N>message``: journald reads the priority from the prefix and adds its own timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        level = priority(record.levelno)
        return "\n".join(f"<{level}>{line}" for line in super().format(record).splitlines())


def stderr_is_journal() -> bool:
    """True when stderr is connected to journald (``$JOURNAL_STREAM`` names its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        stat = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def set_log_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


def setup_logging(level: str, tag: str = "", target: str = "auto", identifier: str = "tcpbridge") -> None:
    """Log to the journal or stderr, as ``target`` (``log_target``) says; ``tag`` starts every message.

    ``auto``: the journal's native protocol (:mod:`bridge.journal`, with fields) when stderr is the
    journal, else stderr. ``journal``: the native protocol whatever stderr is. ``stderr``: stderr only,
    with journald's ``<N>`` priority prefixes when it is the journal. Lines the journal cannot take go
    to stderr. ``identifier`` is the journal's ``SYSLOG_IDENTIFIER`` (the program's name).
    """
    # Documented logging optimisations: none of our formats shows the caller, thread or
    # process, and looking them up costs every record (getpid() is a system call).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    stream = logging.StreamHandler(sys.stderr)
    journal_stream = stderr_is_journal()
    if journal_stream:
        stream.setFormatter(JournalFormatter(f"{tag}%(message)s"))
    else:
        stream.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(message)s"))
    handler: logging.Handler = stream
    if target == "journal" or (target == "auto" and journal_stream):
        handler = JournalHandler(identifier, fallback=stream)
        handler.setFormatter(logging.Formatter(f"{tag}%(message)s"))
    root = logging.getLogger()
    for previous in root.handlers:  # a worker's copy of its main process's handler (and its socket)
        previous.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each tunnel holds two sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
    return soft


def sd_notify(message: str) -> bool:
    """Send ``message`` to systemd's notification socket, if there is one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)
        return False
    return True


#: How long a thread may hold the GIL before one waiting for it forces a switch (CPython's
#: default is 5 ms). Every pump thread gives the GIL up at its next recv/send within
#: microseconds anyway; with the default, thousands of threads woken at once (5000 clients
#: closing together) each re-asked for it every 5 ms, and the daemon spent 85 s of both CPUs
#: on that contention before the last tunnel closed. With 0.2 s: 6 s, 5 of them the pool's idle exit.
GIL_SWITCH_INTERVAL = 0.2
#: How often a drain looks whether the last tunnel has ended (signals wake it at once).
DRAIN_POLL = 0.05
#: How long tunnels get to end after they were reset, before the daemon exits anyway.
RESET_WAIT = 5.0


class SignalQueue:
    """Signals as a queue of numbers, read by one thread that waits on a self-pipe.

    The handler only appends the number and writes a byte to the pipe: whatever
    the signal means is done by the thread calling :meth:`next` (any thread;
    handlers themselves always run on the main thread). Installing and restoring
    handlers must happen on the main thread.
    """

    def __init__(self) -> None:
        self._queue: deque[int] = deque()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._previous: dict[int, Any] = {}

    def install(self, signals: Iterable[int]) -> None:
        """Queue ``signals`` from now on (instead of their previous handlers)."""
        for signum in signals:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        """Put the previous handlers back, and wake a thread waiting in :meth:`next`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        self.wake()

    def next(self, timeout: float | None) -> int | None:
        """The oldest queued signal, waiting for one up to ``timeout`` seconds (None: no limit).

        None when none came: after ``timeout``, after :meth:`wake`, or now and
        then earlier (callers loop).
        """
        if not self._queue:
            select.select([self._read], [], [], timeout)
        with contextlib.suppress(OSError):  # BlockingIOError: the pipe is empty
            os.read(self._read, 512)
        try:
            return self._queue.popleft()
        except IndexError:
            return None

    def wake(self) -> None:
        """Make :meth:`next` return now, with a signal if one is queued, else None."""
        with contextlib.suppress(OSError):  # BlockingIOError: full, so a wake-up is pending anyway
            os.write(self._write, b".")

    def post(self, signum: int) -> None:
        """Queue ``signum`` as if it had been received (from any thread)."""
        self._queue.append(signum)
        self.wake()

    def close(self) -> None:
        """Close the pipe (a forked worker closes its copy of main's queue)."""
        os.close(self._read)
        os.close(self._write)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self._queue.append(signum)
        self.wake()


class StatusView:
    """The live view of a daemon, from wherever its numbers come from: one process, or the sum of workers.

    ``summary`` is the one-line ``STATUS=``; ``document`` is what the control
    socket answers and ``tcpbridge status`` prints.
    """

    def __init__(self, name: str, snapshot: Callable[[], Snapshot], listeners: Callable[[], list[dict[str, Any]]],
                 describe: Callable[[], str], config: Callable[[], Config | None]) -> None:
        self.name = name
        self.snapshot = snapshot
        self.listeners = listeners
        self.describe = describe
        self.config = config
        self._last_status = ""

    def notify_status(self) -> None:
        """Send the summary as sd_notify ``STATUS=`` when it changed since the last one sent."""
        status = self.summary(self.snapshot())
        if status != self._last_status:
            sd_notify(f"STATUS={status}")
            self._last_status = status

    def summary(self, snap: Snapshot) -> str:
        totals = snap.totals()
        moved = human_bytes(totals["bytes_to_websocket"] + totals["bytes_to_tcp"])
        failed = f", {totals['open_failures']} failed to open" if totals["open_failures"] else ""
        return f"{self.describe()}, {totals['active']} active tunnels, {totals['opened']} served, " \
               f"{moved} moved{failed}"

    def document(self, request: str = "status",
                 extra: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        """The status document; ``extra()``, read after the snapshot, adds keys of its own."""
        if request != "status":
            return {"error": f"unknown request {request[:40]!r}; the only one is 'status'"}
        snap = self.snapshot()
        closed: dict[str, int] = {}
        failures: dict[str, int] = {}
        for stats in snap.labels.values():
            for kind, count in stats.closed.items():
                closed[kind] = closed.get(kind, 0) + count
            for reason, count in stats.failures.items():
                failures[reason] = failures.get(reason, 0) + count
        live = sorted(snap.live, key=lambda tunnel: -tunnel.age)
        config = self.config()
        return {
            "daemon": self.name, "version": __version__, "pid": os.getpid(), "uptime_seconds": round(snap.uptime, 3),
            "config": config.source if config else None,
            "summary": self.summary(snap),
            "listeners": self.listeners(),
            "tunnels": [{"id": t.id, "label": t.label, "peer": t.peer, "destination": t.destination,
                         "age_seconds": round(t.age, 3), "bytes_to_websocket": t.bytes_to_ws,
                         "bytes_to_tcp": t.bytes_to_tcp, "resume": t.resume, "resumes": t.resumes} for t in live],
            "totals": {**snap.totals(), "closed": dict(sorted(closed.items())),
                       "open_failures_by_reason": dict(sorted(failures.items())), "resumes": snap.resumes()},
            "reloads": snap.reloads,
            **(extra() if extra else {}),
        }


class Service:
    """Runs one daemon: bind, announce readiness, then act on signals until told to stop.

    The main thread only waits for signals and runs the daemon's periodic duties
    (``STATUS=`` updates and watchdog pings); listeners, tunnels and the
    housekeeper have threads of their own.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
    #: Signals that stop the daemon: SIGTERM and SIGINT with a drain, SIGQUIT at once.
    STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)

    def __init__(self, daemon: Daemon, registry: TunnelRegistry, *, name: str,
                 load: Callable[[], Config], log_level_flag: str | None = None,
                 on_ready: Callable[[], None] | None = None,
                 on_reloaded: Callable[[bool, list[str]], None] | None = None) -> None:
        """``on_ready`` (a worker process of :mod:`bridge.arbiter`): called once serving, instead of
        telling systemd and logging "ready"; such a service binds no control socket or metrics
        endpoint either, its main process does. ``on_reloaded(ok, changes)``: after each reload."""
        self.daemon = daemon
        self.registry = registry
        self.name = name
        self.load = load
        self.log_level_flag = log_level_flag
        self.drain_timeout = 10.0
        self.signals = SignalQueue()
        self._watchdog_interval = watchdog_interval()
        self._config: Config | None = None
        self._endpoints: list[Endpoint] = []  # the control socket and the metrics server
        self._on_ready = on_ready
        self._on_reloaded = on_reloaded
        self.view = StatusView(name, registry.snapshot, daemon.listeners, daemon.describe, lambda: self._config)

    def run(self, config: Config) -> int:
        """Serve ``config`` until SIGTERM/SIGINT/SIGQUIT; return the exit status. Binding errors propagate."""
        raise_open_files_limit()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self.drain_timeout = config.drain_timeout
        self._config = config
        self.daemon.bind()
        if self._on_ready is None:
            self._bind_endpoints(config)
        self.signals.install(self.SIGNALS)
        self.registry.start()
        self.daemon.start()
        for endpoint in self._endpoints:
            endpoint.start()
        if self._on_ready is None:
            sd_notify(f"READY=1\nSTATUS={self.status()}")
            log.info("%s ready: %s", self.name, self.daemon.describe())
        else:
            self._on_ready()
        while True:
            signum = self.signals.next(timeout=self._tick())
            if signum in self.STOP_SIGNALS:
                return self._stop(signum)
            if signum == signal.SIGHUP:
                self._reload()

    def status(self) -> str:
        """The one-line live summary sent as sd_notify ``STATUS=`` (and shown by ``tcpbridge status``)."""
        return self.view.summary(self.registry.snapshot())

    def status_document(self, request: str = "status") -> dict[str, Any]:
        """What the control socket answers: the live view ``tcpbridge status`` prints."""
        return self.view.document(request)

    def _known_labels(self) -> list[str]:
        return [label for listener in self.daemon.listeners() for label in listener["labels"]]

    # -- control socket and metrics endpoint --------------------------------------

    def _bind_endpoints(self, config: Config) -> None:
        self._endpoints = bind_endpoints(config, self.name, self.status_document, self.registry.snapshot,
                                         self._known_labels)

    def _stop_endpoints(self) -> None:
        for endpoint in self._endpoints:
            endpoint.stop()
        self._endpoints.clear()

    # -- periodic duties ------------------------------------------------------

    def _tick(self) -> float:
        """Send STATUS= when it changed and a watchdog ping if the daemon makes progress; return the next delay."""
        self.view.notify_status()
        if self._watchdog_interval is None:
            return 1.0
        # The housekeeper ticks every quarter second; if it stopped, the daemon is stuck.
        if self.registry.housekeeper_alive(within=self._watchdog_interval):
            sd_notify("WATCHDOG=1")
        return min(1.0, self._watchdog_interval)

    # -- reload and stop ------------------------------------------------------

    def _reload(self) -> None:
        notify_reloading()
        changes: list[str] = []
        ok = False
        try:
            config = self.load()
            changes = self.daemon.apply(config)
        except ConfigError as exc:
            self.registry.stats.reloaded(ok=False)
            for problem in exc.problems:
                log.error("reload rejected, still running the previous configuration: %s", problem,
                          extra=self._reload_mark(Event.RELOAD_REJECTED))
            changes = list(exc.problems)
        except ListenError as exc:
            self.registry.stats.reloaded(ok=False)
            log.error("reload rejected, still running the previous configuration: %s", exc,
                      extra=self._reload_mark(Event.RELOAD_REJECTED))
            changes = [str(exc)]
        else:
            ok = True
            self.registry.stats.reloaded(ok=True)
            self._adopt(config)
            self.drain_timeout = config.drain_timeout
            set_log_level(self.log_level_flag or config.log_level)
            for change in changes:
                log.info("reload: %s", change)
            log.info("reload of %s done: %s", config.source, "; ".join(changes) if changes else "no changes",
                     extra=self._reload_mark(Event.RELOAD_APPLIED))
        sd_notify(f"READY=1\nSTATUS={self.status()}")
        if self._on_reloaded is not None:
            self._on_reloaded(ok, changes)

    def _reload_mark(self, event: Event) -> dict[str, object]:
        """The journal mark of a reload's result line: a worker's lines carry none, its main process's do."""
        return events.mark(None if self._on_ready is not None else event)

    def _stop(self, signum: int) -> int:
        """Stop accepting, then drain (SIGTERM, SIGINT) or reset at once (SIGQUIT); the exit status."""
        sd_notify("STOPPING=1")
        started = time.monotonic()
        self.daemon.close_listeners()
        if signum == signal.SIGQUIT:
            log.warning("%s: SIGQUIT: fast stop, resetting %s", self.name, self._left())
            self._reset()
        else:
            log.info("%s: %s received; no longer accepting, draining %s for up to %g s "
                     "(a second SIGTERM or SIGINT ends the drain at once)", self.name, signal.Signals(signum).name,
                     self._left(), self.drain_timeout)
            self._drain(started + self.drain_timeout)
        self.registry.stop()
        self._stop_endpoints()
        log.info("%s stopped after %.1f s%s", self.name, time.monotonic() - started,
                 "" if signum == signal.SIGQUIT else " of draining")
        return 0

    def _drain(self, deadline: float) -> None:
        """Wait until no tunnel is live or opening, reading signals meanwhile; reset what is left at ``deadline``.

        A second SIGTERM or SIGINT, or SIGQUIT, ends the drain at once; SIGHUP is
        ignored. STATUS= and watchdog pings carry on.
        """
        next_tick = time.monotonic()
        while not self.registry.wait_idle(0):
            now = time.monotonic()
            if now >= deadline:
                log.warning("%s: drain timeout: resetting %s", self.name, self._left())
                self._reset()
                return
            if now >= next_tick:
                next_tick = now + self._tick()
            signum = self.signals.next(timeout=max(0.0, min(DRAIN_POLL, deadline - now, next_tick - now)))
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.warning("%s: second %s during the drain: resetting %s now", self.name,
                            signal.Signals(signum).name, self._left())
                self._reset()
                return
            if signum == signal.SIGQUIT:
                log.warning("%s: SIGQUIT: fast stop, resetting %s", self.name, self._left())
                self._reset()
                return
            if signum == signal.SIGHUP:
                log.info("%s: SIGHUP during the drain: ignored (the daemon is stopping)", self.name)

    def _left(self) -> str:
        """The tunnels a drain waits for, for the log: "3 tunnels" or "3 tunnels (and 1 connection still opening)"."""
        opening = self.registry.opening_count()
        connections = "connection" if opening == 1 else "connections"
        return f"{len(self.registry.active())} tunnels" + (f" (and {opening} {connections} still opening)"
                                                            if opening else "")

    def _reset(self) -> None:
        """Reset every tunnel and refuse those still opening, then give the tunnels a moment to end."""
        self.registry.abort_all(Outcome(Kind.SHUTDOWN, "abort: daemon shutting down"))
        # Connections still opening are not waited for: their dial cannot be cut short, and the
        # registry resets them as they finish, or the exit does.
        self.registry.wait_idle(RESET_WAIT, opening=False)

    def _adopt(self, config: Config) -> None:
        """Remember a reloaded ``config`` (see :func:`adopt`)."""
        if self._config is not None:
            self._config = adopt(self._config, config)


def notify_reloading() -> None:
    """Tell systemd a reload started (``RELOADING=1`` with the time it needs to tell reloads apart)."""
    sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def bind_endpoints(config: Config, name: str, status_document: Callable[[str], dict[str, Any]],
                   snapshot: Callable[[], Snapshot], known_labels: Callable[[], list[str]],
                   processes: tuple[Callable[[], list[int]], Callable[[], float]] | None = None) -> list[Endpoint]:
    """Bind the control socket and the metrics endpoint (if any); ListenError names what failed.

    ``processes`` (a daemon with workers): the live pids and the CPU seconds of ended ones, for
    ``process_*`` metrics summed over all of them."""
    endpoints: list[Endpoint] = []
    path = config.control_socket or default_socket_path()
    if path:
        control = ControlServer(path, status_document)
        control.bind()
        endpoints.append(control)
    if config.metrics:
        from bridge.metrics import SummedProcessCollector, start_metrics  # prometheus-client is optional

        summed = SummedProcessCollector(*processes) if processes else None
        endpoints.append(start_metrics(config.metrics, name, snapshot, known_labels, summed))
    return endpoints


#: Keys read at start only: a reload that changes one keeps the running value and says so.
START_TIME_KEYS = ("metrics", "control_socket", "workers", "cpu_affinity", "log_target")


def adopt(running: Config, new: Config) -> Config:
    """``new`` with the start-time keys of ``running``; a warning for each one that changed."""
    for key in START_TIME_KEYS:
        if getattr(new, key) != getattr(running, key):
            log.warning("reload: %s changed; it applies at the next restart (still %s)", key,
                        getattr(running, key) or "off")
    return dataclasses.replace(new, **{key: getattr(running, key) for key in START_TIME_KEYS})


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd asked for (``WATCHDOG_USEC``), or None when it asked for none."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2
