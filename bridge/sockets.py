"""Socket-level helpers of the websocket endpoint and the pump: reads sized to the traffic, the send
lock that serialises frames and tells whether a send is stuck, what TCP_INFO and SIOCOUTQ say about a
peer, and shutdowns that never raise."""

from __future__ import annotations

import errno
import fcntl
import select
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import suppress

#: Bytes read from the websocket's socket per recv while data streams in (see :class:`Receiver`).
RECV_CHUNK = 256 * 1024
#: Bytes read per recv otherwise: below glibc malloc's mmap threshold (128 KiB). A 256 KiB
#: recv buffer is mmapped and unmapped on every call, ~12 µs, most of a small message's cost.
SMALL_RECV_CHUNK = 64 * 1024


class Receiver:
    """Reads a websocket's socket: small reads for small messages, large ones while data streams in.

    A read that filled its buffer means more is queued: the next read is
    :data:`RECV_CHUNK`; any other read sets it back to :data:`SMALL_RECV_CHUNK`.
    Buffers are allocated per read, never held between reads.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._size = SMALL_RECV_CHUNK

    def recv(self) -> bytes:
        data = self._sock.recv(self._size)
        self._size = RECV_CHUNK if len(data) == self._size else SMALL_RECV_CHUNK
        return data

    def recv_into(self, space: memoryview) -> int:
        """Read into ``space`` (the rest of a large frame: its size is known, so no sizing applies)."""
        return self._sock.recv_into(space)


def describe_error(exc: BaseException) -> str:
    """A short lower-case reason for a failed socket, TLS or system call, for log lines and refusals:
    a TLS error's reason (``certificate verify failed``), an OSError's errno text (``connection refused``),
    ``timed out`` for a socket timeout, else the message or the exception's type."""
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or (exc.args[1] if len(exc.args) > 1 else exc)
        return str(reason).replace("_", " ").lower()
    if isinstance(exc, OSError):
        if exc.strerror:
            return exc.strerror.lower()
        if isinstance(exc, TimeoutError):
            return "timed out"
        if exc.errno and exc.errno in errno.errorcode:
            return errno.errorcode[exc.errno].lower()
    return str(exc) or type(exc).__name__


def unacknowledged_segments(sock: socket.socket) -> int | None:
    """Segments we sent that the peer's kernel has not acknowledged (``tcpi_unacked`` of TCP_INFO).

    Zero means the peer's machine is alive and reading its network, whatever its
    process is doing; None when the kernel does not say.
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    except OSError:
        return None
    return int(struct.unpack_from("I", info, 24)[0]) if len(info) >= 28 else None


def failed_sockets(socks: Iterable[socket.socket]) -> set[int]:
    """The file descriptors among ``socks`` whose connection failed (a RST arrived, keepalive timed out).

    One poll() for all of them; the errors are not consumed.
    """
    poller = select.poll()
    for sock in socks:
        with suppress(OSError):
            fd = sock.fileno()
            if fd >= 0:
                poller.register(fd, select.POLLERR)
    return {fd for fd, events in poller.poll(0) if events & select.POLLERR}


def peer_hung_up(sock: socket.socket) -> bool:
    """Whether the peer has ended its side of the connection (its FIN arrived, read or not) or reset it."""
    poller = select.poll()
    try:
        poller.register(sock, select.POLLRDHUP)
    except (OSError, ValueError):  # closed
        return False
    return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


def send_queue_bytes(sock: socket.socket) -> int | None:
    """Bytes in the socket's send queue (written, not yet acknowledged by the peer), or None if unknown."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")  # SIOCOUTQ for TCP
    except (OSError, ValueError):
        return None
    return int(struct.unpack("i", raw)[0])


def tcp_bytes_acked(sock: socket.socket) -> int | None:
    """Bytes the peer's kernel has acknowledged on this connection so far (``tcpi_bytes_acked``), or None.

    Only ever grows, and only when the peer takes bytes: window probes to a peer
    whose receive window is closed do not move it.
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 128)
    except OSError:
        return None
    return int(struct.unpack_from("Q", info, 120)[0]) if len(info) >= 128 else None


def send_progress(sock: socket.socket) -> tuple[int | None, int | None] | None:
    """A value that changes whenever the peer takes bytes we wrote: (bytes acknowledged, send queue).

    Compare two readings: equal means nothing moved in between. None when the
    kernel tells neither (then progress cannot be told from a stall).
    """
    acked, queued = tcp_bytes_acked(sock), send_queue_bytes(sock)
    return None if acked is None and queued is None else (acked, queued)


def writable(sock: socket.socket, timeout: float = 0.0) -> bool:
    """Whether a small write (a few control frames, at most a few hundred bytes) to ``sock`` cannot block.

    Waits at most ``timeout`` seconds (0: answers now). POLLOUT on a TCP socket
    means at least a third of its send buffer is free, far more than such a
    write needs. A failed socket counts as writable: the write then fails at once.
    """
    poller = select.poll()
    try:
        poller.register(sock, select.POLLOUT)
    except (OSError, ValueError):  # closed
        return False
    return bool(poller.poll(max(0, int(timeout * 1000))))


def shutdown_socket(sock: socket.socket) -> None:
    """Shut a (possibly TLS) socket down in both directions, waking any blocked thread.

    ``ssl.SSLSocket.shutdown`` drops its SSL object, which would crash a thread
    blocked in an SSL read; shutting the underlying descriptor down wakes it safely.
    """
    with suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class SendLock:
    """Serialises whole frames from the two pump threads and the housekeeper.

    It also tells whether the peer is keeping up: :attr:`sending` is true while a
    frame is being written with :meth:`held` (a peer that stopped reading keeps it
    true), and :attr:`last_send_done` is when the last write finished.
    :meth:`try_send` is for writes that must not wait long (control frames).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sending = False
        self.last_send_done = time.monotonic()

    def held(self) -> SendLock:
        """``with lock.held():`` one frame is written (a class, not a generator: this is per frame)."""
        return self

    def __enter__(self) -> None:
        self._lock.acquire()
        self.sending = True

    def __exit__(self, *exc: object) -> None:
        self.sending = False
        self.last_send_done = time.monotonic()
        self._lock.release()

    def try_send(self, send: Callable[[], bool], *, wait: float) -> bool:
        """Run ``send`` under the lock if the lock can be had within ``wait`` seconds (0: only if free now).

        ``send`` returns whether it wrote anything; that is returned, and only then
        does :attr:`last_send_done` advance. False too if the lock could not be had
        or ``send`` raised OSError (the connection failed: the readers will see it).
        """
        if not (self._lock.acquire(timeout=wait) if wait > 0 else self._lock.acquire(blocking=False)):
            return False
        try:
            wrote = send()
        except OSError:
            return False
        finally:
            self._lock.release()
        if wrote:
            self.last_send_done = time.monotonic()
        return wrote
