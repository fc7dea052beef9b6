"""Fake Go tcpbridge peers, played byte for byte on raw sockets (stdlib only).

The Go reference (google/inverting-proxy ``utils/tcpbridge``, websocket layer
gorilla/websocket v1.5.0) is modelled here exactly as it behaves on the wire, as
recorded from it in ``tests/vectors/``:

* the **Go frontend** sends the upgrade request of ``frontend_handshake.bin``
  (fixed header order, no Origin/Protocol/Extensions), waits for the 101, then
  carries each TCP read (32 KiB at most) as one TEXT message of lowercase hex,
  fragmented into masked frames of at most 4096 payload bytes;
* the **Go backend** answers with a 101 built like
  ``backend_handshake_response.bin`` (four fixed lines, then the request's own
  headers echoed back except Host, Go-canonicalised, so Upgrade and Connection
  appear twice), then sends each TCP read as one unmasked, unfragmented TEXT
  frame with the shortest length encoding;
* both sides ignore empty and binary messages (the Go ``Read`` loop skips
  them), never send an end-of-stream marker, and never start a close
  handshake; gorilla's default close handler echoes a received close frame;
* a Go "drop" is the TCP connection closed with no close frame.

Nothing in this module imports ``bridge``: the fake peers are an independent
reading of the wire format.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

#: The Go reference's websocket path (connection.StreamingPath).
BRIDGE_PATH = "/tcp-over-websocket-bridge/35218cb7-1201-4940-89e8-48d8f03fed96"
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
DATA_OPCODES = frozenset({OP_CONT, OP_TEXT, OP_BINARY})
CONTROL_OPCODES = frozenset({OP_CLOSE, OP_PING, OP_PONG})

#: io.Copy's buffer: the Go side sends one message per read of at most this many bytes.
GO_READ_SIZE = 32 * 1024
#: gorilla's default write buffer: the Go frontend's frames carry at most this much payload.
GO_FRAGMENT_SIZE = 4096

#: (reason phrase, gorilla's error text) of the refusals the Go backend answers, per status.
GO_REFUSALS: dict[int, tuple[str, str]] = {
    403: ("Forbidden", "websocket: request origin not allowed by Upgrader.CheckOrigin"),
    500: ("Internal Server Error",
          "websocket: application specific 'Sec-WebSocket-Extensions' headers are unsupported"),
}


class GoProtocolError(Exception):
    """A frame or message that gorilla/websocket (or tcpbridge's hex decoding) would reject."""


class GoBadHandshake(Exception):
    """The upgrade response is one the Go frontend's dialer rejects (gorilla ErrBadHandshake)."""

    def __init__(self, reason: str, response: HttpHead | None = None, body: bytes = b"") -> None:
        super().__init__(reason)
        self.response = response
        self.body = body


class GoCloseError(Exception):
    """The peer sent a close frame; like gorilla, it has been echoed (unless told not to)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"close {code} {reason!r}")
        self.code = code
        self.reason = reason


# ---------------------------------------------------------------------------
# Frames


class FrameRow(NamedTuple):
    """One row of the vectors' frame tables: the structure of a frame, masks aside."""

    opcode: int
    fin: bool
    rsv: int
    masked: bool
    length: int
    length_bits: int  # 7, 16 or 64: how the payload length was encoded
    header_bytes: int  # including the extended length and the masking key


@dataclass(frozen=True)
class Frame:
    """One decoded websocket frame; ``payload`` is already unmasked, ``raw`` is the wire bytes."""

    opcode: int
    payload: bytes
    fin: bool
    rsv: int
    mask: bytes | None
    length_bits: int
    header_bytes: int
    raw: bytes

    @property
    def row(self) -> FrameRow:
        return FrameRow(self.opcode, self.fin, self.rsv, self.mask is not None, len(self.payload),
                        self.length_bits, self.header_bytes)


def apply_mask(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte masking ``key`` (masking and unmasking are the same)."""
    if not payload:
        return b""
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    value = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return value.to_bytes(len(payload), "big")


def shortest_length_bits(length: int) -> int:
    """RFC 6455's minimal length form: 7-bit up to 125, 16-bit up to 65535, 64-bit beyond."""
    if length <= 125:
        return 7
    return 16 if length <= 0xFFFF else 64


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None, rsv: int = 0,
                 length_bits: int | None = None) -> bytes:
    """Build one frame. ``mask`` is the 4-byte key (None: unmasked); ``length_bits`` forces a length form."""
    bits = length_bits or shortest_length_bits(len(payload))
    first = (0x80 if fin else 0) | (rsv & 0x7) << 4 | opcode & 0xF
    mask_bit = 0x80 if mask is not None else 0
    if bits == 7:
        if len(payload) > 125:
            raise ValueError("a 7-bit length holds at most 125")
        header = struct.pack("!BB", first, mask_bit | len(payload))
    elif bits == 16:
        header = struct.pack("!BBH", first, mask_bit | 126, len(payload))
    elif bits == 64:
        header = struct.pack("!BBQ", first, mask_bit | 127, len(payload))
    else:
        raise ValueError(f"length_bits must be 7, 16 or 64, not {bits}")
    if mask is None:
        return header + payload
    if len(mask) != 4:
        raise ValueError("a masking key is 4 bytes")
    return header + mask + apply_mask(payload, mask)


def parse_frame(buf: bytes | bytearray, offset: int = 0) -> tuple[Frame, int] | None:
    """Decode the frame at ``buf[offset:]``; return it and the offset after it, or None if incomplete."""
    if len(buf) - offset < 2:
        return None
    first, second = buf[offset], buf[offset + 1]
    length = second & 0x7F
    pos = offset + 2
    if length == 126:
        if len(buf) - pos < 2:
            return None
        (length,) = struct.unpack_from("!H", buf, pos)
        pos, bits = pos + 2, 16
    elif length == 127:
        if len(buf) - pos < 8:
            return None
        (length,) = struct.unpack_from("!Q", buf, pos)
        pos, bits = pos + 8, 64
    else:
        bits = 7
    mask: bytes | None = None
    if second & 0x80:
        if len(buf) - pos < 4:
            return None
        mask = bytes(buf[pos:pos + 4])
        pos += 4
    if len(buf) - pos < length:
        return None
    payload = bytes(buf[pos:pos + length])
    if mask is not None:
        payload = apply_mask(payload, mask)
    frame = Frame(opcode=first & 0xF, payload=payload, fin=bool(first & 0x80), rsv=(first >> 4) & 0x7, mask=mask,
                  length_bits=bits, header_bytes=pos - offset, raw=bytes(buf[offset:pos + length]))
    return frame, pos + length


def decode_frames(data: bytes) -> list[Frame]:
    """Decode a whole recorded byte stream of frames; raise ValueError if it ends mid-frame."""
    frames, offset = [], 0
    while offset < len(data):
        parsed = parse_frame(data, offset)
        if parsed is None:
            raise ValueError(f"truncated frame at byte {offset} of {len(data)}")
        frame, offset = parsed
        frames.append(frame)
    return frames


def frame_table(frames: list[Frame]) -> list[FrameRow]:
    return [frame.row for frame in frames]


def reassemble(frames: list[Frame]) -> list[tuple[int, bytes]]:
    """Join data frames into (opcode, payload) messages, skipping control frames."""
    messages: list[tuple[int, bytes]] = []
    current: tuple[int, bytearray] | None = None
    for frame in frames:
        if frame.opcode in CONTROL_OPCODES:
            continue
        if frame.opcode == OP_CONT:
            if current is None:
                raise GoProtocolError("continuation frame outside a message")
            current[1].extend(frame.payload)
        else:
            if current is not None:
                raise GoProtocolError("data frame before the previous message's FIN")
            current = (frame.opcode, bytearray(frame.payload))
        if frame.fin:
            messages.append((current[0], bytes(current[1])))
            current = None
    return messages


def go_decode_hex(text: bytes) -> bytes:
    """Go's ``hex.DecodeString``: upper or lower case digits, even length, nothing else."""
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError) as exc:
        raise GoProtocolError(f"failure decoding a websocket message: {exc}") from None


def go_reads(data: bytes) -> list[bytes]:
    """Split ``data`` the way the Go side's io.Copy reads it when it is all there: 32 KiB at a time."""
    return [data[i:i + GO_READ_SIZE] for i in range(0, len(data), GO_READ_SIZE)]


def go_frontend_message(data: bytes, new_mask: Callable[[], bytes] = lambda: os.urandom(4)) -> bytes:
    """One Go frontend Write: a TEXT message of hex, fragmented into masked 4096-byte frames."""
    text = binascii.hexlify(data)
    pieces = [text[i:i + GO_FRAGMENT_SIZE] for i in range(0, len(text), GO_FRAGMENT_SIZE)] or [b""]
    return b"".join(
        encode_frame(OP_TEXT if index == 0 else OP_CONT, piece, fin=index == len(pieces) - 1, mask=new_mask())
        for index, piece in enumerate(pieces)
    )


def go_frontend_frames(data: bytes, new_mask: Callable[[], bytes] = lambda: os.urandom(4)) -> bytes:
    """What the Go frontend sends for ``data`` read from its client: one message per 32 KiB read."""
    return b"".join(go_frontend_message(chunk, new_mask) for chunk in go_reads(data))


def go_backend_message(data: bytes) -> bytes:
    """One Go backend Write: a single unmasked, unfragmented TEXT frame of hex, shortest length form."""
    return encode_frame(OP_TEXT, binascii.hexlify(data))


def go_backend_frames(data: bytes) -> bytes:
    """What the Go backend sends for ``data`` read from its target: one frame per 32 KiB read."""
    return b"".join(go_backend_message(chunk) for chunk in go_reads(data))


# ---------------------------------------------------------------------------
# HTTP


@dataclass
class HttpHead:
    """A request or response head; ``headers`` keeps order and duplicates as received."""

    start_line: str
    headers: list[tuple[str, str]]
    raw: bytes

    def get_all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def has(self, name: str) -> bool:
        return bool(self.get_all(name))

    def tokens(self, name: str) -> set[str]:
        """The lower-cased comma-separated tokens of every ``name`` header (Go's tokenListContainsValue)."""
        return {token.strip().lower() for value in self.get_all(name) for token in value.split(",")}

    @property
    def status(self) -> int:
        return int(self.start_line.split(" ", 2)[1])

    @property
    def path(self) -> str:
        return self.start_line.split(" ", 2)[1]


def parse_http_head(raw: bytes) -> HttpHead:
    """Parse a head that ends with the blank line (CRLF line endings)."""
    lines = raw.decode("latin-1").split("\r\n")
    if lines[-2:] != ["", ""]:
        raise ValueError("an HTTP head ends with an empty line")
    headers = []
    for line in lines[1:-2]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"malformed header line {line!r}")
        headers.append((name, value.strip()))
    return HttpHead(lines[0], headers, raw)


def _deadline_recv(sock: socket.socket, deadline: float, size: int = 1 << 18) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("timed out")
    sock.settimeout(remaining)
    return sock.recv(size)


def read_http_head(sock: socket.socket, buffer: bytearray, timeout: float = 5.0) -> HttpHead:
    """Read until the blank line; bytes received after it stay in ``buffer``."""
    deadline = time.monotonic() + timeout
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        data = _deadline_recv(sock, deadline)
        if not data:
            raise EOFError(f"connection closed inside the HTTP head ({bytes(buffer)!r})")
        buffer += data
    raw = bytes(buffer[:end + 4])
    del buffer[:end + 4]
    return parse_http_head(raw)


def read_http_body(sock: socket.socket, head: HttpHead, buffer: bytearray, timeout: float = 5.0) -> bytes:
    """Read the Content-Length body of a response (an empty body if there is no Content-Length)."""
    length = int(head.get("Content-Length") or 0)
    deadline = time.monotonic() + timeout
    while len(buffer) < length:
        data = _deadline_recv(sock, deadline)
        if not data:
            raise EOFError(f"connection closed after {len(buffer)} of {length} body bytes")
        buffer += data
    body = bytes(buffer[:length])
    del buffer[:length]
    return body


def accept_token(key: str) -> str:
    """RFC 6455 section 4.2.2: base64(SHA-1(key + GUID))."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WEBSOCKET_GUID).digest()).decode("ascii")


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode("ascii")


def go_canonical(name: str) -> str:
    """Go's textproto.CanonicalMIMEHeaderKey: ``sec-websocket-key`` becomes ``Sec-Websocket-Key``."""
    if not name or any(not (c.isascii() and (c.isalnum() or c in "!#$%&'*+-.^_`|~")) for c in name):
        return name
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def go_frontend_request(host: str, key: str, path: str = BRIDGE_PATH) -> bytes:
    """The Go frontend's upgrade request, header for header as in frontend_handshake.bin."""
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "User-Agent: Go-http-client/1.1\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "Upgrade: websocket\r\n"
        "\r\n"
    ).encode("ascii")


def check_go_client_handshake(response: HttpHead, key: str) -> None:
    """Raise GoBadHandshake where gorilla's Dialer would: status, Upgrade, Connection, Accept."""
    if response.status != 101:
        raise GoBadHandshake(f"bad status {response.start_line!r}", response)
    if "websocket" not in response.tokens("Upgrade"):
        raise GoBadHandshake("Upgrade lacks 'websocket'", response)
    if "upgrade" not in response.tokens("Connection"):
        raise GoBadHandshake("Connection lacks 'upgrade'", response)
    if response.get("Sec-WebSocket-Accept") != accept_token(key):
        raise GoBadHandshake("bad Sec-WebSocket-Accept", response)
    if response.has("Sec-WebSocket-Extensions"):
        raise GoBadHandshake("unsolicited extension", response)


def go_backend_verdict(request: HttpHead) -> int | None:
    """The status the Go backend refuses an upgrade with (403/500), or None if gorilla upgrades it.

    Only the bridge's own upgrade checks are modelled, not the reverse-proxy fallback
    the Go backend applies to non-upgrade requests and other paths.
    """
    if request.has("Sec-WebSocket-Extensions"):
        return 500  # the request headers are passed back as response headers; gorilla refuses this one
    origin = request.get("Origin")
    if origin is not None:
        origin_host = origin.partition("://")[2] or origin
        if origin_host.lower() != (request.get("Host") or "").lower():
            return 403
    return None


def go_backend_101(request: HttpHead, rotation: int = 0) -> bytes:
    """The Go backend's 101: four fixed lines, then the request's headers echoed (not Host).

    Echoed names are Go-canonicalised and grouped per name in order of first
    appearance; ``rotation`` rotates that block as Go's map iteration does.
    """
    key = request.get("Sec-WebSocket-Key") or ""
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Accept: {accept_token(key)}"]
    subprotocol = request.get("Sec-WebSocket-Protocol")
    if subprotocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    grouped: dict[str, list[str]] = {}
    for name, value in request.headers:
        canonical = go_canonical(name)
        if canonical not in ("Host", "Sec-Websocket-Protocol"):
            grouped.setdefault(canonical, []).append(value)
    names = list(grouped)
    if names:
        shift = rotation % len(names)
        names = names[shift:] + names[:shift]
    lines += [f"{name}: {value}" for name in names for value in grouped[name]]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def go_backend_refusal(status: int) -> bytes:
    """The Go backend's answer to an upgrade it refuses: status text plus gorilla's error, keep-alive."""
    phrase, error = GO_REFUSALS[status]
    body = f"{phrase}\n{error}\n".encode()
    return (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Sec-Websocket-Version: 13\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    ).encode("ascii") + body


# ---------------------------------------------------------------------------
# An open websocket, as the Go side drives it


class GoWebsocket:
    """One open websocket as gorilla/websocket plus tcpbridge's WebsocketNetConn use it.

    ``is_server`` picks the role: the Go backend (server) sends unmasked frames and
    requires masked ones; the Go frontend (client) the reverse. Every frame read
    is kept in :attr:`received`, so tests can assert its exact shape.
    """

    def __init__(self, sock: socket.socket, *, is_server: bool, buffered: bytes = b"") -> None:
        self.sock = sock
        self.is_server = is_server
        self.received: list[Frame] = []
        #: the 101 this websocket was opened with (set by the client side)
        self.handshake: HttpHead | None = None
        self._buffer = bytearray(buffered)
        self._pending = b""  # decoded bytes of a message not yet returned by read()
        self._send_lock = threading.Lock()

    # -- sending -----------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def message_frames(self, data: bytes) -> bytes:
        """The frames of one Go ``Write(data)`` in this role."""
        return go_backend_message(data) if self.is_server else go_frontend_message(data)

    def write(self, data: bytes) -> None:
        """One Go ``Write``: one TEXT message of hex."""
        self.send_raw(self.message_frames(data))

    def write_stream(self, data: bytes) -> None:
        """What io.Copy sends for ``data`` when it is all readable at once: one message per 32 KiB."""
        self.send_raw(go_backend_frames(data) if self.is_server else go_frontend_frames(data))

    def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        """A single frame, masked as this role must (clients mask, servers do not)."""
        self.send_raw(encode_frame(opcode, payload, fin=fin, mask=None if self.is_server else os.urandom(4)))

    def drop(self) -> None:
        """A Go-style drop: the TCP connection closes with no close frame."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    # -- receiving ---------------------------------------------------------

    def recv_frame(self, timeout: float = 5.0) -> Frame:
        """Read one frame, checked as gorilla checks it; EOFError if the connection ended first."""
        deadline = time.monotonic() + timeout
        while (parsed := parse_frame(self._buffer)) is None:
            data = _deadline_recv(self.sock, deadline)
            if not data:
                raise EOFError(f"connection closed ({len(self._buffer)} bytes of a partial frame)")
            self._buffer += data
        frame, end = parsed
        del self._buffer[:end]
        self.received.append(frame)
        self._check(frame)
        return frame

    def _check(self, frame: Frame) -> None:
        if frame.rsv:
            raise GoProtocolError(f"unexpected reserved bits 0x{frame.rsv:x}")
        if (frame.mask is not None) != self.is_server:
            raise GoProtocolError("bad MASK")
        if frame.opcode not in DATA_OPCODES | CONTROL_OPCODES:
            raise GoProtocolError(f"unknown opcode {frame.opcode}")
        if frame.opcode in CONTROL_OPCODES and (len(frame.payload) > 125 or not frame.fin):
            raise GoProtocolError("invalid control frame")

    def read_message(self, timeout: float = 5.0, *, echo_close: bool = True) -> tuple[int, bytes]:
        """gorilla's ReadMessage: answer pings, skip pongs, reassemble fragments.

        A close frame is echoed with the same code (gorilla's default close
        handler) and raised as GoCloseError.
        """
        deadline = time.monotonic() + timeout
        opcode: int | None = None
        parts: list[bytes] = []
        while True:
            frame = self.recv_frame(max(deadline - time.monotonic(), 0.001))
            if frame.opcode == OP_CLOSE:
                code, reason = (1005, "") if len(frame.payload) < 2 else (
                    struct.unpack("!H", frame.payload[:2])[0], frame.payload[2:].decode("utf-8", "replace"))
                if echo_close:
                    with contextlib.suppress(OSError):
                        self.send_frame(OP_CLOSE, b"" if code == 1005 else struct.pack("!H", code))
                raise GoCloseError(code, reason)
            if frame.opcode == OP_PING:
                self.send_frame(OP_PONG, frame.payload)
                continue
            if frame.opcode == OP_PONG:
                continue
            if frame.opcode == OP_CONT:
                if opcode is None:
                    raise GoProtocolError("continuation after FIN")
            elif opcode is not None:
                raise GoProtocolError("data before FIN")
            else:
                opcode = frame.opcode
            parts.append(frame.payload)
            if frame.fin:
                return opcode, b"".join(parts)

    def read(self, timeout: float = 5.0) -> bytes:
        """tcpbridge's WebsocketNetConn.Read: skip non-TEXT and empty messages, decode the hex."""
        deadline = time.monotonic() + timeout
        while not self._pending:
            opcode, payload = self.read_message(max(deadline - time.monotonic(), 0.001))
            if opcode == OP_TEXT:
                self._pending = go_decode_hex(payload)
        data, self._pending = self._pending, b""
        return data

    def read_exactly(self, n: int, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        out = bytearray()
        while len(out) < n:
            out += self.read(max(deadline - time.monotonic(), 0.001))
        if len(out) > n:
            raise AssertionError(f"expected {n} bytes, got {len(out)}")
        return bytes(out)


# ---------------------------------------------------------------------------
# The fake Go frontend


def go_frontend_dial(port: int, *, path: str = BRIDGE_PATH, key: str | None = None, host: str = "127.0.0.1",
                     timeout: float = 5.0) -> GoWebsocket:
    """Dial like the Go frontend: send its exact request, accept the 101 as gorilla does.

    Raises GoBadHandshake (with the response head and body) for anything but an acceptable 101.
    """
    key = key or new_key()
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.sendall(go_frontend_request(f"{host}:{port}", key, path))
        buffer = bytearray()
        response = read_http_head(sock, buffer, timeout)
        if response.status != 101:
            body = read_http_body(sock, response, buffer, timeout)
            raise GoBadHandshake(f"bad status {response.start_line!r}", response, body)
        check_go_client_handshake(response, key)
    except BaseException:
        sock.close()
        raise
    ws = GoWebsocket(sock, is_server=False, buffered=bytes(buffer))
    ws.handshake = response
    return ws


# ---------------------------------------------------------------------------
# The fake Go backend


@dataclass
class GoBackendConnection:
    """One connection accepted by :class:`GoBackend`."""

    sock: socket.socket
    request: HttpHead
    #: bytes the client sent after its request head and before our answer (a Go client sends none)
    early: bytes
    status: int
    ws: GoWebsocket | None = None


@dataclass
class GoBackend:
    """A listening fake Go backend on 127.0.0.1.

    ``status`` None answers like the real one (101, or the 403/500 of
    :func:`go_backend_verdict`); 403 or 500 forces that refusal. The answer is
    sent ``hold`` seconds after the request head arrived, so a test can see
    whether the client sends anything before the 101. ``rotation`` picks the
    order of the echoed header block; ``greeting`` is sent in the same write as
    the 101 (as when the target speaks first and the segments coalesce).
    """

    status: int | None = None
    hold: float = 0.0
    rotation: int = 0
    greeting: bytes = b""
    connections: list[GoBackendConnection] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = int(self.sock.getsockname()[1])
        self._accepted = threading.Condition()
        self._errors: list[BaseException] = []
        self._taken = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handshake, args=(conn,), daemon=True).start()

    def _handshake(self, conn: socket.socket) -> None:
        try:
            buffer = bytearray()
            request = read_http_head(conn, buffer)
            early = bytearray(buffer)
            deadline = time.monotonic() + self.hold
            while time.monotonic() < deadline:
                try:
                    data = _deadline_recv(conn, deadline)
                except TimeoutError:
                    break
                if not data:
                    break
                early += data
            status = self.status or go_backend_verdict(request) or 101
            accepted = GoBackendConnection(conn, request, bytes(early), status)
            if status == 101:
                conn.sendall(go_backend_101(request, self.rotation) + self.greeting)
                accepted.ws = GoWebsocket(conn, is_server=True, buffered=bytes(early))
            else:
                conn.sendall(go_backend_refusal(status))  # and keep the connection open, like Go
        except (OSError, EOFError, ValueError) as exc:
            with self._accepted:
                self._errors.append(exc)
                self._accepted.notify_all()
            conn.close()
            return
        with self._accepted:
            self.connections.append(accepted)
            self._accepted.notify_all()

    def accept(self, timeout: float = 5.0) -> GoBackendConnection:
        """Wait for the next answered connection (in arrival order)."""
        with self._accepted:
            index = self._taken
            if not self._accepted.wait_for(lambda: len(self.connections) > index or self._errors, timeout):
                raise TimeoutError("no connection reached the fake Go backend")
            if self._errors:
                raise AssertionError(f"fake Go backend handshake failed: {self._errors[0]!r}")
            connection = self.connections[index]
            self._taken += 1
            return connection

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for connection in self.connections:
            if connection.ws is not None:
                connection.ws.drop()
            else:
                connection.sock.close()

    def __enter__(self) -> GoBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def go_frontend(port: int, **kwargs: object) -> Iterator[GoWebsocket]:
    """:func:`go_frontend_dial` as a context manager that drops the websocket on exit."""
    ws = go_frontend_dial(port, **kwargs)  # type: ignore[arg-type]
    try:
        yield ws
    finally:
        ws.drop()
