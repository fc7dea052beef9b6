"""The bridge's wire format, free of any I/O.

Compatible byte for byte with google/inverting-proxy ``utils/tcpbridge``:

* a tunnel is one websocket, opened with a GET upgrade of :data:`BRIDGE_PATH`
  (named routes append ``/<route>``; the bare path is the ``default`` route);
* every websocket message is a TEXT message whose payload is the lowercase hex
  of the bytes it carries (uppercase is accepted on receipt);
* an empty TEXT message is tcpbridge's end-of-stream marker (a half-close). The
  Go reference ignores empty messages, so sending one to it is harmless.

Between two tcpbridge peers on a path that carries binary messages, the tunnel
switches to BINARY messages holding the raw bytes (half the bytes on the wire,
no hex work). Negotiation, in full:

1. the frontend offers it with the request header ``X-Tcpbridge-Offer: binary-frames``;
2. a backend willing to switch answers ``X-Tcpbridge-Frames: binary`` in its 101. The
   Go backend echoes every request header into its 101, so only a response header
   whose *name* the request did not carry can count as consent (:func:`binary_accepted`);
3. a frontend that saw the consent sends an empty BINARY message as its very first
   message (the *switch marker*) and binary messages from then on;
4. a backend that consented and receives the switch marker answers with its own
   switch marker, after whatever hex messages it already sent, and binary from then on.

Each direction switches at its marker, so neither side waits for the other and a
server that speaks first (ssh, smtp) is not held up. Where something between the
two ends answers the upgrade itself and forwards request headers but not the
101's (the inverting proxy's websocket shim), the frontend never sees consent and
the tunnel stays hex. After a direction's marker, a TEXT message is the protocol
error (1003) and an empty BINARY message is the end-of-stream marker.

This module turns bytes into payloads and received message fragments back into
stream events; :mod:`bridge.frames` carries them in websocket frames, and the
daemons do the socket work.
"""

from __future__ import annotations

import binascii
import posixpath
import re
from enum import IntEnum
from typing import ClassVar, Final, Self, cast
from urllib.parse import urlsplit, urlunsplit

BRIDGE_PATH: Final = "/tcp-over-websocket-bridge/35218cb7-1201-4940-89e8-48d8f03fed96"
DEFAULT_ROUTE: Final = "default"
ROUTE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: Our own senders read this much from TCP per message (the Go reference reads 32 KiB).
READ_CHUNK: Final = 64 * 1024
#: Default cap on one received message's payload; it must admit the Go frontend's
#: 65,536 hex characters.
DEFAULT_MAX_MESSAGE_BYTES: Final = 1024 * 1024
GO_FRONTEND_MESSAGE_BYTES: Final = 65536

#: The frontend's offer of binary messages (request header) and the backend's consent (101 header).
OFFER_HEADER: Final = "X-Tcpbridge-Offer"
OFFER_BINARY: Final = "binary-frames"
CONSENT_HEADER: Final = "X-Tcpbridge-Frames"
CONSENT_BINARY: Final = "binary"
#: Header names a user may not set on a tunnel: they would fake an offer or, echoed by a Go backend, a consent.
RESERVED_HEADERS: Final = frozenset({OFFER_HEADER.lower(), CONSENT_HEADER.lower()})


class CloseCode(IntEnum):
    """Websocket close codes (RFC 6455 section 7.4.1) that tcpbridge sends or reads."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    ABNORMAL = 1006  # never sent: the connection dropped without a close frame
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    #: A re-attach named a session the backend does not hold (unknown, ended or past resume_timeout).
    #: Private range; announced in band (``tcpbridge:closing``), so it crosses the inverting proxy's shim.
    NO_SUCH_SESSION = 4404


class ProtocolViolation(Exception):
    """The websocket peer broke the wire format; close the websocket with :attr:`code`."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Marker:
    """A stream event that carries no data: one instance per subclass, named by :attr:`name`."""

    name = ""
    _instances: ClassVar[dict[type, _Marker]] = {}

    def __new__(cls) -> Self:
        if cls not in _Marker._instances:
            _Marker._instances[cls] = super().__new__(cls)
        return cast(Self, _Marker._instances[cls])

    def __repr__(self) -> str:
        return self.name


class EndOfStream(_Marker):
    """The peer's end-of-stream marker: its TCP side will send nothing more."""

    name = "END_OF_STREAM"


class SwitchToBinary(_Marker):
    """The peer's switch marker: its messages are BINARY from now on (see the module docstring)."""

    name = "SWITCH_TO_BINARY"


END_OF_STREAM: Final = EndOfStream()
SWITCH_TO_BINARY: Final = SwitchToBinary()


def encode(data: bytes) -> bytes:
    """Return the TEXT payload (lowercase hex, ASCII) that carries ``data``."""
    return binascii.hexlify(data)


def binary_offered(offers: list[str]) -> bool:
    """Whether the values of a request's :data:`OFFER_HEADER` lines include :data:`OFFER_BINARY`."""
    return any(token.strip().lower() == OFFER_BINARY for value in offers for token in value.split(","))


def binary_accepted(request_header_names: list[str], response_headers: list[tuple[str, str]]) -> bool:
    """Whether a 101's headers consent to binary messages.

    Consent is exactly one :data:`CONSENT_HEADER` line saying :data:`CONSENT_BINARY`,
    in answer to a request that did not carry that header name itself: a Go
    backend echoes request headers, and an echo is never consent.
    """
    if CONSENT_HEADER.lower() in (name.lower() for name in request_header_names):
        return False
    values = [value.strip().lower() for name, value in response_headers if name.lower() == CONSENT_HEADER.lower()]
    return values == [CONSENT_BINARY]


def bridge_path(route: str = DEFAULT_ROUTE) -> str:
    """Return the upgrade path for ``route``; ``default`` is the Go reference's bare path."""
    if route == DEFAULT_ROUTE:
        return BRIDGE_PATH
    return f"{BRIDGE_PATH}/{route}"


def route_for_path(path: str) -> str | None:
    """Return the route an upgrade path asks for, or None if it is not a bridge path.

    The returned name is not checked against any configuration; it is only
    guaranteed to be a syntactically valid route name.
    """
    if path == BRIDGE_PATH:
        return DEFAULT_ROUTE
    prefix = BRIDGE_PATH + "/"
    if path.startswith(prefix):
        name = path[len(prefix):]
        if ROUTE_NAME.fullmatch(name) and name != DEFAULT_ROUTE:
            return name
    return None


def bridge_url(base: str, route: str = DEFAULT_ROUTE) -> str:
    """Append the bridge path for ``route`` to a backend base URL, as Go's ``path.Join`` does.

    ``wss://host/prefix/`` becomes ``wss://host/prefix/tcp-over-websocket-bridge/<uuid>``;
    the query string, if any, is kept.
    """
    parts = urlsplit(base)
    path = posixpath.normpath(posixpath.join("/", parts.path.lstrip("/"), bridge_path(route).lstrip("/")))
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


class MessageDecoder:
    """Turns received websocket message fragments into stream bytes and markers.

    Feed every data frame (or partial frame) in arrival order. Hex is decoded as it
    arrives, so a message is never buffered whole and memory stays bounded by the
    fragment size. Contract of :meth:`feed`:

    * returns the bytes decoded from this fragment (possibly ``b""``),
      :data:`END_OF_STREAM` when a complete message turned out to be empty (TEXT
      before the switch, BINARY after it), or :data:`SWITCH_TO_BINARY` for the
      peer's switch marker, accepted only when ``switch_allowed`` and only once;
    * raises :class:`ProtocolViolation` with 1003 for a BINARY message before the
      switch (other than the marker) or a TEXT one after it, 1007 for text that is
      not hex or has an odd length, and 1009 for a message whose payload exceeds
      ``max_message_bytes``. After that the decoder is unusable.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, *, switch_allowed: bool = False) -> None:
        self.max_message_bytes = max_message_bytes
        self.switch_allowed = switch_allowed
        #: True once the peer's switch marker arrived: its messages are BINARY from then on.
        self.binary = False
        self._message_length = 0
        self._odd_digit: bytes = b""

    def feed(self, payload: bytes | str, *, binary: bool,
             message_finished: bool) -> bytes | EndOfStream | SwitchToBinary:
        if binary != self.binary and not (binary and self.switch_allowed):
            raise ProtocolViolation(CloseCode.UNSUPPORTED_DATA, "text message on a binary tunnel" if self.binary
                                    else "binary message on a text (hex) tunnel")
        self._message_length += len(payload)
        if self._message_length > self.max_message_bytes:
            raise ProtocolViolation(
                CloseCode.MESSAGE_TOO_BIG,
                f"message larger than max_message_bytes ({self.max_message_bytes})",
            )
        if binary and not self.binary:  # a candidate switch marker: it must be empty
            if self._message_length:
                raise ProtocolViolation(CloseCode.UNSUPPORTED_DATA, "binary message before the switch marker")
            if not message_finished:
                return b""
            self.binary, self.switch_allowed = True, False
            return SWITCH_TO_BINARY
        data = _bytes(payload) if binary else self._decode(payload)
        if message_finished:
            if self._odd_digit:
                raise ProtocolViolation(CloseCode.INVALID_DATA, "hex payload of odd length")
            empty = self._message_length == 0
            self._message_length = 0
            if empty:
                return END_OF_STREAM
        return data

    def _decode(self, payload: bytes | str) -> bytes:
        if isinstance(payload, str):
            if not payload.isascii():
                raise ProtocolViolation(CloseCode.INVALID_DATA, "text payload is not hex")
            payload = payload.encode("ascii")
        if self._odd_digit:
            payload = self._odd_digit + payload
            self._odd_digit = b""
        if len(payload) % 2:
            self._odd_digit = payload[-1:]
            payload = payload[:-1]
        try:
            return binascii.unhexlify(payload)
        except binascii.Error:
            raise ProtocolViolation(CloseCode.INVALID_DATA, "text payload is not hex") from None


def _bytes(payload: bytes | str) -> bytes:
    return payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
