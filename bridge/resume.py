"""Resumable tunnels, the part without I/O: in-band control messages, the replay buffer, acknowledgements.

A resumable tunnel outlives its websocket: when the websocket drops without a close handshake, the
frontend dials again and both ends replay what the other did not receive. This module holds the
rules; the daemons do the socket work.

**Negotiation.** The frontend offers with the request header ``X-Tcpbridge-Resume: <buffer>``, the
bytes it keeps for replay (so the backend knows how soon to acknowledge). A willing backend consents
*in band*, with a control message as the very first message of the websocket, because on the inverting
proxy's path the frontend never sees the backend's 101 headers (the shim answers the upgrade itself);
and only after the offer, because a Go backend echoes request headers and never sends messages of its
own before the target's data. A Go peer on either side never offers or consents, and sees nothing new.

**Control messages** are TEXT messages (the shim relays only text safely) that begin with
:data:`PREFIX`; a data message in hex holds only hex digits and the end-of-stream marker is empty, so
the colon can never start one. They are valid only on a tunnel that negotiated resume, in hex and
binary mode alike (after the binary switch, a TEXT message is otherwise a protocol error):

* ``tcpbridge:resume <session> <buffer>``: the backend's consent; ``session`` is 32 lowercase hex
  digits (128 bits from :mod:`secrets`), ``buffer`` the bytes it keeps for replay;
* ``tcpbridge:ack <received>[ end]``: the sender has received ``received`` stream bytes in all (since
  the tunnel began, across websockets), so the peer may forget them; ``end``: and the peer's
  end-of-stream marker after them (sent at once when the marker comes, so a drop after a close
  need not be resumed when the peer has everything);
* ``tcpbridge:resumed <received>[ end]``: the first message on a re-attached websocket, from each
  side: how many stream bytes it received in all, and ``end`` if the peer's end-of-stream marker
  came after them; the other side replays from there (the marker too, if it had sent one and
  ``end`` is missing);
* ``tcpbridge:closing <code>``: written right before each close frame of a resumable tunnel, with
  its code. The inverting proxy's shim turns a dropped websocket on either leg into a close 1000
  towards the other, and loses every close code; so a close frame *not* announced is a relay's, and
  counts as a drop (the tunnel resumes), while an announced one counts with the announced code.

Byte counts are of the TCP stream (decoded bytes, whatever the message mode), as decimal digits.

**Re-attaching.** The frontend dials the same URL with the same headers, token and TLS checks, plus
``X-Tcpbridge-Session: <session>``. A backend that holds no such session refuses in band: it upgrades
and closes with an announced :attr:`~bridge.protocol.CloseCode.NO_SUCH_SESSION` (4404), because the
inverting proxy's agent turns any other answer into a 500 that names no status. The offer and every
re-attach carry the same random
``X-Tcpbridge-Affinity: <key>``, so a load balancer in front of several backends can send both to the
one that holds the session (nginx ``hash $http_x_tcpbridge_affinity consistent``; requests without it,
from Go frontends, are spread as before). The session id is compared in constant time and never
logged.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections import deque
from typing import Final, NamedTuple

from bridge.protocol import CloseCode, ProtocolViolation

#: What starts every control message: never hex, never empty.
PREFIX: Final = "tcpbridge:"
_PREFIX_BYTES: Final = PREFIX.encode("ascii")
#: The request header that offers resume; its value is the frontend's replay buffer in bytes.
RESUME_HEADER: Final = "X-Tcpbridge-Resume"
#: The request header that re-attaches a websocket to a session.
SESSION_HEADER: Final = "X-Tcpbridge-Session"
#: The request header with a resumable tunnel's routing key: random, sent with the offer and with every
#: re-attach, so a load balancer hashing on it sends both to the same backend. Not a secret.
AFFINITY_HEADER: Final = "X-Tcpbridge-Affinity"
#: Default bytes each side keeps for replay per direction (``resume_buffer``).
DEFAULT_BUFFER: Final = 4 * 1024 * 1024
#: Acknowledge at the latest after this many seconds with unacknowledged bytes.
ACK_INTERVAL: Final = 0.5
#: Largest count a control message may carry (2**63 - 1: no tunnel moves more).
MAX_COUNT: Final = (1 << 63) - 1

_SESSION = re.compile(r"[0-9a-f]{32}")
_COUNT = re.compile(r"0|[1-9][0-9]{0,18}")


def parse_offer(values: list[str]) -> int | None:
    """The frontend's replay buffer from the values of a request's :data:`RESUME_HEADER` lines, or None
    when there is no valid offer (none, several, or not a positive count)."""
    if len(values) != 1:
        return None
    try:
        buffer = _parse_count(values[0].strip())
    except ValueError:
        return None
    return buffer or None


def new_affinity() -> str:
    """A fresh routing key for :data:`AFFINITY_HEADER`: 64 random bits as 16 hex digits."""
    return secrets.token_hex(8)


def new_session_id() -> str:
    """A fresh session id: 128 random bits as 32 lowercase hex digits."""
    return secrets.token_hex(16)


def is_session_id(text: str) -> bool:
    """Whether ``text`` has the form of a session id (it may still name no session)."""
    return _SESSION.fullmatch(text) is not None


def same_session(given: str, expected: str) -> bool:
    """Compare a presented session id with ours in constant time."""
    return hmac.compare_digest(given.encode("ascii", "replace"), expected.encode("ascii"))


class Consent(NamedTuple):
    """The backend agrees to resume: the session's id, and the bytes it keeps for replay."""

    session: str
    buffer: int


class Ack(NamedTuple):
    """The sender has received ``received`` stream bytes in all, and (``ended``) the end-of-stream marker."""

    received: int
    ended: bool = False


class Closing(NamedTuple):
    """The sender's next frame is its close frame, with ``code`` (whatever code reaches the receiver)."""

    code: int


class Resumed(NamedTuple):
    """First message on a re-attached websocket: the sender has received ``received`` stream bytes in all,
    and (``ended``) the end-of-stream marker after them."""

    received: int
    ended: bool = False


Control = Consent | Ack | Resumed | Closing


def encode(message: Control) -> str:
    """The TEXT payload of a control message."""
    if isinstance(message, Consent):
        if not is_session_id(message.session):
            raise ValueError("not a session id")
        return f"{PREFIX}resume {message.session} {_count(message.buffer)}"
    if isinstance(message, Ack):
        return f"{PREFIX}ack {_count(message.received)}{' end' if message.ended else ''}"
    if isinstance(message, Closing):
        if not 1000 <= message.code <= 4999:
            raise ValueError(f"not a close code: {message.code}")
        return f"{PREFIX}closing {message.code}"
    return f"{PREFIX}resumed {_count(message.received)}{' end' if message.ended else ''}"


def is_control(payload: bytes | memoryview) -> bool:
    """Whether a received TEXT payload is a control message rather than data (or the end-of-stream marker)."""
    return bytes(payload[:len(_PREFIX_BYTES)]) == _PREFIX_BYTES


def decode(text: str) -> Control:
    """The control message in a TEXT payload (see :func:`is_control`); ProtocolViolation (1007) if malformed."""
    verb, *args = text[len(PREFIX):].split(" ")
    try:
        if verb == "resume" and len(args) == 2 and is_session_id(args[0]):
            return Consent(args[0], _parse_count(args[1]))
        if verb == "ack" and (len(args) == 1 or (len(args) == 2 and args[1] == "end")):
            return Ack(_parse_count(args[0]), ended=len(args) == 2)
        if verb == "resumed" and (len(args) == 1 or (len(args) == 2 and args[1] == "end")):
            return Resumed(_parse_count(args[0]), ended=len(args) == 2)
        if verb == "closing" and len(args) == 1 and 1000 <= (code := _parse_count(args[0])) <= 4999:
            return Closing(code)
    except ValueError:
        pass
    raise ProtocolViolation(CloseCode.INVALID_DATA, f"malformed control message {text[:60]!r}")


def _count(value: int) -> str:
    if not 0 <= value <= MAX_COUNT:
        raise ValueError(f"count out of range: {value}")
    return str(value)


def _parse_count(text: str) -> int:
    if not _COUNT.fullmatch(text) or int(text) > MAX_COUNT:
        raise ValueError(text)
    return int(text)


class ReplayLost(Exception):
    """The peer needs bytes this side no longer keeps (they were evicted: see :meth:`ReplayBuffer.append`)."""


class ReplayBuffer:
    """What one side sent and the peer has not acknowledged yet, at most ``limit`` bytes of it.

    Offsets count stream bytes since the tunnel began. :attr:`sent` is the offset after the last
    byte sent, :attr:`acknowledged` the offset the peer confirmed; the buffer keeps the bytes in
    between (the sent objects themselves, never copies). The pump sends at most :meth:`room` bytes
    more: a full buffer stops it reading its TCP side, which is the backpressure that bounds memory
    while the peer is away.

    Where waiting could deadlock (the peer's acknowledgements queue behind data our own side cannot
    deliver), the pump appends with ``evict=True`` instead: the oldest unacknowledged bytes are
    forgotten, memory stays bounded, and the buffer is not :attr:`complete` (cannot replay all the
    peer may need) until the peer acknowledges past them.
    """

    def __init__(self, limit: int = DEFAULT_BUFFER) -> None:
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.limit = limit
        self.sent = 0
        self.acknowledged = 0
        self._chunks: deque[bytes] = deque()
        self._start = 0  # the offset of the first byte kept (acknowledged, or later after an eviction)
        self._skip = 0  # bytes of the first chunk before _start

    @property
    def held(self) -> int:
        """Bytes sent and not acknowledged (more than :attr:`kept` after an eviction)."""
        return self.sent - self.acknowledged

    @property
    def kept(self) -> int:
        """Bytes in memory: never more than :attr:`limit`."""
        return self.sent - self._start

    @property
    def complete(self) -> bool:
        """Whether every byte sent and not acknowledged is kept, so any resume can be served."""
        return self._start == self.acknowledged

    def room(self) -> int:
        """How many more bytes may be sent before an acknowledgement (negative after an eviction)."""
        return self.limit - self.held

    def append(self, data: bytes, *, evict: bool = False) -> None:
        """Record ``data`` as sent. The caller sends at most :meth:`room` bytes, or says ``evict``: then
        the oldest bytes are forgotten to keep within the limit."""
        if not evict and len(data) > max(0, self.room()):
            raise ValueError(f"{len(data)} bytes do not fit the replay buffer ({self.room()} free)")
        if data:
            self._chunks.append(data)
            self.sent += len(data)
            if self.kept > self.limit:
                self._forget_to(self.sent - self.limit)

    def append_within_room(self, data: bytes) -> bool:
        """Record ``data`` as sent if it fits :meth:`room`, forgetting nothing; False, with nothing recorded,
        if it does not (the caller then takes :meth:`append`'s way).

        The sender's lock-free way (:meth:`bridge.session.Session.sent`): it appends to the right of the
        chunks and then advances :attr:`sent`, so an :meth:`acknowledge` running meanwhile on another
        thread only ever sees chunks that cover :attr:`sent`. That holds on CPython, whose deque appends
        and pops are atomic and whose attribute stores are seen in order, and only while this thread is
        the only one that appends.
        """
        if len(data) > self.room():
            return False
        self._chunks.append(data)
        self.sent += len(data)
        return True

    def acknowledge(self, received: int) -> None:
        """The peer has received ``received`` bytes in all: forget them. A count below an earlier one
        or beyond what was sent is the peer's protocol error (1002)."""
        if not self.acknowledged <= received <= self.sent:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, f"acknowledgement of {received} bytes, but "
                                    f"{self.acknowledged} were acknowledged and {self.sent} sent")
        self.acknowledged = received
        if received > self._start:
            self._forget_to(received)

    def _forget_to(self, offset: int) -> None:
        drop = offset - self._start
        self._start = offset
        while drop:
            first = len(self._chunks[0]) - self._skip
            if drop < first:
                self._skip += drop
                return
            drop -= first
            self._chunks.popleft()
            self._skip = 0

    def replay(self, received: int) -> list[bytes]:
        """The bytes to send again to a peer that has received ``received`` bytes in all (after which they
        count as acknowledged). ProtocolViolation if the peer claims bytes never sent, or bytes we
        could only have forgotten after it acknowledged them; ReplayLost if some it needs were evicted."""
        self.acknowledge(received)
        if not self.complete:
            raise ReplayLost(f"{self._start - received} bytes the peer has not received are no longer kept")
        if not self._chunks:
            return []
        first = self._chunks[0][self._skip:] if self._skip else self._chunks[0]
        return [first, *list(self._chunks)[1:]]


class Receipts:
    """Counts the stream bytes one side received and says when to acknowledge them.

    An acknowledgement is due once a quarter of the peer's replay buffer is unacknowledged (so a
    reading side never lets the sender fill it), or :data:`ACK_INTERVAL` seconds after the first
    unacknowledged byte, whichever comes first. Times are the caller's ``time.monotonic()``.
    """

    def __init__(self, peer_buffer: int = DEFAULT_BUFFER, interval: float = ACK_INTERVAL) -> None:
        self.received = 0
        self.acknowledged = 0
        self.threshold = max(1, peer_buffer // 4)
        self.interval = interval
        self._since: float | None = None

    def add(self, count: int, now: float) -> Ack | None:
        """``count`` more bytes arrived; the acknowledgement to send now, if one is due."""
        return self.due(now) if self.count(count, now) else None

    def count(self, count: int, now: float) -> bool:
        """``count`` more bytes arrived; whether an acknowledgement is due by size (then :meth:`due` makes it).

        The reader's lock-free way (:meth:`bridge.session.Session.received`): only it adds, and a timer it
        starts that a concurrent :meth:`due` clears again is started anew by the next :meth:`due`.
        """
        self.received += count
        if count and self._since is None:
            self._since = now
        return self.received - self.acknowledged >= self.threshold

    def due(self, now: float) -> Ack | None:
        """The acknowledgement to send now (the housekeeper asks every tick), if any is due by size or time.
        Pending bytes without a timer (counted while the last acknowledgement was made) start one now."""
        received = self.received
        pending = received - self.acknowledged
        if pending <= 0:
            return None
        if self._since is None:
            self._since = now
        if pending < self.threshold and now - self._since < self.interval:
            return None
        self.acknowledged = received
        self._since = None
        return Ack(received)

    def ended(self) -> Ack:
        """The acknowledgement to send at once when the peer's end-of-stream marker came: everything
        received so far, and the marker."""
        self.acknowledged = self.received
        self._since = None
        return Ack(self.received, ended=True)

    def resumed(self, taken: int) -> None:
        """A re-attached peer was told ``taken`` bytes (received, some perhaps still being delivered) and
        forgets them: acknowledge nothing below that, since acknowledgements never go back."""
        self.acknowledged = max(self.acknowledged, taken)
        self._since = None
