"""Everything a daemon does as a process: logging, limits, readiness, and signals.

All signal handling lives here, in :class:`Service`: handlers only queue the
signal number and write a byte to a pipe; the main thread reads the queue and
acts, so nothing complicated ever runs inside a signal handler.

* SIGTERM, SIGINT: stop accepting, let live tunnels finish for ``drain_timeout``
  seconds, reset what is left, exit 0.
* SIGHUP: configuration reload is not implemented yet; the signal is logged and
  ignored rather than killing the daemon (its default action).
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
from typing import Protocol

from bridge.tunnel import TunnelRegistry

log = logging.getLogger("tcpbridge")

#: syslog priorities of Python's levels, for journald's ``<N>`` line prefixes.
SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class Daemon(Protocol):
    """What :class:`Service` drives: the frontend or the backend."""

    def bind(self) -> None: ...
    def start(self) -> None: ...
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
    """Runs one daemon: bind, announce readiness, wait for signals, drain, exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, daemon: Daemon, registry: TunnelRegistry, *, name: str, drain_timeout: float) -> None:
        self.daemon = daemon
        self.registry = registry
        self.name = name
        self.drain_timeout = drain_timeout
        self._queue: list[int] = []
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit status. Binding errors propagate."""
        raise_open_files_limit()
        self.daemon.bind()
        self._install_handlers()
        self.registry.start()
        self.daemon.start()
        sd_notify(f"READY=1\nSTATUS={self.daemon.describe()}")
        log.info("%s ready: %s", self.name, self.daemon.describe())
        while True:
            signum = self._next_signal()
            if signum in (signal.SIGTERM, signal.SIGINT):
                return self._stop(signal.Signals(signum).name)
            if signum == signal.SIGHUP:
                log.warning("SIGHUP: configuration reload is not supported yet; restart the daemon to apply changes")

    def _install_handlers(self) -> None:
        for signum in self.SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._queue.append(signum)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b".")

    def _next_signal(self) -> int:
        while not self._queue:
            select.select([self._wake_read], [], [], 1.0)
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_read, 512)
        return self._queue.pop(0)

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
