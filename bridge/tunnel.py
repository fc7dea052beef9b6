"""The two-thread pump that joins one TCP socket to one websocket, shared by both daemons.

A :class:`Tunnel` runs on the thread that calls :meth:`Tunnel.run` (the websocket
to TCP direction) plus exactly one worker thread of the daemon's pool (TCP to
websocket). Ends:

* **clean**: a TCP FIN becomes an end-of-stream marker, and a received marker
  becomes ``shutdown(SHUT_WR)`` on the TCP side; the other direction keeps
  flowing. Whichever side has both sent and received a marker closes the
  websocket with 1000. A received close 1000 is also a clean end (peers with
  ``half_close: false`` send it instead of a marker).
* **abort**: a reset or error on either side, a websocket dropped without a
  close frame, a close with any other code, or bad input. The TCP side is reset
  (SO_LINGER 0), never closed cleanly, so a cut stream never looks complete.
* **half-close timeout**: a half-closed tunnel whose open direction moved no
  bytes for ``half_close_timeout`` is closed, so Go peers (which never send the
  marker) cannot leak it.

Nothing survives a tunnel: both sockets are closed and both directions have
ended when :meth:`Tunnel.run` returns (their threads are pooled: see
:mod:`bridge.workers`). :class:`bridge.registry.TunnelRegistry` tracks live tunnels and
runs the daemon's one housekeeping thread for timeouts and draining.

Why this module is over 450 lines: :class:`Tunnel` is one object that both pumps and the
housekeeper drive under one lock and one :class:`~bridge.lifecycle.Lifecycle`; its resumable
half (detach, redial, attach, replay) shares that lock and those fields. Splitting it would move
the lock's invariants across classes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import random
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable

from bridge import events, protocol, resume
from bridge.config import TunnelOptions
from bridge.endpoint import SEND_CLOSE_WAIT, Closed, Endpoint
from bridge.events import Event
from bridge.lifecycle import Action, Lifecycle, Step, Up
from bridge.outcome import CLEAN, HALF_CLOSE_TIMEOUT, Kind, Outcome
from bridge.protocol import CloseCode, EndOfStream, ProtocolViolation
from bridge.session import ResumeRefused, Session
from bridge.sockets import (
    describe_error,
    peer_hung_up,
    send_progress,
    send_queue_bytes,
    unacknowledged_segments,
)
from bridge.stats import human_bytes
from bridge.workers import WorkerPool

log = logging.getLogger("tcpbridge.tunnel")

#: How long an abort on a pump thread waits for a frame in progress before resetting the websocket instead.
PUMP_CLOSE_WAIT = 1.0
#: How often an aborted tunnel's release looks at whether the peer takes what we queued.
RELEASE_POLL = 0.02
#: How long we wait for the peer's close frame after sending ours.
CLOSE_HANDSHAKE_TIMEOUT = 5.0
HOUSEKEEPING_INTERVAL = 0.25
#: A TCP write taking longer than this counts as stalled (a peer not reading), not as slow.
TCP_WRITE_STALL = 1.0
#: How long a reader stuck on a TCP peer that takes nothing may keep a tunnel whose websocket peer left.
PEER_GONE_WAIT = 5.0
#: How long a re-attaching side waits for the peer's :class:`~bridge.resume.Resumed`.
ATTACH_TIMEOUT = 10.0
#: The frontend's redial backoff after a drop: first wait, doubling up to the last, each with jitter.
REDIAL_FIRST_DELAY = 0.1
REDIAL_MAX_DELAY = 5.0

#: Opens a new websocket to a detached tunnel's session (the frontend's dial with the session header).
#: Raises :class:`~bridge.session.ResumeRefused` when the backend refuses it, OSError (or any other
#: Exception) when it may work later.
Redial = Callable[[], Endpoint]


#: What :meth:`Tunnel._blocked_sends_moved` compares per socket: its :func:`~bridge.sockets.send_progress`,
#: or False while no write is blocked on it.
_SendMark = tuple[int | None, int | None] | bool


def new_tunnel_id() -> str:
    return secrets.token_hex(3)


def reset_on_close(sock: socket.socket) -> None:
    """Make ``close()`` send a TCP RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


_LIBC = ctypes.CDLL(None, use_errno=True)
_AF_UNSPEC_ADDRESS = (ctypes.c_ubyte * 16)()  # a sockaddr whose family is AF_UNSPEC (0)


def reset_now(sock: socket.socket) -> bool:
    """Reset a TCP connection at once: RST, never a FIN, and wake threads blocked on it.

    ``connect()`` to an AF_UNSPEC address disconnects a TCP socket (Linux
    tcp_disconnect): queued data is dropped, the peer gets a RST, and threads
    blocked in send or recv return with an error. ``shutdown(SHUT_WR)`` would
    instead let the peer read a FIN, a clean end, first. Returns False where the
    kernel refuses (some versions do while a thread is blocked); the caller then
    falls back to shutdown.
    """
    reset_on_close(sock)
    try:
        fd = sock.fileno()
    except OSError:
        return False
    return fd >= 0 and _LIBC.connect(fd, _AF_UNSPEC_ADDRESS, ctypes.sizeof(_AF_UNSPEC_ADDRESS)) == 0


def _shutdown(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(how)


class Tunnel:
    """Pumps bytes between ``tcp`` and ``websocket`` until both directions end.

    ``tcp_first``: the TCP side usually sends first (a frontend's client), so
    the thread that calls :meth:`run` reads it. ``session``: the resumable
    session of a tunnel that offered or consented to resume; its sender keeps
    what it sends until the peer acknowledges it, and waits while that is
    ``resume_buffer`` bytes.

    How it ends is decided by its :class:`~bridge.lifecycle.Lifecycle`, fed under
    ``_lock`` by both pumps and the housekeeper; the actions it returns are
    carried out outside the lock (:meth:`_carry_out`).
    """

    def __init__(
        self,
        tcp: socket.socket,
        websocket: Endpoint,
        *,
        label: str,
        peer: str,
        destination: str,
        options: TunnelOptions,
        tcp_role: str = "TCP peer",
        tcp_first: bool = False,
        tunnel_id: str | None = None,
        session: Session | None = None,
        redial: Redial | None = None,
    ) -> None:
        self.id = tunnel_id or new_tunnel_id()
        self.label = label
        self.peer = peer
        self.destination = destination
        self.options = options
        self.tcp_role = tcp_role
        self.tcp_first = tcp_first
        self.bytes_to_ws = 0
        self.bytes_to_tcp = 0
        self.started = time.monotonic()
        self.last_activity = self.started
        self._tcp = tcp
        self._websocket = websocket
        #: The resumable session, when this end offered or consented to resume (:mod:`bridge.session`).
        self._session = session
        self._lock = threading.Lock()
        self._lifecycle = Lifecycle(half_close=options.half_close)
        #: When our close frame was decided (the housekeeper waits for the peer's answer from then on).
        self._close_sent_at: float | None = None
        #: Whether the TCP side is the target (the backend's) rather than the client (the frontend's, connect's).
        self.tcp_is_target = tcp_role == "target"
        #: The kind of an abort caused by the TCP side.
        self._tcp_failed = Kind.ABORTED_BY_TARGET if self.tcp_is_target else Kind.ABORTED_BY_CLIENT
        self._writing_tcp = False
        self._tcp_write_started = self.started
        #: When the reader's TCP write last moved a byte, as the housekeeper's samples saw it.
        self._tcp_moved_at = self.started
        self._reading_since = self.started
        self._ping_sent_at: float | None = None
        self._close_queue: int | None = None
        self._close_progress_at = 0.0
        self._send_marks: tuple[_SendMark, _SendMark] | None = None
        self._pump_threads: set[int] = set()
        # Re-attaching (resumable tunnels only). The websocket in use changes under both locks, and its
        # generation with it: the reader holds _take_lock while it takes a message (and counts it), the
        # sender holds _send_gate while it keeps and sends a chunk, so a re-attach sees stable counts
        # and no byte goes to a websocket that was replaced. Parked pumps wait on _attached.
        self._generation = 0
        self._take_lock = threading.Lock()
        self._send_gate = threading.Lock()
        self._attach_lock = threading.Lock()  # one re-attach at a time
        self._attached = threading.Condition(self._lock)
        self._detached_at = self.started
        self._redial = redial
        self._workers: WorkerPool | None = None
        self._released = False
        #: Re-attachments so far, and the stream bytes they sent again.
        self.resumes = 0
        self.bytes_replayed = 0
        #: Why the tunnel could not be resumed (stats.RESUME_RESULTS), if that is how it ended.
        self.resume_failure: str | None = None
        #: The close code the peer announced on the current websocket (:class:`~bridge.resume.Closing`).
        self._peer_closing: int | None = None
        if session is not None and session.consented:
            websocket.announce_close = True
            self._lifecycle.confirm_marker = True

    # -- public -------------------------------------------------------------

    @property
    def bytes_up(self) -> int:
        """Bytes moved from the TCP client towards the target (frontend to backend), whichever end this is."""
        return self.bytes_to_tcp if self.tcp_is_target else self.bytes_to_ws

    @property
    def bytes_down(self) -> int:
        """Bytes moved from the target back to the TCP client."""
        return self.bytes_to_ws if self.tcp_is_target else self.bytes_to_tcp

    def facts(self) -> dict[str, str]:
        """What every log line about this tunnel carries as journal fields (:mod:`bridge.events`)."""
        return events.tunnel_facts(self.label, self.id, self.peer, self.destination)

    @property
    def outcome(self) -> Outcome | None:
        """Why the tunnel ended, or None while it runs."""
        return self._lifecycle.outcome

    @property
    def resume_state(self) -> str:
        """``detached`` (waiting for a new websocket), ``resumable``, or empty (resume not agreed)."""
        if self._lifecycle.detached and not self._lifecycle.done:
            return "detached"
        session = self._session
        return "resumable" if session is not None and session.consented else ""

    @property
    def session_id(self) -> str | None:
        """The id of the resumable session this end gave out (the backend's), else None. Never logged."""
        session = self._session
        return session.id if session is not None and session.consented else None

    def hold(self, endpoint: Endpoint) -> None:
        """Block while ``endpoint`` (attached by :meth:`attach`) carries this tunnel: until it is replaced,
        or the tunnel ended and let go of its sockets. For the thread whose connection it is (the
        backend's upgrade), which must not let its server close the connection earlier."""
        with self._attached:
            while self._websocket is endpoint and not self._released:
                self._attached.wait(HOUSEKEEPING_INTERVAL * 4)

    def run(self, workers: WorkerPool) -> Outcome:
        """Pump until both directions end, close both sockets, and return the outcome.

        The calling thread pumps the direction whose bytes are expected first
        (see ``tcp_first``), at once; the other direction runs on a thread from
        ``workers``, which takes a wake-up to start.
        """
        self._workers = workers
        pooled_done = threading.Lock()
        pooled_done.acquire()
        if self.tcp_first:
            first, second, second_name = self._tcp_to_ws, self._ws_to_tcp, "down"
        else:
            first, second, second_name = self._ws_to_tcp, self._tcp_to_ws, "up"

        def pooled() -> None:
            try:
                self._guarded(second)
            finally:
                pooled_done.release()

        try:
            workers.submit(pooled, name=f"tunnel-{self.id}-{second_name}")
        except RuntimeError as exc:  # "can't start new thread": out of threads
            self.abort(Outcome(Kind.INTERNAL_ERROR, f"abort: cannot start the tunnel's thread ({exc})"))
            self._release()
            return self._lifecycle.outcome or Outcome(Kind.INTERNAL_ERROR, "abort")
        self._guarded(first)
        pooled_done.acquire()
        if self._lifecycle.running:
            # Each pump returns only once the lifecycle left RUNNING: this is a bug, and the tunnel must
            # not look clean to the TCP side (a FIN would say everything arrived).
            log.error("tunnel %s: both directions stopped while the tunnel was running", self.id)
            self.abort(Outcome(Kind.INTERNAL_ERROR, "abort: internal error (both directions stopped early)"))
        self._release()
        return self._lifecycle.outcome or CLEAN

    def abort(self, outcome: Outcome, code: int = CloseCode.INTERNAL_ERROR) -> None:
        """End the tunnel now with ``outcome``: reset the TCP side and tell the peer with close ``code``
        (the outcome's detail, shortened, is the close reason)."""
        self._carry_out(self._decide(Lifecycle.abort, outcome, code))

    def check_timeouts(self, now: float) -> None:
        """Called by the housekeeper (it must not block): timeouts, keepalive pings, dead peers.

        Also writes the control frames the reader could not (a pong, a switch
        marker, a close), once the socket has room. A blocked write counts as
        activity only while it makes progress (:meth:`_blocked_sends_moved`).
        """
        if self._lifecycle.done:
            return
        if self._lifecycle.detached:
            self._check_resume_deadline(now)
            return
        if self._session is not None and (ack := self._session.due(now)) is not None:
            self._websocket.queue_ack(ack)  # also flushes what else is pending
        else:
            self._websocket.flush_control()
        if self._lifecycle.close_sent:
            self._await_close_reply(now)
            return
        if self._blocked_sends_moved(now):
            self.last_activity = now  # bytes are flowing to a slow peer: busy, not idle
        if self._peer_gone_behind_a_stalled_write(now):
            self.abort(Outcome(Kind.WEBSOCKET_DROPPED, f"abort: websocket peer hung up while the {self.tcp_role} "
                                                       f"took nothing for {PEER_GONE_WAIT:g} s"))
            return
        options = self.options
        idle = now - self.last_activity
        if options.idle_timeout and idle > options.idle_timeout:
            self.abort(Outcome(Kind.IDLE_TIMEOUT, f"idle timeout ({options.idle_timeout:g} s without data)"),
                       CloseCode.GOING_AWAY)
        elif options.half_close_timeout and self._lifecycle.half_closed and idle > options.half_close_timeout:
            self._carry_out(self._decide(Lifecycle.close, HALF_CLOSE_TIMEOUT))
        elif options.ping_interval:
            self._keepalive(now)

    def _check_resume_deadline(self, now: float) -> None:
        waited = now - self._detached_at
        if waited > self.options.resume_timeout:
            self._resume_failed("timeout", f"abort: websocket dropped and not resumed within "
                                           f"{self.options.resume_timeout:g} s")

    def _resume_failed(self, result: str, detail: str) -> None:
        """End a tunnel that cannot be resumed: ``result`` is its stats.RESUME_RESULTS entry."""
        if not self._lifecycle.done:
            self.resume_failure = result
        self.abort(Outcome(Kind.WEBSOCKET_DROPPED, detail))

    def _tcp_write_stalled(self) -> bool:
        """Whether the websocket reader has been stuck writing one message to the TCP side for a while: it
        cannot read the peer's acknowledgements, so our sender must not wait for them (:mod:`bridge.session`)."""
        return self._writing_tcp and time.monotonic() - self._tcp_write_started > TCP_WRITE_STALL

    def _peer_gone_behind_a_stalled_write(self, now: float) -> bool:
        """Whether the websocket peer hung up while our reader is stuck on a TCP peer that took nothing
        for PEER_GONE_WAIT: whatever it said last (an abort's close frame) waits behind bytes nobody
        takes, and we would never read it.

        Only while our TCP side has not ended and with ``half_close``: a peer's clean close then always
        follows our marker, so this never cuts a clean end short (a target slow to read its last bytes
        after the peer left gets them all). Without ``half_close`` such a tunnel waits for its target.
        """
        if not self.options.half_close or self._lifecycle.up is not Up.OPEN:
            return False
        return self._tcp_write_stuck_for(now) > PEER_GONE_WAIT and peer_hung_up(self._websocket.sock)

    def _tcp_write_stuck_for(self, now: float) -> float:
        """How long the reader's write to the TCP side has moved no byte (0 while not writing, or when the
        kernel cannot tell), from :meth:`_blocked_sends_moved`'s samples."""
        return now - self._tcp_moved_at if self._writing_tcp else 0.0

    def _blocked_sends_moved(self, now: float) -> bool:
        """Whether a write blocked on either socket moved since the housekeeper's last look.

        A write blocked on a peer that still takes bytes (its kernel acknowledges
        more, or the send queue changes) is busy; one on a peer that took nothing
        since the last tick is not, so a tunnel wedged because neither end reads
        idles out. When the kernel cannot tell, a blocked write counts as busy.
        """
        writing_tcp, sending = self._writing_tcp, self._websocket.send_lock.sending
        if not (writing_tcp or sending):
            self._send_marks = None
            return False
        tcp_mark = send_progress(self._tcp) if writing_tcp else False
        ws_mark = send_progress(self._websocket.sock) if sending else False
        if tcp_mark is None or self._send_marks is None or tcp_mark != self._send_marks[0]:
            self._tcp_moved_at = now  # the TCP write moved, started, or cannot be told from a stall
        if tcp_mark is None or ws_mark is None:
            return True
        marks = (tcp_mark, ws_mark)
        moved = marks != self._send_marks
        self._send_marks = marks
        return moved

    def _await_close_reply(self, now: float) -> None:
        """Give up on the peer's close frame after CLOSE_HANDSHAKE_TIMEOUT without progress.

        A peer still reading what we sent before our close frame (its reader slowed
        by its own TCP client) is not stuck: while our send queue shrinks, wait.
        Closing early would lose nothing of ours, but the RST that closing with
        unread data sends could destroy bytes the peer has not yet read.
        """
        queued = send_queue_bytes(self._websocket.sock)
        if queued is not None and self._close_queue is not None and queued < self._close_queue:
            self._close_progress_at = now
        self._close_queue = queued
        waited = now - max(self._close_sent_at or now, self._close_progress_at)
        if waited > CLOSE_HANDSHAKE_TIMEOUT:
            log.debug("tunnel %s: no close frame from the peer in %.0f s", self.id, waited)
            self._websocket.shutdown()

    def watched_sockets(self) -> tuple[socket.socket, ...]:
        """The TCP and websocket sockets, for the housekeeper's check for failed connections (only the TCP
        socket while detached: the websocket's is the dropped one)."""
        return (self._tcp,) if self._lifecycle.detached else (self._tcp, self._websocket.sock)

    def socket_failed(self, sock: socket.socket) -> None:
        """Called by the housekeeper when ``sock`` (one of :meth:`watched_sockets`) has failed.

        When both pumps are blocked elsewhere (the upload waiting on the
        websocket, the download waiting on the peer), a RST would otherwise go
        unseen until one of them wakes.
        """
        if sock is self._tcp:
            self.abort(Outcome(self._tcp_failed, f"abort: {self.tcp_role} reset"))
            return
        generation, websocket = self._attached_websocket()
        if sock is websocket.sock:
            self._report_lost(generation, Outcome(Kind.WEBSOCKET_DROPPED, "abort: websocket connection reset"))

    def _attached_websocket(self) -> tuple[int, Endpoint]:
        """The websocket in use and its generation, read together (a re-attach changes both)."""
        with self._lock:
            return self._generation, self._websocket

    def _keepalive(self, now: float) -> None:
        """Ping a quiet peer; abort if it stays silent for ping_timeout while we were able to read.

        While the reader is blocked writing to a slow TCP peer it cannot read pongs,
        and while our own frame cannot be written the peer's reader is likely in
        that state: neither time counts. Backpressure is not death.
        """
        generation, websocket = self._attached_websocket()
        last_received = websocket.last_received
        if self._ping_sent_at is not None and last_received >= self._ping_sent_at:
            self._ping_sent_at = None  # answered (or something else arrived)
        if self._ping_sent_at is None:
            if now - last_received > self.options.ping_interval and websocket.send_ping():
                self._ping_sent_at = now
            return
        sender = websocket.send_lock
        if self._writing_tcp or sender.sending or (self._session is not None and self._session.waiting):
            return  # a sender waiting for the peer's acknowledgement is backpressure too
        silent_since = max(self._ping_sent_at, self._reading_since, sender.last_send_done)
        if now - silent_since <= self.options.ping_timeout:
            return
        # A peer whose kernel acknowledged everything we sent, the ping included,
        # is alive and only slow to answer (a starved process, a reader blocked on
        # its own slow client): only a path or machine that stopped acknowledging
        # is dead.
        if unacknowledged_segments(websocket.sock) == 0:
            return
        self._report_lost(generation, Outcome(
            Kind.PEER_UNRESPONSIVE, f"abort: websocket peer unresponsive (nothing received or acknowledged for "
                                    f"{now - last_received:.0f} s after a ping)"))

    # -- directions -----------------------------------------------------------

    def _guarded(self, direction: Callable[[], None]) -> None:
        self._pump_threads.add(threading.get_ident())
        try:
            direction()
        except Exception as exc:  # a bug must not leave the other thread or the sockets behind
            log.exception("tunnel %s: internal error", self.id)
            self.abort(Outcome(Kind.INTERNAL_ERROR, f"abort: internal error ({exc})"))

    def _tcp_to_ws(self) -> None:
        tcp, session = self._tcp, self._session
        while True:
            size = protocol.READ_CHUNK if session is None else session.send_room(protocol.READ_CHUNK,
                                                                                   self._tcp_write_stalled)
            if not size:
                return  # the session closed: the tunnel ended while we waited for an acknowledgement
            try:
                data = tcp.recv(size)
            except OSError as exc:
                self.abort(Outcome(self._tcp_failed, f"abort: {self.tcp_role} reset ({describe_error(exc)})"))
                return
            if not self._lifecycle.running:
                return
            if not data:
                break
            self.last_activity = time.monotonic()
            if not self._send(data):
                return
            self.bytes_to_ws += len(data)
        self._send_end_of_stream()

    def _send(self, data: bytes) -> bool:
        """Send ``data`` on the websocket; False if the tunnel ended. A resumable tunnel keeps it first
        (a drop during the send must find it kept) and, if the websocket drops, waits for a new one,
        which gets it again from the replay."""
        session = self._session
        if session is None:
            try:
                self._websocket.send_data(data)
            except OSError as exc:
                self.abort(Outcome(Kind.WEBSOCKET_DROPPED, f"abort: websocket send failed ({describe_error(exc)})"))
                return False
            return True
        with self._send_gate:
            generation, websocket = self._generation, self._websocket
            session.sent(data)
            try:
                websocket.send_data(data)
                return True
            except OSError as exc:
                failure = exc
        lost = Outcome(Kind.WEBSOCKET_DROPPED, f"abort: websocket send failed ({describe_error(failure)})")
        return self._report_lost(generation, lost) and self._await_attach(generation)

    def _send_end_of_stream(self) -> None:
        """Our TCP side ended: what the lifecycle decides (our marker, perhaps with our close). Under the
        send gate, so a re-attach either sees the marker sent or owes it (:meth:`attach`)."""
        with self._send_gate:
            generation = self._generation
            step = self._decide(Lifecycle.tcp_ended)
            try:
                self._carry_out(step)
                failure = None
            except OSError as exc:  # only the marker's write raises
                failure = exc
        if failure is not None:
            # A resumable tunnel owes the marker now; the re-attach sends it again.
            self._report_lost(generation, Outcome(Kind.WEBSOCKET_DROPPED,
                                                  f"abort: websocket send failed ({describe_error(failure)})"))
            return
        if Action.SEND_END_OF_STREAM in step:
            self.last_activity = time.monotonic()
            self._carry_out(self._decide(Lifecycle.end_of_stream_sent))

    def _ws_to_tcp(self) -> None:
        tcp, session = self._tcp, self._session
        # Only a resumable tunnel swaps websockets (attach), so only it needs the take lock.
        taking = self._take_lock if session is not None else contextlib.nullcontext()
        while True:
            try:
                with taking:
                    generation, websocket = self._generation, self._websocket
                    event = self._take(websocket)
            except ProtocolViolation as violation:
                log.warning("tunnel %s [%s]: bad frame from the websocket peer: %s (closing with %d)",
                            self.id, self.label, violation.reason, violation.code,
                            extra=events.mark(None, self.facts()))
                self.abort(Outcome(Kind.BAD_FRAME, f"bad frame: {violation.reason}"), violation.code)
                return
            except OSError as exc:  # WebSocketDropped included
                dropped = Outcome(Kind.WEBSOCKET_DROPPED, f"abort: websocket dropped ({describe_error(exc)})")
                if self._report_lost(generation, dropped) and self._await_attach(generation):
                    continue
                return
            if event is None:
                continue
            if isinstance(event, bytes):
                if not event:
                    continue
                self.last_activity = self._tcp_write_started = time.monotonic()
                self._writing_tcp = True
                try:
                    tcp.sendall(event)
                except OSError as exc:
                    self.abort(Outcome(self._tcp_failed, f"abort: {self.tcp_role} reset ({describe_error(exc)})"))
                    return
                finally:
                    self._writing_tcp = False
                    self._reading_since = self.last_activity = time.monotonic()
                self.bytes_to_tcp += len(event)
                if session is not None and (ack := session.received(len(event), self.last_activity)) is not None:
                    self._websocket.queue_ack(ack)
            elif isinstance(event, EndOfStream):
                step = self._decide(Lifecycle.end_of_stream_received)
                if step.actions:
                    self.last_activity = time.monotonic()
                if session is not None and (ack := session.marker_delivered()) is not None:
                    self._websocket.queue_ack(ack)  # before our close: the peer need not resume after it
                self._carry_out(step)
            elif self._closed_by_a_relay():
                # The shim turns a dropped websocket into a close 1000: for a resumable tunnel, a drop.
                lost = Outcome(Kind.WEBSOCKET_DROPPED, f"abort: websocket closed ({event.code}) by a relay, "
                                                       "not by the peer")
                if self._report_lost(generation, lost) and self._await_attach(generation):
                    continue
                return
            else:
                code = event.code if self._peer_closing is None else self._peer_closing
                self._carry_out(self._decide(Lifecycle.close_received, code, event.reason))
                return

    def _closed_by_a_relay(self) -> bool:
        """Whether a close frame on a resumable tunnel came without the peer's announcement: a relay made it
        (:class:`~bridge.resume.Closing`). Once both markers went through (the peer acknowledged ours, we
        took theirs) nothing is left to resume, and any close 1000 is the end."""
        session = self._session
        return (session is not None and session.consented and self._peer_closing is None
                and not (session.peer_has_marker and session.marker_taken))

    def _take(self, websocket: Endpoint) -> bytes | EndOfStream | Closed | None:
        """The next message from ``websocket`` for the TCP side, counted; None for one the session consumed
        (the backend's consent, an acknowledgement). The caller holds the take lock."""
        event = websocket.receive()
        session = self._session
        if session is None:
            if isinstance(event, resume.Control):  # the endpoint only returns these with resume on
                raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "control message on a tunnel that did not "
                                        "negotiate resume")
            return event
        if not session.decided and session.first_message(event):
            websocket.announce_close = True
            with self._lock:
                self._lifecycle.confirm_marker = True
            return None  # the backend's consent: the session is resumable
        if isinstance(event, bytes):  # data, the common case, before the costlier union check
            session.taken += len(event)
        elif isinstance(event, resume.Control):
            self._on_control(event)
            return None
        elif isinstance(event, EndOfStream):
            session.marker_taken = True
        return event

    def _on_control(self, message: resume.Control) -> None:
        """A control message from the peer (after the frontend's first message, see :meth:`_ws_to_tcp`).
        ProtocolViolation for one this tunnel cannot take."""
        session = self._session
        if session is None or not session.consented:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "control message on a tunnel that did not "
                                    "negotiate resume")
        if isinstance(message, resume.Ack):
            session.acknowledged(message)
            self.last_activity = time.monotonic()  # the peer's target is taking our bytes
            if message.ended:
                # Our clean close waited for this: a relay may end the websocket right after our close
                # (the inverting proxy's agent echoes it at once), and then the peer must lack nothing.
                self._carry_out(self._decide(Lifecycle.marker_acknowledged))
        elif isinstance(message, resume.Closing):
            self._peer_closing = message.code
        else:
            # A consent only ever comes first; resumed only on a re-attached websocket.
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, f"unexpected {type(message).__name__.lower()} "
                                    "control message")

    def _decide(self, event: Callable[..., Step], *args: object) -> Step:
        """Feed one event (a :class:`Lifecycle` method) to the lifecycle under the lock; note when our close
        frame was decided."""
        with self._lock:
            step = self._decide_locked(event, *args)
        self._after_decision()
        return step

    def _decide_locked(self, event: Callable[..., Step], *args: object) -> Step:
        """:meth:`_decide` for a caller that holds the lock; it calls :meth:`_after_decision` once it let go."""
        closing = self._lifecycle.close_sent
        step = event(self._lifecycle, *args)
        if self._lifecycle.close_sent and not closing:
            self._close_sent_at = time.monotonic()
        if not self._lifecycle.running:
            self._attached.notify_all()  # pumps parked for a new websocket: the tunnel ended
        return step

    def _after_decision(self) -> None:
        if not self._lifecycle.running and self._session is not None:
            self._session.close()  # a sender waiting for an acknowledgement has nothing left to wait for

    # -- detaching and re-attaching (resumable tunnels) -------------------------

    def _report_lost(self, generation: int, outcome: Outcome) -> bool:
        """The websocket of ``generation`` failed (``outcome`` says how, should the tunnel end of it).

        A resumable tunnel detaches; any other ends. True if the tunnel goes on: detached (it waits
        for a new websocket), or the failed one was already replaced. Never blocks.

        Whether the report is stale, what it decides and the answer are one step under the lock: a
        re-attach may complete at any moment (the backend's comes from another connection), and
        must neither take a report about its predecessor for its own, nor turn a detach it ended
        into "the tunnel ended" for the pump that reported it.
        """
        session = self._session
        with self._lock:
            if generation != self._generation:
                return True  # a stale failure: that websocket was replaced already
            lifecycle = self._lifecycle
            # After our close, a peer that has our marker has everything of ours: the drop is the end.
            resumable = (session is not None and session.replayable
                         and not (lifecycle.close_sent and session.peer_has_marker))
            step = self._decide_locked(functools.partial(Lifecycle.websocket_dropped, resumable=resumable), outcome)
            goes_on = lifecycle.detached and not lifecycle.done
            dropped = self._websocket
            if Action.DETACH in step:
                self._detached_at = time.monotonic()
        self._after_decision()
        if Action.DETACH in step:
            self._detach(dropped)
        else:
            self._carry_out(step)
        return goes_on

    def _await_attach(self, generation: int) -> bool:
        """Park a pump while the tunnel is detached from the websocket of ``generation``; True once a new
        websocket is attached, False if the tunnel ended (resume_timeout, an abort)."""
        with self._attached:
            while self._lifecycle.detached and self._generation == generation and not self._lifecycle.done:
                self._attached.wait(HOUSEKEEPING_INTERVAL * 4)
            return self._generation != generation and not self._lifecycle.done

    def _detach(self, dropped: Endpoint) -> None:
        """The DETACH action: let the ``dropped`` websocket go (never its successor, which may be attached
        already), and (the frontend) start dialling again."""
        dropped.shutdown()  # wakes a pump still blocked on it
        log.info("tunnel %s [%s]: websocket dropped, resuming (waiting up to %g s)", self.id, self.label,
                 self.options.resume_timeout, extra=events.mark(Event.TUNNEL_DETACHED, self.facts()))
        if self._redial is not None and self._workers is not None:
            try:
                self._workers.submit(self._reattach, name=f"tunnel-{self.id}-redial")
            except RuntimeError as exc:
                self.abort(Outcome(Kind.INTERNAL_ERROR, f"abort: cannot start the redial thread ({exc})"))

    def _reattach(self) -> None:
        """Dial a new websocket for the session until one attaches, the backend refuses, or resume_timeout
        passes (the housekeeper then ends the tunnel); backing off with jitter between attempts."""
        assert self._redial is not None
        delay = REDIAL_FIRST_DELAY
        while self._lifecycle.detached and not self._lifecycle.done:
            if time.monotonic() - self._detached_at > self.options.resume_timeout:
                return
            try:
                endpoint = self._redial()
            except ResumeRefused as refusal:
                self._resume_failed("refused", f"abort: websocket dropped and resuming was refused ({refusal})")
                return
            except Exception as exc:  # a dial failure of any kind: the backend may be back soon
                log.debug("tunnel %s: redial failed: %s", self.id, exc)
            else:
                if self.attach(endpoint):
                    return
                endpoint.close()
            with self._attached:
                self._attached.wait(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, REDIAL_MAX_DELAY)

    def attach(self, endpoint: Endpoint) -> bool:
        """Go on over ``endpoint``, a new websocket for this tunnel's session. True if it was taken.

        Each side first says what it received (:class:`~bridge.resume.Resumed`, the first message
        both ways) and then sends again what the other lacks, and our marker if the peer lacks it.
        Runs on the thread that holds the new websocket (the backend's upgrade, the frontend's
        redial), never on a pump. A websocket that still looks alive is replaced: whoever calls
        this has proven the session is theirs. False, with ``endpoint`` left to the caller, if the
        tunnel ended or the new websocket failed before it was attached (the tunnel stays detached);
        a peer that cannot be resumed (bytes no longer kept, a bad Resumed) ends the tunnel.
        """
        session = self._session
        if session is None or not session.consented:
            return False
        with self._attach_lock:
            if not self._lifecycle.detached:
                self._report_lost(self._generation, Outcome(Kind.WEBSOCKET_DROPPED,
                                                            "abort: websocket replaced by a new one"))
            if not self._lifecycle.detached or self._lifecycle.done:
                return False
            with self._send_gate:
                with self._take_lock:
                    try:
                        chunks, step, old = self._swap(session, endpoint)
                    except OSError as exc:
                        log.info("tunnel %s [%s]: a new websocket failed before it was attached: %s", self.id,
                                 self.label, describe_error(exc), extra=events.mark(None, self.facts()))
                        return False
                    except ProtocolViolation as violation:
                        self.resume_failure = "lost"
                        self.abort(Outcome(Kind.BAD_FRAME, f"bad frame while resuming: {violation.reason}"))
                        return False
                    except resume.ReplayLost as lost:
                        self._resume_failed("lost", f"abort: websocket dropped and cannot be resumed ({lost})")
                        return False
                    except ResumeRefused as refusal:
                        self._resume_failed("refused", f"abort: websocket dropped and resuming was refused ({refusal})")
                        return False
                old.close()
                self._replay(chunks, step)
        return True

    def _swap(self, session: Session, endpoint: Endpoint) -> tuple[list[bytes], Step, Endpoint]:
        """Trade Resumed messages over ``endpoint`` and make it the tunnel's websocket; the bytes to send
        again, the lifecycle's step, and the old websocket. The caller holds both pump locks."""
        endpoint.send_control(session.resumed())
        theirs = self._receive_resumed(endpoint)
        chunks = session.replay_from(theirs.received)
        session.peer_resumed(theirs.ended)
        endpoint.announce_close = True
        with self._attached:
            old, self._websocket = self._websocket, endpoint
            self._generation += 1
            self._peer_closing = None
            step = self._lifecycle.attached(theirs.ended)
            if self._lifecycle.close_sent:
                self._close_sent_at, self._close_queue = time.monotonic(), None  # the close goes again
            self._attached.notify_all()
        waited = time.monotonic() - self._detached_at
        replayed = sum(map(len, chunks))
        self.resumes += 1
        self.bytes_replayed += replayed
        self.last_activity = time.monotonic()
        log.info("tunnel %s [%s]: resumed after %.1f s, replayed %s", self.id, self.label, waited,
                 human_bytes(replayed), extra=events.mark(Event.TUNNEL_RESUMED, {
                     **self.facts(), "waited_s": round(waited, 3), "bytes_replayed": replayed}))
        return chunks, step, old

    @staticmethod
    def _receive_resumed(endpoint: Endpoint) -> resume.Resumed:
        """The peer's first message on a new websocket: its Resumed, within ATTACH_TIMEOUT. ResumeRefused if
        it announces a close :attr:`~bridge.protocol.CloseCode.NO_SUCH_SESSION` instead (the backend's refusal,
        in band so that it crosses the inverting proxy's shim)."""
        endpoint.sock.settimeout(ATTACH_TIMEOUT)
        try:
            message = endpoint.receive()
        finally:
            endpoint.sock.settimeout(None)
        if isinstance(message, resume.Closing) and message.code == CloseCode.NO_SUCH_SESSION:
            raise ResumeRefused("the backend holds no such session: unknown, ended or past resume_timeout")
        if not isinstance(message, resume.Resumed):
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "a re-attached websocket did not start with "
                                    "the peer's resumed message")
        return message

    def _replay(self, chunks: list[bytes], step: Step) -> None:
        """Send again what the peer lacks, then what the lifecycle decided on re-attaching (our marker).
        The caller holds the send gate; the reader already reads the new websocket."""
        generation = self._generation
        try:
            for chunk in chunks:
                self._websocket.send_data(chunk)
            self._carry_out(step)
        except OSError as exc:
            self._report_lost(generation, Outcome(Kind.WEBSOCKET_DROPPED,
                                                  f"abort: websocket send failed ({describe_error(exc)})"))
            return
        if Action.SEND_END_OF_STREAM in step:
            self._carry_out(self._decide(Lifecycle.end_of_stream_sent))

    def _carry_out(self, step: Step) -> None:
        """Do what the lifecycle decided, in its order. Only sending our marker raises (OSError)."""
        for action in step.actions:
            match action:
                case Action.SEND_END_OF_STREAM | Action.SEND_END_OF_STREAM_AND_CLOSE:
                    self._websocket.send_end_of_stream(then_close=action is Action.SEND_END_OF_STREAM_AND_CLOSE)
                case Action.SEND_CLOSE:
                    self._send_close()
                case Action.ANSWER_CLOSE:
                    self._answer_close()
                case Action.SEND_ABORT_CLOSE:
                    self._send_abort_close(step.code)
                case Action.RESET_TCP:
                    self._reset_tcp()
                case Action.SHUT_TCP_READ:
                    _shutdown(self._tcp, socket.SHUT_RD)
                case Action.SHUT_TCP_WRITE:
                    _shutdown(self._tcp, socket.SHUT_WR)
                case Action.SHUT_TCP_BOTH:
                    _shutdown(self._tcp, socket.SHUT_RDWR)  # wakes our reader, which then sees the tunnel done
                case Action.SHUT_WEBSOCKET:
                    self._websocket.shutdown()
                case Action.DETACH:
                    raise AssertionError("only _report_lost detaches: it knows which websocket dropped")

    def _peer_takes_what_we_sent(self) -> bool:
        """Whether the websocket's send queue empties within CLOSE_HANDSHAKE_TIMEOUT without standing still
        for PUMP_CLOSE_WAIT (True also when the kernel cannot tell). Waits on the thread that ends the
        tunnel, never on a pump."""
        sock = self._websocket.sock
        mark, moved_at = send_progress(sock), time.monotonic()
        for _ in range(int(CLOSE_HANDSHAKE_TIMEOUT / RELEASE_POLL)):
            if mark is None or mark[1] in (0, None):  # (bytes acknowledged, send queue)
                return True
            time.sleep(RELEASE_POLL)
            now, latest = time.monotonic(), send_progress(sock)
            if latest != mark:
                mark, moved_at = latest, now
            elif now - moved_at > PUMP_CLOSE_WAIT:
                return False
        return False

    def _send_close(self) -> None:
        # Never blocks (it runs on either pump or the housekeeper): a close frame that cannot
        # go now stays pending, and the housekeeper writes it once there is room.
        try:
            self._websocket.send_close(CloseCode.NORMAL, "", wait=0)
        except OSError:
            self._websocket.shutdown()

    def _answer_close(self) -> None:
        # This is the reading thread: the answer may wait a bounded time for a send in
        # progress and for room, never longer. A peer that closed reads until it has our
        # close frame; if our frames still cannot move, it is not reading them, and a RST
        # (as in abort) ends the connection and wakes our writer blocked on it.
        if not self._websocket.send_close(CloseCode.NORMAL, "", wait=SEND_CLOSE_WAIT):
            reset_now(self._websocket.sock)

    def _send_abort_close(self, code: int) -> None:
        # A pump thread may wait a moment for the other pump's frame to finish (it may
        # just not have been scheduled since its send returned); the housekeeper never waits.
        wait = PUMP_CLOSE_WAIT if threading.get_ident() in self._pump_threads else 0
        outcome = self._lifecycle.outcome
        if not self._websocket.send_close(code, outcome.detail[:120] if outcome else "", wait=wait):
            # Our own frames are stuck on a peer that is not reading: a FIN would
            # queue behind them and never arrive. A RST always does.
            reset_now(self._websocket.sock)

    def _reset_tcp(self) -> None:
        if not reset_now(self._tcp):
            # SHUT_RD wakes our reader without sending anything; a writer blocked
            # in sendall only wakes on SHUT_WR, whose FIN then sits behind the data
            # it was blocked on, and the RST at close discards both.
            _shutdown(self._tcp, socket.SHUT_RDWR if self._writing_tcp else socket.SHUT_RD)

    def _release(self) -> None:
        if self._lifecycle.aborted and not self._peer_takes_what_we_sent():
            # Our abort's close frame and FIN wait behind bytes the peer does not take (its reader is
            # stuck on its own TCP peer): they would never arrive. A RST always does.
            reset_now(self._websocket.sock)
        self._websocket.shutdown()
        self._websocket.close()
        self._tcp.close()
        with self._attached:
            self._released = True
            self._attached.notify_all()
