"""The origin's side of HTTP passthrough: connections to the origin, their pool, and each exchange on one.

An exchange is framed by h11 in the client role (:class:`OriginExchange`). The pool is ours:
urllib3's (the well-kept one) hands out ``http.client`` connections that parse answers themselves
and cannot send a request body while an early answer is read, and h11 keeps no sockets.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast
from urllib.parse import urlsplit

import h11

from bridge import http1
from bridge.config import Address
from bridge.sockets import describe_error

#: Largest piece of a body read or written at once; what bounds memory per request.
PIECE = 64 * 1024
#: Seconds the origin may stay silent while it owes us bytes (the answer's head or body); then 504 or a cut.
ORIGIN_TIMEOUT = 300.0
#: Idle connections kept per origin, and how long one may idle before it is closed instead of reused.
POOL_SIZE = 8
POOL_IDLE_SECONDS = 30.0
#: Limit on what an origin (or a chunked request) may send us outside bodies: a head, a chunk line, trailers.
MAX_LINE = 64 * 1024

#: Header fields as (name, value), decoded as ISO-8859-1.
Headers = list[tuple[str, str]]


class PassthroughError(Exception):
    """The exchange failed; ``status`` is what the client is told if nothing was sent to it yet."""

    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class NoAnswer(PassthroughError):
    """The origin closed or reset the connection before sending a byte of its answer."""


def origin_of(url: str) -> Address:
    """The host and port of a (validated) ``http://host[:port]`` passthrough URL."""
    parts = urlsplit(url)
    return Address(parts.hostname or "localhost", parts.port or 80)


@dataclass
class OriginConnection:
    """One connection to an origin (each exchange on it is framed by its own :class:`OriginExchange`)."""

    origin: Address
    sock: socket.socket
    idle_since: float = 0.0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def abort(self) -> None:
        """Shut the socket down (waking any thread blocked on it); :meth:`close` still follows."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def looks_alive(self) -> bool:
        """An idle keep-alive connection has nothing to read; EOF or stray bytes mean it is done."""
        poller = select.poll()
        try:
            poller.register(self.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False


class OriginPool:
    """A few idle keep-alive connections per origin, shared by one listener's requests; newest reused first."""

    def __init__(self, size: int = POOL_SIZE, idle_seconds: float = POOL_IDLE_SECONDS) -> None:
        self._size = size
        self._idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._idle: dict[Address, list[OriginConnection]] = {}
        self._closed = False

    def acquire(self, origin: Address, connect_timeout: float) -> tuple[OriginConnection, bool]:
        """A live idle connection (reused: True) or a new one; raise PassthroughError(502) if none can be made."""
        now = time.monotonic()
        stale: list[OriginConnection] = []
        found: OriginConnection | None = None
        with self._lock:
            idle = self._idle.get(origin, [])
            while idle and found is None:  # bounded: at most POOL_SIZE entries
                candidate = idle.pop()
                if now - candidate.idle_since < self._idle_seconds and candidate.looks_alive():
                    found = candidate
                else:
                    stale.append(candidate)
        for conn in stale:
            conn.close()
        if found is not None:
            return found, True
        return self._connect(origin, connect_timeout), False

    @staticmethod
    def _connect(origin: Address, connect_timeout: float) -> OriginConnection:
        try:
            sock = socket.create_connection((origin.host, origin.port), timeout=connect_timeout)
        except TimeoutError:
            raise PassthroughError(HTTPStatus.BAD_GATEWAY,
                                   f"cannot connect: timed out after {connect_timeout:g} s") from None
        except OSError as exc:
            raise PassthroughError(HTTPStatus.BAD_GATEWAY, f"cannot connect: {describe_error(exc)}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(ORIGIN_TIMEOUT)
        return OriginConnection(origin, sock)

    def release(self, conn: OriginConnection) -> None:
        """Keep ``conn`` for a later request (it finished a whole exchange), or close it if the pool is full."""
        conn.idle_since = time.monotonic()
        with self._lock:
            idle = self._idle.setdefault(conn.origin, [])
            if not self._closed and len(idle) < self._size:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [conn for idle in self._idle.values() for conn in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


class OriginExchange:
    """One request and its answer on an origin connection, framed by h11 in the client role.

    The request body is sent by :class:`_BodySender` while this side reads the answer, so every h11
    call is made under one lock, which is never held while waiting on the socket.
    """

    def __init__(self, conn: OriginConnection) -> None:
        self.conn = conn
        self._http = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_LINE)
        self._lock = threading.Lock()
        #: Whether any byte of an answer arrived (a connection closed before that may be retried).
        self.answered = False

    def send(self, event: h11.Event) -> None:
        """Send ``event``: OSError if the connection fails, h11.LocalProtocolError if it cannot be framed."""
        with self._lock:
            data = self._http.send(event)
        if data:
            self.conn.sock.sendall(data)

    def next_event(self) -> h11.Event:
        """The origin's next event (reading as needed): OSError (TimeoutError after :data:`ORIGIN_TIMEOUT`)
        if the connection fails, h11.RemoteProtocolError if what it sent is not HTTP/1.1."""
        while True:
            with self._lock:
                event = self._http.next_event()
            if event is h11.PAUSED:
                raise h11.RemoteProtocolError("bytes after the answer")
            if event is not h11.NEED_DATA:
                return cast(h11.Event, event)
            data = self.conn.sock.recv(PIECE)
            self.answered = self.answered or bool(data)
            with self._lock:
                self._http.receive_data(data)

    @property
    def reusable(self) -> bool:
        """Whether the exchange is complete on both sides and the connection may carry another."""
        with self._lock:
            return (self._http.our_state is h11.DONE and self._http.their_state is h11.DONE
                    and not self._http.trailing_data[0])

    def after_switch(self) -> bytes:
        """After the origin's 101: what it sent past the answer's head."""
        with self._lock:
            return bytes(self._http.trailing_data[0])


def fields(headers: Headers) -> list[tuple[bytes, bytes]]:
    """Header fields as h11 takes them: the bytes as they came (ISO-8859-1)."""
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def answer_of(event: h11.Response | h11.InformationalResponse) -> OriginAnswer:
    status = event.status_code
    reason = event.reason.decode("latin-1").strip()
    if not reason:
        with contextlib.suppress(ValueError):
            reason = HTTPStatus(status).phrase
    fields = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers.raw_items()]
    return OriginAnswer(f"HTTP/{event.http_version.decode('ascii')}", status, reason, http1.Headers(fields))


@dataclass
class OriginAnswer:
    """The head of an origin's answer (final or informational)."""

    version: str
    status: int
    reason: str
    headers: http1.Headers
