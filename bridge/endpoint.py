"""One websocket endpoint over a connected socket: what the pump (:class:`~bridge.tunnel.Tunnel`) of both daemons
reads and writes, and the events it receives (:data:`Received`).

Frames are read with :class:`~bridge.frames.FrameParser` (one ``recv`` for
everything that arrived) and written by us; what differs between the two ends
is small and lives in the subclasses of :class:`Endpoint`: the client
masks what it writes (:class:`bridge.frontend.ClientEndpoint`), the server
does not and answers the client's binary switch marker with its own
(:class:`bridge.server_end.ServerEndpoint`).

Contract of every endpoint: whole frames are written under :attr:`send_lock`
(two pump threads and the housekeeper share the socket); after our close frame
nothing more is written (data raises :class:`WebSocketDropped`);
:meth:`receive` returns stream bytes,
the end-of-stream marker or the peer's close, answers pings itself, and raises
:class:`~bridge.protocol.ProtocolViolation` for anything the wire format forbids.

**The reading thread never waits on a writer.** What it must answer (a pong, the
server's switch marker) is recorded as *pending* and written at once only if the
send lock is free and the socket has room right now; otherwise whoever next holds
the lock writes it before its own frame, or :meth:`Endpoint.flush_control`
(the housekeeper, every tick) does once the socket has room. Only the latest
ping is answered (RFC 6455 section 5.5.3 allows that). A reader blocked on a
writer whose peer's reader is itself blocked on a writer would deadlock the two
daemons; this is what keeps that from happening.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from bridge import frames, protocol, resume
from bridge.frames import close_payload, parse_close_payload
from bridge.protocol import CloseCode, EndOfStream, MessageDecoder, ProtocolViolation
from bridge.sockets import (
    Receiver,
    SendLock,
    shutdown_socket,
    writable,
)

#: How long a close frame waits for a send already in progress on another thread.
SEND_CLOSE_WAIT = 5.0


@dataclass(frozen=True)
class Closed:
    """The peer sent a close frame (``code`` 1005 when it carried none)."""

    code: int
    reason: str = ""


class WebSocketDropped(ConnectionError):
    """The websocket's connection ended or failed without a close frame.

    An OSError, so every place that survives a failed socket survives this too.
    """


#: What :meth:`Endpoint.receive` returns: stream bytes, the peer's end-of-stream marker, its close, or
#: (on a tunnel that negotiated resume) one of its control messages (:mod:`bridge.resume`).
Received = bytes | EndOfStream | Closed | resume.Control


#: Close codes a peer may send (RFC 6455 section 7.4.1): 1004-1006 and 1015 never appear in a frame.
_SENDABLE_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


def closed(payload: bytes) -> Closed:
    """The peer's close frame, checked as RFC 6455 section 5.5.1 requires."""
    if len(payload) == 1:
        raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code, reason = parse_close_payload(payload)
    if payload and code not in _SENDABLE_CLOSE_CODES and not 3000 <= code < 5000:
        raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    return Closed(code, reason)


class Endpoint:
    """The websocket half of a tunnel: frames in and out of ``sock``.

    ``parser`` splits what arrives (``received``: bytes already read past the
    handshake); ``switch_allowed``: the peer may send the binary switch marker.
    Subclasses implement :meth:`_frame_bytes` (and may write large frames
    their own way in :meth:`_write_frame`) and may react to the peer's switch
    in :meth:`_peer_switched`.
    """

    def __init__(self, sock: socket.socket, parser: frames.FrameParser, max_message_bytes: int, *,
                 switch_allowed: bool, received: bytes = b"", resume: bool = False) -> None:
        self.sock = self._sock = sock
        self.send_lock = self._send_lock = SendLock()
        self._parser = parser
        self._parser.feed(received)
        self._decoder = MessageDecoder(max_message_bytes, switch_allowed=switch_allowed)
        self._receiver = Receiver(sock)
        self._in_message = False
        self._message_binary = False
        self._last_received = time.monotonic()
        #: Our close frame is decided (written or pending): no data, pongs or switch marker after it.
        self._close_sent = False
        # Control frames waiting for the send lock and room in the socket (see the module
        # docstring), guarded by _control_lock, which is never held while writing.
        self._control_lock = threading.Lock()
        self._pending_pong: bytes | None = None
        self._pending_switch = False
        self._pending_close: bytes | None = None
        self._pending_ack: str | None = None
        #: Whether the tunnel negotiated resume: control messages may come and go (:mod:`bridge.resume`).
        self.resume = resume
        #: Whether our close frames are announced (``tcpbridge:closing <code>`` right before each): set by
        #: the tunnel once resume is agreed, never towards a peer that is not ours.
        self.announce_close = False
        #: True once our messages are binary (after our switch marker is on the wire).
        self.binary = False

    # -- writing (the caller of _write_frame holds the send lock) ---------------

    def _frame_bytes(self, opcode: int, payload: bytes) -> bytes:
        """One whole frame as it goes on the wire."""
        raise NotImplementedError

    def _write_frame(self, opcode: int, payload: bytes) -> None:
        self._sock.sendall(self._frame_bytes(opcode, payload))

    def _peer_switched(self) -> None:
        """The peer's messages are binary from now on; the decoder already knows."""

    def _queue_control(self, *, pong: bytes | None = None, switch: bool = False, ack: str | None = None) -> None:
        """Record a pong or an acknowledgement (each replacing an unwritten one) or our switch marker, then
        try to write it without waiting.

        Called by the reading thread: it never blocks. Nothing is recorded once our
        close frame is decided.
        """
        with self._control_lock:
            if self._close_sent:
                return
            if pong is not None:
                self._pending_pong = pong
            if ack is not None:
                self._pending_ack = ack
            self._pending_switch = self._pending_switch or switch
        self.flush_control()

    def queue_ack(self, ack: resume.Ack) -> None:
        """Acknowledge received bytes without ever waiting for a writer: it goes now if the send lock and
        room are free, else with the next frame or the housekeeper's flush; a later ack replaces an
        unwritten one (only the latest count matters)."""
        self._queue_control(ack=resume.encode(ack))

    def send_control(self, message: resume.Control) -> None:
        """Write a control message now, in order with data (blocks like :meth:`send_data`)."""
        with self._send_lock.held():
            self._write_pending()
            if self._close_sent:
                raise WebSocketDropped("websocket is closing")
            self._write_frame(frames.OPCODE_TEXT, resume.encode(message).encode("ascii"))
        self._after_send()

    def _has_pending(self) -> bool:
        return (self._pending_pong is not None or self._pending_switch or self._pending_close is not None
                or self._pending_ack is not None)

    def _take_pending(self) -> tuple[bytes, bool]:
        """The pending control frames as bytes, now no longer pending, and whether the switch marker is among them.

        The caller holds the send lock, writes the bytes before anything else,
        and then (if the marker was among them) sets :attr:`binary`. After our
        close frame is decided only that frame is left to write.
        """
        with self._control_lock:
            pong, switch, close, ack = self._pending_pong, self._pending_switch, self._pending_close, self._pending_ack
            self._pending_pong, self._pending_switch, self._pending_close, self._pending_ack = None, False, None, None
            closing = self._close_sent
        pending = b""
        if switch and not closing:
            pending += self._frame_bytes(frames.OPCODE_BINARY, b"")
        if pong is not None and not closing:
            pending += self._frame_bytes(frames.OPCODE_PONG, pong)
        if ack is not None and not closing:
            pending += self._frame_bytes(frames.OPCODE_TEXT, ack.encode("ascii"))
        if close is not None:
            pending += self._close_frames(close)
        return pending, switch and not closing

    def _close_frames(self, payload: bytes) -> bytes:
        """Our close frame, announced first if :attr:`announce_close` (see :mod:`bridge.resume`)."""
        frame = self._frame_bytes(frames.OPCODE_CLOSE, payload)
        if not self.announce_close:
            return frame
        code = parse_close_payload(payload)[0]
        announcement = resume.encode(resume.Closing(code)).encode("ascii")
        return self._frame_bytes(frames.OPCODE_TEXT, announcement) + frame

    def _write_pending(self) -> bool:
        """Write the pending control frames (the caller holds the send lock); return whether there were any.

        Blocks like any write when the socket is full: callers that must not block
        check :func:`~bridge.sockets.writable` first.
        """
        if not self._has_pending():
            return False
        frames, switched = self._take_pending()
        if frames:
            self._sock.sendall(frames)
        if switched:
            self.binary = True
        return bool(frames)

    def flush_control(self, wait: float = 0.0) -> bool:
        """Write the pending control frames if the send lock and room for them can be had within ``wait`` s.

        With ``wait`` 0 (the reader, the housekeeper) it never blocks. Returns
        True when nothing is left pending.
        """
        if not self._has_pending():
            return True
        deadline = time.monotonic() + wait

        def send() -> bool:
            return writable(self._sock, deadline - time.monotonic()) and self._write_pending()

        self._send_lock.try_send(send, wait=wait)
        return not self._has_pending()

    def _after_send(self) -> None:
        """Called after releasing the send lock: what the reader queued meanwhile goes out now if it can."""
        if self._has_pending():
            self.flush_control()

    def send_data(self, data: bytes) -> None:
        with self._send_lock.held():
            self._write_pending()
            if self._close_sent:
                raise WebSocketDropped("websocket is closing")
            if self.binary:
                self._write_frame(frames.OPCODE_BINARY, data)
            else:
                self._write_frame(frames.OPCODE_TEXT, protocol.encode(data))
        self._after_send()

    def send_end_of_stream(self, *, then_close: bool = False) -> None:
        """The end-of-stream marker; with ``then_close``, close 1000 right behind it in the same write
        (the peer then reads both with one ``recv``)."""
        with self._send_lock.held():
            self._write_pending()
            with self._control_lock:
                closing = self._close_sent
                self._close_sent = self._close_sent or then_close
            if closing:
                raise WebSocketDropped("websocket is closing")
            marker = self._frame_bytes(frames.OPCODE_BINARY if self.binary else frames.OPCODE_TEXT, b"")
            if then_close:
                marker += self._close_frames(close_payload(CloseCode.NORMAL, ""))
            self._sock.sendall(marker)
        self._after_send()

    def send_close(self, code: int, reason: str, *, wait: float = SEND_CLOSE_WAIT) -> bool:
        """Decide to close with ``code``, and write the close frame if the send lock and room for it come
        within ``wait`` seconds (0: only if both are there now); never blocks longer.

        Returns whether our close frame is on the wire. If not, it stays pending
        (:meth:`flush_control` or the next holder of the send lock writes it); the
        caller may instead give up on the connection. A second call changes
        nothing but may still write the pending frame.
        """
        with self._control_lock:
            if not self._close_sent:
                self._close_sent = True
                self._pending_close = close_payload(code, reason)
                self._pending_pong, self._pending_switch, self._pending_ack = None, False, None
        return self.flush_control(wait)

    def send_ping(self) -> bool:
        """Write a ping, after any pending control frame, if that cannot block; return whether the ping went.

        No ping follows our close frame.
        """
        pinged = False

        def send() -> bool:
            nonlocal pinged
            if not writable(self._sock):
                return False
            wrote = self._write_pending()
            if not self._close_sent:
                self._write_frame(frames.OPCODE_PING, b"tcpbridge")
                pinged = True
            return wrote or pinged

        self._send_lock.try_send(send, wait=0)
        return pinged

    # -- reading --------------------------------------------------------------

    @property
    def last_received(self) -> float:
        return self._last_received

    def receive(self) -> Received:
        while True:
            frame = self._next_frame()
            opcode = frame.opcode
            if opcode == frames.OPCODE_BINARY and frame.fin and self._decoder.binary and not self._in_message:
                # The data path once binary: a whole message in one frame is its bytes (the
                # parser already held it to max_message_bytes); empty, it is end-of-stream.
                return frame.payload or protocol.END_OF_STREAM
            if opcode == frames.OPCODE_CLOSE:
                return closed(frame.payload)
            if opcode == frames.OPCODE_PING:
                self._queue_control(pong=frame.payload)  # never waits for a send in progress
                continue
            if opcode == frames.OPCODE_PONG:
                continue
            if opcode == frames.OPCODE_CONTINUATION:
                if not self._in_message:
                    raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "continuation frame outside a message")
            elif self._in_message:
                raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "new message before the previous one finished")
            else:
                self._message_binary = opcode == frames.OPCODE_BINARY
                # A control message is always one frame: we write each as one.
                if self.resume and not self._message_binary and frame.fin and resume.is_control(frame.payload):
                    return resume.decode(bytes(frame.payload).decode("ascii", "replace"))
            self._in_message = not frame.fin
            result = self._decoder.feed(frame.payload, binary=self._message_binary, message_finished=frame.fin)
            if isinstance(result, protocol.SwitchToBinary):
                self._peer_switched()
            elif result:
                return result

    def _next_frame(self) -> frames.Frame:
        parser = self._parser
        while (frame := parser.next_frame()) is None:
            space = parser.payload_space()
            if space is not None:  # the rest of a large frame: straight into its own buffer
                with space:
                    count = self._receiver.recv_into(space)
                if not count:
                    raise WebSocketDropped("connection closed without a close frame")
                self._last_received = time.monotonic()
                parser.payload_filled(count)
                continue
            data = self._receiver.recv()
            if not data:
                raise WebSocketDropped("connection closed without a close frame")
            self._last_received = time.monotonic()
            parser.feed(data)
        return frame

    def shutdown(self) -> None:
        shutdown_socket(self._sock)

    def close(self) -> None:
        self._sock.close()
