"""Log lines to systemd's journal through its native protocol, with fields a user can filter on.

Each record becomes one datagram to ``/run/systemd/journal/socket`` (systemd.journal-fields(7),
"Native Journal Protocol" in systemd's docs): ``MESSAGE`` (the line's text, as stderr would
show it), ``PRIORITY`` (syslog's, as the ``<N>`` prefixes gave it), ``SYSLOG_IDENTIFIER``, and
for lines marked with :mod:`bridge.events` a ``MESSAGE_ID`` and ``TCPBRIDGE_*`` fields. journald
adds the trusted fields itself (``_PID`` is the worker process that wrote the line,
``_SYSTEMD_UNIT``, ...), so ``journalctl -u UNIT`` shows these lines as it showed stderr's.

A record too large for a datagram goes as a sealed memfd, as sd_journal_send does. If the journal
cannot take a record (no socket, a send error, a send blocked for :data:`SEND_TIMEOUT`), the
record is written by the fallback handler (stderr) instead: a line is never lost.

Why not a library: python-systemd's ``JournalHandler`` does this, but it is a C extension built
against libsystemd (headers and a compiler at install time, no wheels), for what is one datagram
format of a few dozen lines. No other module of the package imports this one but :mod:`bridge.service`.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct

from bridge import events

SOCKET_PATH = "/run/systemd/journal/socket"
#: How long one record may wait for room in journald's socket before it goes to stderr instead.
SEND_TIMEOUT = 1.0
#: syslog priorities of Python's levels (journald's ``PRIORITY``, and the ``<N>`` stderr prefixes).
SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
#: The prefix of the fields :mod:`bridge.events` facts become (``tunnel`` -> ``TCPBRIDGE_TUNNEL``).
FIELD_PREFIX = "TCPBRIDGE_"
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def priority(levelno: int) -> int:
    """The syslog priority of a Python log level (info for levels in between)."""
    return SYSLOG_PRIORITY.get(levelno, 6)


def encode(fields: list[tuple[str, str]]) -> bytes:
    """One journal entry in the native protocol: ``NAME=value`` lines, or for a value holding a
    newline, the name, a newline, the value's length as 64-bit little-endian and the value."""
    parts = []
    for name, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            parts.append(name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name.encode() + b"=" + data + b"\n")
    return b"".join(parts)


def entry_fields(record: logging.LogRecord, message: str, identifier: str) -> list[tuple[str, str]]:
    """The fields of ``record``, whose formatted text is ``message``."""
    fields = [("MESSAGE", message), ("PRIORITY", str(priority(record.levelno))), ("SYSLOG_IDENTIFIER", identifier)]
    event, facts = events.read(record)
    if event is not None:
        fields.append(("MESSAGE_ID", event.value))
    fields.extend((FIELD_PREFIX + name.upper(), _text(value)) for name, value in facts.items())
    return fields


def _text(value: str | int | float) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


class JournalHandler(logging.Handler):
    """Writes records to the journal at ``path``; a record it cannot write goes to ``fallback``."""

    def __init__(self, identifier: str, fallback: logging.Handler, path: str = SOCKET_PATH) -> None:
        super().__init__()
        self.identifier = identifier
        self.fallback = fallback
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(SEND_TIMEOUT)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            datagram = encode(entry_fields(record, self.format(record), self.identifier))
        except Exception:
            self.handleError(record)
            return
        try:
            self._send(datagram)
        except OSError:
            self.fallback.handle(record)

    def _send(self, datagram: bytes) -> None:
        try:
            self._sock.sendto(datagram, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):  # too large for a datagram
                raise
            self._send_memfd(datagram)

    def _send_memfd(self, datagram: bytes) -> None:
        fd = os.memfd_create("tcpbridge-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(datagram)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            fds = array.array("i", [fd])
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        self.fallback.close()
        super().close()
