"""Everything a daemon does as a process: logging, limits, readiness, and signals.

All signal handling lives here, in :class:`Service`: handlers only queue the
signal number and write a byte to a pipe; the main thread reads the queue and
acts, so nothing complicated ever runs inside a signal handler.

* SIGTERM, SIGINT: stop accepting, let live tunnels finish for ``drain_timeout``
  seconds, reset what is left, exit 0.
* SIGHUP: re-read the configuration and apply the difference (see the daemons'
  ``apply``); an invalid file or a port that cannot be bound is logged and the
  running configuration stays in force.

It speaks systemd's notify protocol when ``NOTIFY_SOCKET`` is set: ``READY=1``
once every listener is bound, ``RELOADING=1``/``READY=1`` around a reload,
``STOPPING=1``, a live ``STATUS=`` line, and ``WATCHDOG=1`` pings while the
housekeeping thread keeps ticking.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from bridge.config import Config, ConfigError
from bridge.listen import ListenError
from bridge.tunnel import TunnelRegistry

log = logging.getLogger("tcpbridge")

#: syslog priorities of Python's levels, for journald's ``<N>`` line prefixes.
SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class Daemon(Protocol):
    """What :class:`Service` drives: the frontend or the backend."""

    def bind(self) -> None: ...
    def start(self) -> None: ...
    def apply(self, config: Any) -> list[str]: ...
    def close_listeners(self) -> None: ...
    def describe(self) -> str: ...


class JournalFormatter(logging.Formatter):
    """``<N>message``: journald reads the priority from the prefix and adds its own timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


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


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
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


class Service:
    """Runs one daemon: bind, announce readiness, then act on signals until told to stop.

    The main thread only waits for signals and runs the daemon's periodic duties
    (``STATUS=`` updates and watchdog pings); listeners, tunnels and the
    housekeeper have threads of their own.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, daemon: Daemon, registry: TunnelRegistry, *, name: str,
                 load: Callable[[], Config], log_level_flag: str | None = None) -> None:
        self.daemon = daemon
        self.registry = registry
        self.name = name
        self.load = load
        self.log_level_flag = log_level_flag
        self.drain_timeout = 10.0
        self._queue: list[int] = []
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._watchdog_interval = watchdog_interval()
        self._last_status = ""

    def run(self, config: Config) -> int:
        """Serve ``config`` until SIGTERM/SIGINT; return the exit status. Binding errors propagate."""
        raise_open_files_limit()
        self.drain_timeout = config.drain_timeout
        self.daemon.bind()
        self._install_handlers()
        self.registry.start()
        self.daemon.start()
        sd_notify(f"READY=1\nSTATUS={self.status()}")
        log.info("%s ready: %s", self.name, self.daemon.describe())
        while True:
            signum = self._next_signal(timeout=self._tick())
            if signum in (signal.SIGTERM, signal.SIGINT):
                return self._stop(signal.Signals(signum).name)
            if signum == signal.SIGHUP:
                self._reload()

    def status(self) -> str:
        """The one-line live summary sent as sd_notify ``STATUS=``."""
        active = len(self.registry.active())
        return f"{self.daemon.describe()}, {active} active tunnels, {self.registry.total_opened} served"

    # -- signals --------------------------------------------------------------

    def _install_handlers(self) -> None:
        for signum in self.SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._queue.append(signum)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b".")

    def _next_signal(self, timeout: float) -> int | None:
        if not self._queue:
            select.select([self._wake_read], [], [], timeout)
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_read, 512)
        return self._queue.pop(0) if self._queue else None

    # -- periodic duties ------------------------------------------------------

    def _tick(self) -> float:
        """Send STATUS= when it changed and a watchdog ping if the daemon makes progress; return the next delay."""
        status = self.status()
        if status != self._last_status:
            sd_notify(f"STATUS={status}")
            self._last_status = status
        if self._watchdog_interval is None:
            return 1.0
        # The housekeeper ticks every quarter second; if it stopped, the daemon is stuck.
        if self.registry.housekeeper_alive(within=self._watchdog_interval):
            sd_notify("WATCHDOG=1")
        return min(1.0, self._watchdog_interval)

    # -- reload and stop ------------------------------------------------------

    def _reload(self) -> None:
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        try:
            config = self.load()
            changes = self.daemon.apply(config)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload rejected, still running the previous configuration: %s", problem)
        except ListenError as exc:
            log.error("reload rejected, still running the previous configuration: %s", exc)
        else:
            self.drain_timeout = config.drain_timeout
            set_log_level(self.log_level_flag or config.log_level)
            for change in changes:
                log.info("reload: %s", change)
            log.info("reload of %s done: %s", config.source, "; ".join(changes) if changes else "no changes")
        sd_notify(f"READY=1\nSTATUS={self.status()}")

    def _stop(self, why: str) -> int:
        sd_notify("STOPPING=1")
        live = len(self.registry.active())
        log.info("%s: %s received; no longer accepting, draining %d tunnels for up to %g s",
                 self.name, why, live, self.drain_timeout)
        self.daemon.close_listeners()
        started = time.monotonic()
        if not self.registry.wait_idle(self.drain_timeout):
            left = len(self.registry.active())
            log.warning("%s: drain timeout: resetting %d tunnels still open", self.name, left)
            self.registry.abort_all("abort: daemon shutting down")
            self.registry.wait_idle(5.0)
        self.registry.stop()
        log.info("%s stopped after %.1f s of draining", self.name, time.monotonic() - started)
        return 0


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd asked for (``WATCHDOG_USEC``), or None when it asked for none."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2
