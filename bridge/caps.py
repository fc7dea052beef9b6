"""Counts of live connections behind the caps (``max_connections``, ``max_tunnels``), exact across workers.

A daemon counts, per key (a frontend tunnel, a backend listener or listener/route), the
connections it admitted and that have not ended, and refuses one more when a cap is reached.
With worker processes (:mod:`bridge.arbiter`) a cap is the daemon's, not each worker's: the
counts live in shared memory that the main process maps before forking.

:class:`LocalCounts` is one process's (a dict under a lock). :class:`SharedCounts` is a table in
a ``memfd`` mapped ``MAP_SHARED``: a row per key (found by a 64-bit hash of the key, probing
linearly), a column per worker slot. A worker only ever changes its own column, so a worker
that dies leaves a column the main process zeroes before forking its replacement (its tunnels
died with it). Checking a cap (sum the row, then add one) holds ``lockf`` on the memfd for
those few instructions; with no cap a worker only writes its own cell. The table holds
:data:`ROWS` keys; a key beyond that is not capped across workers (logged once).

No library does this: multiprocessing's shared values need a manager process or a fixed set of
names known before the fork, and reloads add keys.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import struct
import threading
from typing import Protocol

log = logging.getLogger("tcpbridge")

#: Keys one daemon's shared table holds (tunnels, listeners, listener/route pairs together).
ROWS = 4096
_CELL = struct.Struct("=q")
_HASH = struct.Struct("=Q")


class Counts(Protocol):
    """Live connections per key, with caps (``limit`` 0: none)."""

    def try_acquire(self, key: str, limit: int) -> bool: ...
    def release(self, key: str) -> None: ...
    def count(self, key: str) -> int: ...


class LocalCounts:
    """The counts of a daemon that is one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def try_acquire(self, key: str, limit: int) -> bool:
        """Count one more for ``key`` unless ``limit`` (0: none) is reached; whether it was counted."""
        with self._lock:
            count = self._counts.get(key, 0)
            if limit and count >= limit:
                return False
            self._counts[key] = count + 1
            return True

    def release(self, key: str) -> None:
        with self._lock:
            count = self._counts.get(key, 0) - 1
            if count > 0:
                self._counts[key] = count
            else:
                self._counts.pop(key, None)

    def count(self, key: str) -> int:
        with self._lock:
            return self._counts.get(key, 0)


class SharedCounts:
    """The counts of a daemon with ``slots`` worker processes; see the module docstring.

    Made by the main process before forking; each worker calls :meth:`use_slot` first thing.
    """

    def __init__(self, slots: int, rows: int = ROWS) -> None:
        self.slots = slots
        self.rows = rows
        self._row_size = _HASH.size + slots * _CELL.size
        self._fd = os.memfd_create("tcpbridge-caps", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, rows * self._row_size)
        self._map = mmap.mmap(self._fd, rows * self._row_size)
        self._slot = 0
        self._lock = threading.Lock()  # lockf is per process: threads of one process take this first
        self._rows: dict[str, int] = {}  # key -> row offset, cached: rows never move
        self._warned = False

    def use_slot(self, slot: int) -> None:
        """Count from now on in column ``slot`` (a worker's own)."""
        self._slot = slot

    def clear_slot(self, slot: int) -> None:
        """Zero column ``slot``: its worker died, and the connections it counted with it."""
        with self._lock, self._locked():
            for row in range(self.rows):
                _CELL.pack_into(self._map, row * self._row_size + _HASH.size + slot * _CELL.size, 0)

    def try_acquire(self, key: str, limit: int) -> bool:
        with self._lock:
            offset = self._row(key)
            if offset is None:
                return True  # the table is full: not capped across workers (logged once)
            if not limit:
                self._add(offset, 1)
                return True
            with self._locked():
                if self._sum(offset) >= limit:
                    return False
                self._add(offset, 1)
                return True

    def release(self, key: str) -> None:
        with self._lock:
            offset = self._row(key)
            if offset is not None:
                self._add(offset, -1)

    def count(self, key: str) -> int:
        with self._lock:
            offset = self._row(key)
            return 0 if offset is None else self._sum(offset)

    def _row(self, key: str) -> int | None:
        """The offset of ``key``'s row, claiming a free one if it has none yet; None if the table is full."""
        offset = self._rows.get(key)
        if offset is not None:
            return offset
        tag = int(_HASH.unpack(hashlib.blake2b(key.encode(), digest_size=8).digest())[0]) | 1  # 0: a free row
        with self._locked():
            for probe in range(self.rows):
                offset = ((tag + probe) % self.rows) * self._row_size
                found = int(_HASH.unpack_from(self._map, offset)[0])
                if found == 0:
                    _HASH.pack_into(self._map, offset, tag)
                if found in (0, tag):
                    self._rows[key] = offset
                    return offset
        if not self._warned:
            self._warned = True
            log.warning("more than %d capped names: %r and later ones are capped per worker only", self.rows, key)
        return None

    def _add(self, offset: int, delta: int) -> None:
        cell = offset + _HASH.size + self._slot * _CELL.size
        _CELL.pack_into(self._map, cell, _CELL.unpack_from(self._map, cell)[0] + delta)

    def _sum(self, offset: int) -> int:
        start = offset + _HASH.size
        return sum(_CELL.unpack_from(self._map, start + i * _CELL.size)[0] for i in range(self.slots))

    def _locked(self) -> _FileLock:
        return _FileLock(self._fd)


class _FileLock:
    """``lockf`` on the whole memfd: one process at a time (released by the kernel if the holder dies)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
