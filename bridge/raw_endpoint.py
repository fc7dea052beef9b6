"""A connection without framing behind the endpoint interface, so the one pump also splices raw bytes.

An upgraded passthrough connection (a notebook kernel's websocket, after the origin's 101) is two
TCP connections joined byte for byte. :class:`~bridge.tunnel.Tunnel` already joins a TCP socket to
an :class:`~bridge.endpoint.Endpoint` with all of the tunnel's rules (half-close and its timeout,
idle timeout, resets passed on as resets, draining at shutdown), so the origin's connection is
given to it as a :class:`RawEndpoint`. The websocket notions map onto the stream like this:

* data is written and read as it comes, no frames;
* the end-of-stream marker is a FIN: :meth:`RawEndpoint.send_end_of_stream` is ``shutdown(SHUT_WR)``,
  and :meth:`RawEndpoint.receive` returns :data:`~bridge.protocol.END_OF_STREAM` at the origin's FIN;
* a clean close (code 1000) sends nothing more: the FIN already went, or goes now. The close
  handshake completes once both FINs are through: after the origin's FIN, :meth:`receive` waits for
  our own close and then returns the origin's as :class:`~bridge.endpoint.Closed` ``(1000)``;
* any other close is an abort: :meth:`send_close` returns False, which makes the pump reset the
  connection (a RST, never a FIN that would look like a complete stream);
* there are no pings, pongs or control messages.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from bridge import frames, protocol, resume
from bridge.endpoint import SEND_CLOSE_WAIT, Closed, Endpoint, Received, WebSocketDropped
from bridge.protocol import CloseCode

#: Bytes read per ``recv``.
RAW_CHUNK = 64 * 1024


class RawEndpoint(Endpoint):
    """``sock``, a plain TCP connection, as a pump's endpoint; ``received``: bytes already read from it."""

    def __init__(self, sock: socket.socket, received: bytes = b"") -> None:
        super().__init__(sock, frames.FrameParser(RAW_CHUNK), RAW_CHUNK, switch_allowed=False)
        self._first = received
        self._peer_finished = False
        #: Set when our side is done: a clean close decided, or the connection shut down.
        self._done = threading.Event()
        self._shut = False

    def _frame_bytes(self, opcode: int, payload: bytes) -> bytes:
        raise AssertionError("a raw connection has no frames")

    def send_data(self, data: bytes) -> None:
        with self.send_lock.held():
            if self._close_sent:
                raise WebSocketDropped("connection is closing")
            self.sock.sendall(data)

    def send_end_of_stream(self, *, then_close: bool = False) -> None:
        """Our FIN; with ``then_close``, and our clean close (nothing more follows either way)."""
        with self.send_lock.held():
            if self._close_sent:
                raise WebSocketDropped("connection is closing")
            self.sock.shutdown(socket.SHUT_WR)
        if then_close:
            self._close_cleanly()

    def send_close(self, code: int, reason: str, *, wait: float = SEND_CLOSE_WAIT) -> bool:
        """A clean close (1000) finishes our side with a FIN if none went yet; returns True. Any other code
        is an abort, which a stream can only say with a reset: returns False, and the caller resets."""
        if code != CloseCode.NORMAL:
            self._close_sent = True
            return False
        def finish() -> bool:
            if not self._close_sent:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
            return True

        self.send_lock.try_send(finish, wait=wait)
        self._close_cleanly()
        return True

    def _close_cleanly(self) -> None:
        self._close_sent = True
        self._done.set()

    def send_ping(self) -> bool:
        return False

    def flush_control(self, wait: float = 0.0) -> bool:
        return True

    def queue_ack(self, ack: resume.Ack) -> None:
        raise AssertionError("a raw connection never negotiates resume")

    def send_control(self, message: resume.Control) -> None:
        raise AssertionError("a raw connection never negotiates resume")

    def receive(self) -> Received:
        """The origin's next bytes; END_OF_STREAM at its FIN; then, once our side is done too, Closed(1000).
        WebSocketDropped (an OSError) if the connection was shut down or failed."""
        if self._first:
            data, self._first = self._first, b""
            return data
        if self._peer_finished:
            self._done.wait()
            if self._shut:
                raise WebSocketDropped("connection shut down")
            return Closed(CloseCode.NORMAL)
        data = self.sock.recv(RAW_CHUNK)
        if self._shut:
            raise WebSocketDropped("connection shut down")
        self._last_received = time.monotonic()
        if data:
            return data
        self._peer_finished = True
        return protocol.END_OF_STREAM

    def shutdown(self) -> None:
        self._shut = True
        self._done.set()
        super().shutdown()
