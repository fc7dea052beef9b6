"""A tunnel's resumable session: its replay buffer and receipts, shared by the tunnel's threads.

The rules (what is acknowledged when, what is replayed) are :mod:`bridge.resume`'s; this module adds
the locking and the one wait the pump needs: a sender whose replay buffer is full waits here for the
peer's acknowledgement, which is the backpressure that bounds a tunnel's memory.

It never waits where waiting could deadlock, since the peer's acknowledgements travel behind the
peer's data: when this side's own reader is stuck writing to its TCP peer (a client that sends
everything before it reads anything), an acknowledgement may be queued behind bytes nobody takes. The
sender then goes on, and the buffer forgets its oldest bytes instead of growing (memory stays
bounded); the tunnel is not resumable until the peer acknowledges past them, as TCP itself would not
block one direction on the other.

A session starts in one of two ways:

* the **backend** consented (its first message, :class:`~bridge.resume.Consent`, carries the id):
  ``Session(buffer, consented=True, ...)``;
* the **frontend** offered and does not know yet whether the backend is ours: it keeps what it sends,
  never waiting (a Go backend never acknowledges); a :class:`~bridge.resume.Consent` as the first
  message makes it resumable, anything else ends the session (:meth:`Session.first_message`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from bridge import resume
from bridge.resume import Ack, Consent, Receipts, ReplayBuffer, Resumed

#: How often a sender waiting for an acknowledgement asks whether its own reader is stalled.
STALL_CHECK_INTERVAL = 0.25


class ResumeRefused(Exception):
    """The peer refused to re-attach the session (unknown or expired id, a token that no longer passes):
    trying again cannot help, and the tunnel ends as an abort with this message as its reason."""


class Session:
    """The resumable state of one tunnel. Thread-safe: the two pumps and the housekeeper share it.

    ``buffer``: the bytes this side keeps for replay (``resume_buffer``); ``peer_buffer``: the peer's,
    which sets how soon this side acknowledges (a quarter of it, :class:`~bridge.resume.Receipts`).
    """

    def __init__(self, buffer: int, *, consented: bool, session_id: str | None = None,
                 peer_buffer: int = resume.DEFAULT_BUFFER, affinity: str | None = None) -> None:
        self.id = session_id
        #: The frontend's routing key, sent with the offer and every re-attach (:data:`~bridge.resume.AFFINITY_HEADER`).
        self.affinity = affinity
        self.consented = consented
        self.replay: ReplayBuffer | None = ReplayBuffer(buffer)
        self.receipts = Receipts(peer_buffer)
        #: Whether the first message from the peer was seen (only the frontend waits for it).
        self.decided = consented
        self._closed = False
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        #: True while the sender waits for an acknowledgement (backpressure, not a dead peer).
        self.waiting = False
        #: Stream bytes the reader took from the websocket in all (delivered, or about to be): what a
        #: re-attached peer is told we received. Only the reader changes it, under the tunnel's take lock.
        self.taken = 0
        #: Whether the reader took the peer's end-of-stream marker.
        self.marker_taken = False
        #: Whether the peer said it has our end-of-stream marker (and so every byte before it).
        self.peer_has_marker = False

    @property
    def active(self) -> bool:
        """Whether the session is on: consented by the backend, or still offered."""
        return self.consented or not self.decided

    @property
    def replayable(self) -> bool:
        """Whether everything this side sent and the peer did not acknowledge is kept."""
        return self.consented and self.replay is not None and self.replay.complete

    def first_message(self, message: object) -> bool:
        """The frontend's first message from the backend: a Consent makes the session resumable (True: the
        message is consumed); anything else ends it (a Go backend, or ours with ``resume: false``)."""
        with self._lock:
            self.decided = True
            if isinstance(message, Consent):
                self.consented, self.id = True, message.session
                self.receipts.threshold = max(1, message.buffer // 4)
                return True
            self.replay = None
            self._room.notify_all()
            return False

    def send_room(self, most: int, stalled: Callable[[], bool]) -> int:
        """How many bytes the sender may read and send now, at most ``most``; 0 once the session is closed.

        Waits while a consented session's buffer is full, unless (or until) ``stalled()`` says this
        side's reader is stuck on its TCP peer: then the buffer will evict (see the module docstring).
        """
        replay = self.replay
        if replay is not None and self.consented and not self._closed:
            # The common case, without the lock: acknowledgements only ever add room, so a stale
            # count errs on the safe side.
            room = replay.limit - replay.sent + replay.acknowledged
            if room > 0:
                return most if most <= room else room
        with self._lock:
            while not self._closed and self.consented and self.replay is not None and self.replay.room() <= 0:
                if stalled():
                    break
                self.waiting = True
                self._room.wait(STALL_CHECK_INTERVAL)
            self.waiting = False
            if self._closed:
                return 0
            room = self.replay.room() if self.consented and self.replay is not None else 0
            return min(most, room) if room > 0 else most

    def sent(self, data: bytes) -> None:
        """Keep ``data`` (just read, about to be sent) for replay, forgetting the oldest bytes kept if it
        does not fit (an offer not yet answered, or a stalled reader: see :meth:`send_room`).

        Only the sender calls it. What fits a consented session's room is kept without the lock
        (:meth:`~bridge.resume.ReplayBuffer.append_within_room`): this runs for every message.
        """
        replay = self.replay
        if replay is not None and self.consented and replay.append_within_room(data):
            return
        with self._lock:
            if self.replay is not None:
                self.replay.append(data, evict=True)

    def acknowledged(self, ack: Ack) -> None:
        """The peer's acknowledgement: forget what it received and wake a waiting sender.
        ProtocolViolation if the count is impossible."""
        with self._lock:
            if self.replay is not None:
                self.replay.acknowledge(ack.received)
            if ack.ended:
                self.peer_has_marker = True
            self._room.notify_all()

    def received(self, count: int, now: float) -> Ack | None:
        """``count`` stream bytes were delivered to our TCP side; the acknowledgement due now, if any.

        Only the reader calls it, for every message: counting takes no lock
        (:meth:`~bridge.resume.Receipts.count`), making the acknowledgement does.
        """
        if not self.consented or not self.receipts.count(count, now):
            return None
        with self._lock:
            return self.receipts.due(now)

    def marker_delivered(self) -> Ack | None:
        """The peer's marker came after everything before it was delivered: the acknowledgement to send
        now, saying so (None on a session that is not consented)."""
        with self._lock:
            return self.receipts.ended() if self.consented else None

    def due(self, now: float) -> Ack | None:
        """The acknowledgement due by time (the housekeeper asks every tick), if any."""
        with self._lock:
            return self.receipts.due(now) if self.consented else None

    def resumed(self) -> Resumed:
        """What we tell a re-attached peer we received (the first message on the new websocket); from now
        on no acknowledgement says less. The caller holds the take lock (the count stands still)."""
        with self._lock:
            self.receipts.resumed(self.taken)
            return Resumed(self.taken, ended=self.marker_taken)

    def replay_from(self, received: int) -> list[bytes]:
        """What to send again to a re-attached peer that received ``received`` bytes in all (they count as
        acknowledged: a waiting sender wakes). ReplayLost if some were evicted, ProtocolViolation if the
        count is impossible."""
        with self._lock:
            assert self.replay is not None, "only a consented session re-attaches"
            try:
                return self.replay.replay(received)
            finally:
                self._room.notify_all()

    def peer_resumed(self, peer_has_marker: bool) -> None:
        """The re-attached peer's Resumed said whether it has our marker."""
        with self._lock:
            self.peer_has_marker = self.peer_has_marker or peer_has_marker

    def close(self) -> None:
        """The tunnel is ending: wake a waiting sender for good."""
        with self._lock:
            self._closed = True
            self._room.notify_all()
