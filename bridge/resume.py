"""Resumable tunnels, the part without I/O: in-band control messages, the replay buffer, acknowledgements.

A resumable tunnel outlives its websocket: when the websocket drops without a close handshake, the
frontend dials again and both ends replay what the other did not receive. This module holds the
rules; the daemons do the socket work.

**Negotiation.** The frontend offers with the token ``resume`` in ``X-Tcpbridge-Offer`` (beside
``binary-frames``). A willing backend consents *in band*, with a control message as the very first
message of the websocket, because on the inverting proxy's path the frontend never sees the backend's
101 headers (the shim answers the upgrade itself); and only after the offer, because a Go backend
echoes request headers and never sends messages of its own before the target's data. A Go peer on
either side never offers or consents, and sees nothing new.

**Control messages** are TEXT messages (the shim relays only text safely) that begin with
:data:`PREFIX`; a data message in hex holds only hex digits and the end-of-stream marker is empty, so
the colon can never start one. They are valid only on a tunnel that negotiated resume, in hex and
binary mode alike (after the binary switch, a TEXT message is otherwise a protocol error):

* ``tcpbridge:resume <session> <buffer>``: the backend's consent; ``session`` is 32 lowercase hex
  digits (128 bits from :mod:`secrets`), ``buffer`` the bytes it keeps for replay;
* ``tcpbridge:ack <received>``: the sender has received ``received`` stream bytes in all (since the
  tunnel began, across websockets), so the peer may forget them;
* ``tcpbridge:resumed <received>``: the first message on a re-attached websocket, from each side: how
  many stream bytes it received in all; the other side replays from there.

Byte counts are of the TCP stream (decoded bytes, whatever the message mode), as decimal digits.

**Re-attaching.** The frontend dials the same URL with the same headers, token and TLS checks, plus
``X-Tcpbridge-Session: <session>`` (a header, so a load balancer can route on it: nginx
``hash $http_x_tcpbridge_session consistent``). The session id is compared in constant time and never
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
#: The token that offers resume in ``X-Tcpbridge-Offer``.
OFFER_RESUME: Final = "resume"
#: The request header that re-attaches a websocket to a session.
SESSION_HEADER: Final = "X-Tcpbridge-Session"
#: Default bytes each side keeps for replay per direction (``resume_buffer``).
DEFAULT_BUFFER: Final = 4 * 1024 * 1024
#: Acknowledge at the latest after this many seconds with unacknowledged bytes.
ACK_INTERVAL: Final = 0.5
#: Largest count a control message may carry (2**63 - 1: no tunnel moves more).
MAX_COUNT: Final = (1 << 63) - 1

_SESSION = re.compile(r"[0-9a-f]{32}")
_COUNT = re.compile(r"0|[1-9][0-9]{0,18}")


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
    """The sender has received ``received`` stream bytes in all."""

    received: int


class Resumed(NamedTuple):
    """First message on a re-attached websocket: the sender has received ``received`` stream bytes in all."""

    received: int


Control = Consent | Ack | Resumed


def encode(message: Control) -> str:
    """The TEXT payload of a control message."""
    if isinstance(message, Consent):
        if not is_session_id(message.session):
            raise ValueError("not a session id")
        return f"{PREFIX}resume {message.session} {_count(message.buffer)}"
    if isinstance(message, Ack):
        return f"{PREFIX}ack {_count(message.received)}"
    return f"{PREFIX}resumed {_count(message.received)}"


def is_control(text: str) -> bool:
    """Whether a received TEXT payload is a control message rather than data (or the end-of-stream marker)."""
    return text.startswith(PREFIX)


def decode(text: str) -> Control:
    """The control message in a TEXT payload (see :func:`is_control`); ProtocolViolation (1007) if malformed."""
    verb, *args = text[len(PREFIX):].split(" ")
    try:
        if verb == "resume" and len(args) == 2 and is_session_id(args[0]):
            return Consent(args[0], _parse_count(args[1]))
        if verb == "ack" and len(args) == 1:
            return Ack(_parse_count(args[0]))
        if verb == "resumed" and len(args) == 1:
            return Resumed(_parse_count(args[0]))
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


class ReplayBuffer:
    """What one side sent and the peer has not acknowledged yet, bounded by ``limit`` bytes.

    Offsets count stream bytes since the tunnel began. :attr:`sent` is the offset after the last
    byte sent, :attr:`acknowledged` the offset the peer confirmed; the buffer holds the bytes in
    between (the sent objects themselves, never copies). The pump sends at most :meth:`room` bytes
    more: a full buffer stops it reading its TCP side, which is the backpressure that bounds memory
    while the peer is away.
    """

    def __init__(self, limit: int = DEFAULT_BUFFER) -> None:
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.limit = limit
        self.sent = 0
        self.acknowledged = 0
        self._chunks: deque[bytes] = deque()
        self._skip = 0  # bytes of the first chunk already acknowledged

    @property
    def held(self) -> int:
        """Bytes sent and not acknowledged."""
        return self.sent - self.acknowledged

    def room(self) -> int:
        """How many more bytes may be sent before an acknowledgement."""
        return self.limit - self.held

    def append(self, data: bytes) -> None:
        """Record ``data`` as sent (the caller sends at most :meth:`room` bytes)."""
        if len(data) > self.room():
            raise ValueError(f"{len(data)} bytes do not fit the replay buffer ({self.room()} free)")
        if data:
            self._chunks.append(data)
            self.sent += len(data)

    def acknowledge(self, received: int) -> None:
        """The peer has received ``received`` bytes in all: forget them. A count below an earlier one
        or beyond what was sent is the peer's protocol error (1002)."""
        if not self.acknowledged <= received <= self.sent:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, f"acknowledgement of {received} bytes, but "
                                    f"{self.acknowledged} were acknowledged and {self.sent} sent")
        drop = received - self.acknowledged
        self.acknowledged = received
        while drop:
            first = len(self._chunks[0]) - self._skip
            if drop < first:
                self._skip += drop
                break
            drop -= first
            self._chunks.popleft()
            self._skip = 0

    def replay(self, received: int) -> list[bytes]:
        """The bytes to send again to a peer that has received ``received`` bytes in all (after which they
        count as acknowledged). ProtocolViolation if the peer claims bytes never sent, or bytes we
        could only have forgotten after it acknowledged them."""
        self.acknowledge(received)
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
        self.received += count
        if count and self._since is None:
            self._since = now
        return self.due(now) if self.received - self.acknowledged >= self.threshold else None

    def due(self, now: float) -> Ack | None:
        """The acknowledgement to send now (the housekeeper asks every tick), if any is due by size or time."""
        pending = self.received - self.acknowledged
        if not pending or self._since is None:
            return None
        if pending < self.threshold and now - self._since < self.interval:
            return None
        self.acknowledged = self.received
        self._since = None
        return Ack(self.received)
