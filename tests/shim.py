"""A test double of google/inverting-proxy's websocket shim: the hosted proxy's side and the agent's.

In production a tunnel crosses this chain::

    TCP client -> frontend ==ws==> hosted Proxy (+ the shim's JavaScript)
        --HTTP: POST <shim>/open, /data, /poll, /close--> Agent ==ws (gorilla)==> backend -> TCP target

The real agent (``agent/websockets/shim.go`` and ``connection.go`` at google/inverting-proxy,
gorilla/websocket v1.5.0) has been read and re-expressed here in Python; no code is copied.

:class:`ShimAgent` is the agent's shim channel, an HTTP server on 127.0.0.1, as the Go code does it:

* ``POST <shim>/open``, body the websocket URL (a bare string, not JSON). Its path and query
  are kept, the scheme becomes ``ws`` and the host the agent's ``--host`` (:attr:`ShimAgent.host`).
  The agent dials that URL like gorilla's default dialer, sending the open request's own headers
  minus Upgrade, Connection, Sec-WebSocket-Key/-Version/-Extensions (so Origin, Cookie,
  Authorization, Content-Type, X-Websocket-Shim-Version and custom headers pass), with Host
  rewritten to ``--host`` (or kept, with ``rewrite_host`` = ``--rewrite-websocket-host``).
  Session ids are a decimal counter from "1". Answer 200 ``{"id": "1", "msg": "<url>", "v": 1}``
  (``v`` from ``X-Websocket-Shim-Version``, omitted when 0; ``s``: the subprotocol, omitted when
  empty), or **500** ``internal error opening a shim connection: websocket: bad handshake`` when the
  backend answers anything but 101 - so the backend's 404 and 502 both arrive as 500.
* ``POST <shim>/data``, body ``[{"id": .., "msg": ..}, ...]``: a JSON string is a TEXT message;
  a one-element list of a string is a BINARY message, base64 in version 1 (the raw string in
  version 0, which cannot carry bytes that are not UTF-8). Messages are sent in order; the first
  unknown or closed session answers 400 (those before it were sent).
* ``POST <shim>/poll``, body ``{"id": ..}``: waits up to ``min(20 s, shim_timeout / 2)`` for a
  message from the backend, then returns it and every message already queued behind it as one
  JSON array (text as a string, binary as ``[base64]``); nothing yet: **408** with no body; the
  backend's websocket ended (after every queued message was returned): **400**, and the session is
  forgotten.
* ``POST <shim>/close``, body ``{"id": ..}``: the agent sends close **1000** (no reason) to the
  backend and drops the TCP connection right after; 200 ``ok``, or 400 for an unknown session.
* A session that neither polls nor sends for ``shim_timeout`` (``--websocket-shim-timeout``,
  default 60 min) is closed by a reaper that runs every ``min(shim_timeout, 30 s)``.
* Towards the backend: a message of more than 4096 bytes goes out as 4096-byte masked frames
  (the first TEXT/BINARY, then CONTINUATION), as gorilla's client writer does with its default
  buffer; pings are answered with pongs, a received close is echoed with its code (no reason)
  and ends the session. Close codes never cross the shim.
* Both queues are Go channels of 10 messages: a backend that sends faster than the shim polls,
  or a client that posts faster than the backend reads, is held back, not buffered.

Not modelled: reverse-proxying non-shim paths to ``--host`` (they get 404 here), the HTML shim
injection (``--shim-websockets``), websocket-message header injection, session cookies, the
environment's HTTP proxy in the agent's dialer, and the hosted proxy's own request timeouts.

:class:`ShimProxy` is a websocket server on 127.0.0.1 playing the hosted proxy plus the shim's
JavaScript: each accepted websocket becomes ``open``/``data``/``poll``/``close`` requests to the
agent with ``X-Websocket-Shim-Version: 1`` and a browser's ``Content-Type: text/plain;charset=UTF-8``;
``open`` carries ``ws://<Host><path>`` and the frontend's upgrade headers (the agent strips the
handshake ones). One poll is outstanding at a time, re-issued when the previous one answers;
messages that arrive while a ``data`` request is in flight are sent together in the next one.
The 101 to the frontend is sent only once ``open`` succeeded; a failed ``open`` is answered to the
frontend with the agent's status and body (in a browser the shim would call ``onerror`` and stay
CONNECTING forever). Where the JavaScript is broken, this double does what the agent expects:

* **Binary, agent to client**: the JS runs ``msg[i] == atob(msg[i])`` (a comparison, not an
  assignment), so a browser gets the base64 text as the blob. Here the base64 is decoded.
* **Binary, client to agent**: the JS reads the blob with ``readAsText`` (UTF-8, lossy) and then
  ``btoa`` (throws on characters above U+00FF). Here the raw bytes are base64-encoded.
* **400 on poll**: the JS calls ``onerror`` and keeps polling forever, never ``onclose``. Here a poll
  that answers anything but 200 or 408 (or fails) closes the client's websocket with **1000** after
  every message already received was delivered - which is how a backend's close, whatever its
  code, reaches the frontend. A 400 on ``data`` stops forwarding; the poll's 400 then closes.
* **Close after send**: the JS's ``close()`` posts ``close`` at once, racing ``data`` requests still
  pending, so the last messages can be lost. Here ``close`` is posted after every earlier message
  was acknowledged. The frontend's close code is lost (the agent sends 1000): an abort (1011)
  reaches the backend as a clean close.
* **Dropped websocket**: a page that goes away posts nothing (the agent reaps the session after
  ``shim_timeout``); here a websocket that ends without a close frame is also turned into ``close``.
* **Unbounded queue**: the JS queues every message sent while a ``data`` request is in flight; here
  one ``data`` request carries at most :data:`MAX_BATCH_BYTES` of messages and the frontend's
  socket is not read meanwhile, so TCP backpressure holds the frontend back.
* Pings from the frontend are answered by the proxy itself (a browser cannot send pings, and the
  shim carries none): keepalives never cross the shim, each hop answers its own.

Every wait is bounded; everything listens and dials on 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import hashlib
import http.client
import json
import os
import posixpath
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

WEBSOCKET_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

#: gorilla's default write buffer: the agent's frames to the backend carry at most this much.
AGENT_FRAGMENT_SIZE: Final = 4096
#: Capacity of the agent's two per-session Go channels.
CHANNEL_CAPACITY: Final = 10
#: gorilla's DefaultDialer handshake timeout.
DIAL_TIMEOUT: Final = 45.0
#: The agent's ``--websocket-shim-timeout`` default.
DEFAULT_SHIM_TIMEOUT: Final = 3600.0
#: Headers the agent removes before dialing (Go canonical form).
STRIPPED_HEADERS: Final = frozenset(
    {"Upgrade", "Connection", "Sec-Websocket-Key", "Sec-Websocket-Version", "Sec-Websocket-Extensions"})
#: Headers Go's request writer never copies from the header map (Host and User-Agent are written first).
UNWRITTEN_HEADERS: Final = frozenset({"Host", "User-Agent", "Content-Length", "Transfer-Encoding", "Trailer"})
SHIM_VERSION_HEADER: Final = "X-Websocket-Shim-Version"
#: What a browser's XMLHttpRequest sends with a string body.
XHR_CONTENT_TYPE: Final = "text/plain;charset=UTF-8"
#: Most message payload one ``data`` request of :class:`ShimProxy` carries (see the module docstring).
MAX_BATCH_BYTES: Final = 1 << 20
#: The proxy's HTTP timeout for one shim request: above the agent's longest poll (20 s).
HTTP_TIMEOUT: Final = 30.0


def go_canonical(name: str) -> str:
    """Go's textproto.CanonicalMIMEHeaderKey for ordinary header names: ``x-foo-bar`` -> ``X-Foo-Bar``."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def go_quote(text: str) -> str:
    """Close enough to Go's ``%q`` for the session ids that appear in error texts."""
    return json.dumps(text)


# ---------------------------------------------------------------------------
# A Go channel


class _Closed:
    def __repr__(self) -> str:
        return "CLOSED"


CLOSED: Final = _Closed()


class Channel:
    """A bounded FIFO with Go channel semantics: after :meth:`close`, queued items are still received."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: collections.deque[Any] = collections.deque()
        self._closed = False
        self._cond = threading.Condition()

    def put(self, item: Any, abandon: threading.Event, timeout: float = 600.0) -> bool:
        """Block while full; False if ``abandon`` is set (or the time runs out) first, or if closed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._items) >= self.capacity and not self._closed:
                left = deadline - time.monotonic()
                if abandon.is_set() or left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
            if self._closed:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout: float) -> Any:
        """The next item; :data:`CLOSED` once closed and drained; None on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self._closed:
                    return CLOSED
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def get_nowait(self) -> Any:
        return self.get(0.0)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# ---------------------------------------------------------------------------
# Frames


def mask_bytes(payload: bytes, key: bytes) -> bytes:
    """XOR with the 4-byte masking key (its own inverse)."""
    if not payload:
        return b""
    stream = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(len(payload), "little")


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One masked (client-to-server) frame with the shortest length form."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size <= 125:
        header = struct.pack("!BB", first, 0x80 | size)
    elif size <= 0xFFFF:
        header = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, size)
    key = os.urandom(4)
    return header + key + mask_bytes(payload, key)


def gorilla_client_message(opcode: int, data: bytes) -> list[bytes]:
    """The frames gorilla's client ``WriteMessage`` produces: 4096-byte pieces, the last with FIN."""
    if len(data) <= AGENT_FRAGMENT_SIZE:
        return [client_frame(opcode, data)]
    pieces = [data[i:i + AGENT_FRAGMENT_SIZE] for i in range(0, len(data), AGENT_FRAGMENT_SIZE)]
    return [client_frame(opcode if i == 0 else OP_CONT, piece, fin=i == len(pieces) - 1)
            for i, piece in enumerate(pieces)]


class BackendClosed(Exception):
    """The backend's websocket ended: a close frame (``code``), EOF, or a protocol error."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.code = code


class DialFailure(Exception):
    """The agent could not open the backend websocket; the text is what Go would say."""


@dataclass
class Handshake:
    """The upgrade request the agent sent to the backend, and the status it got."""

    url: str
    request: bytes
    status: int = 0

    def headers(self) -> list[tuple[str, str]]:
        lines = self.request.decode("latin-1").split("\r\n")[1:]
        return [(name, value.strip()) for name, _, value in (line.partition(":") for line in lines if line)]

    def get_all(self, name: str) -> list[str]:
        return [value for key, value in self.headers() if key.lower() == name.lower()]


class BackendWebsocket:
    """The agent's gorilla client connection to the backend, on a blocking socket."""

    def __init__(self, sock: socket.socket, buffered: bytes) -> None:
        self.sock = sock
        self._buffer = bytearray(buffered)
        self._write_lock = threading.Lock()
        self.subprotocol = ""
        #: pings received from the backend (each answered with a pong)
        self.pings = 0

    @classmethod
    def dial(cls, url: str, headers: dict[str, list[str]], timeout: float, record: list[Handshake]) -> BackendWebsocket:
        """Dial ``url`` (``ws://host:port/path``) as gorilla's DefaultDialer does; raise DialFailure."""
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        fields: dict[str, list[str]] = {
            "Upgrade": ["websocket"], "Connection": ["Upgrade"],
            "Sec-WebSocket-Key": [key], "Sec-WebSocket-Version": ["13"],
        }
        host_header = parts.netloc
        for name, values in headers.items():
            if name == "Host":
                host_header = values[0] if values else host_header
            elif name == "Sec-Websocket-Protocol":
                fields["Sec-WebSocket-Protocol"] = values
            elif name not in UNWRITTEN_HEADERS or name == "User-Agent":
                fields[name] = values
        agent = fields.pop("User-Agent", ["Go-http-client/1.1"])[0]
        lines = [f"GET {target} HTTP/1.1", f"Host: {host_header}", f"User-Agent: {agent}"]
        lines += [f"{name}: {value}" for name in sorted(fields) for value in fields[name]]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        handshake = Handshake(url, request)
        record.append(handshake)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise DialFailure(f"dial tcp {host}:{port}: connect: {exc.strerror or exc}") from None
        try:
            sock.sendall(request)
            head, rest = _read_head(sock, time.monotonic() + timeout)
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            fields_in = [line.partition(":") for line in header_lines]
            got = {name.strip().lower(): value.strip() for name, _, value in fields_in}
            status = int(status_line.split(" ", 2)[1])
            handshake.status = status
            accept = base64.b64encode(hashlib.sha1(key.encode("ascii") + WEBSOCKET_GUID).digest()).decode()
            if (status != 101 or "websocket" not in got.get("upgrade", "").lower()
                    or "upgrade" not in got.get("connection", "").lower()
                    or got.get("sec-websocket-accept") != accept):
                raise DialFailure("websocket: bad handshake")
        except DialFailure:
            sock.close()
            raise
        except (OSError, ValueError, IndexError, EOFError) as exc:
            sock.close()
            raise DialFailure(f"websocket handshake: {exc}") from None
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = cls(sock, rest)
        conn.subprotocol = got.get("sec-websocket-protocol", "")
        return conn

    def write_message(self, opcode: int, data: bytes) -> None:
        """One message; other writers may slip control frames between its fragments, as in gorilla."""
        for frame in gorilla_client_message(opcode, data):
            with self._write_lock:
                self.sock.sendall(frame)

    def write_control(self, opcode: int, payload: bytes) -> None:
        with self._write_lock:
            self.sock.sendall(client_frame(opcode, payload))

    def _frame(self) -> tuple[bool, int, bytes]:
        while True:
            parsed = _parse_server_frame(self._buffer)
            if parsed is not None:
                fin, opcode, payload, end = parsed
                del self._buffer[:end]
                return fin, opcode, payload
            data = self.sock.recv(1 << 18)
            if not data:
                raise BackendClosed("unexpected EOF")
            self._buffer += data

    def read_message(self) -> tuple[int, bytes]:
        """gorilla's ReadMessage with the default handlers: pong pings, skip pongs, echo a close."""
        opcode = 0
        parts: list[bytes] = []
        while True:
            try:
                fin, frame_opcode, payload = self._frame()
            except OSError as exc:
                raise BackendClosed(str(exc)) from None
            if frame_opcode == OP_PING:
                self.pings += 1
                with contextlib.suppress(OSError):
                    self.write_control(OP_PONG, payload)
                continue
            if frame_opcode == OP_PONG:
                continue
            if frame_opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                with contextlib.suppress(OSError):
                    self.write_control(OP_CLOSE, b"" if code == 1005 else struct.pack("!H", code))
                raise BackendClosed(f"websocket: close {code}", code)
            if frame_opcode == OP_CONT:
                if not opcode:
                    raise BackendClosed("websocket: continuation after final message frame")
            elif frame_opcode in (OP_TEXT, OP_BINARY):
                if opcode:
                    raise BackendClosed("websocket: data before FIN")
                opcode = frame_opcode
            else:
                raise BackendClosed(f"websocket: unknown opcode {frame_opcode}")
            parts.append(payload)
            if fin:
                return opcode, b"".join(parts)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _read_head(sock: socket.socket, deadline: float, limit: int = 65536) -> tuple[bytes, bytes]:
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("i/o timeout")
        sock.settimeout(left)
        data = sock.recv(4096)
        if not data:
            raise EOFError("unexpected EOF")
        buffer += data
        if len(buffer) > limit:
            raise ValueError("response head too large")
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    return head, rest


def _parse_server_frame(buffer: bytearray) -> tuple[bool, int, bytes, int] | None:
    """(fin, opcode, payload, bytes used) of an unmasked frame at the start of ``buffer``, or None."""
    if len(buffer) < 2:
        return None
    first, second = buffer[0], buffer[1]
    size, pos = second & 0x7F, 2
    if size == 126:
        if len(buffer) < 4:
            return None
        size, pos = struct.unpack_from("!H", buffer, 2)[0], 4
    elif size == 127:
        if len(buffer) < 10:
            return None
        size, pos = struct.unpack_from("!Q", buffer, 2)[0], 10
    key = b""
    if second & 0x80:  # a masked server frame: gorilla refuses it; decode it anyway
        if len(buffer) < pos + 4:
            return None
        key, pos = bytes(buffer[pos:pos + 4]), pos + 4
    if len(buffer) < pos + size:
        return None
    payload = bytes(buffer[pos:pos + size])
    return bool(first & 0x80), first & 0x0F, mask_bytes(payload, key) if key else payload, pos + size


# ---------------------------------------------------------------------------
# The agent's session


@dataclass
class ShimMessage:
    opcode: int  # OP_TEXT or OP_BINARY
    data: bytes

    def serialize(self, version: int) -> str | list[str]:
        """How a poll answer carries it: text as a string, binary as ``[base64]`` (v0: ``[raw]``)."""
        if self.opcode == OP_TEXT:
            return self.data.decode("utf-8", "replace")
        if version == 0:
            return [self.data.decode("utf-8", "replace")]
        return [base64.b64encode(self.data).decode("ascii")]


_CLOSE_1000: Final = ShimMessage(OP_CLOSE, struct.pack("!H", 1000))


class ShimSession:
    """One shim session: a websocket to the backend, two Go channels and a reader and a writer thread."""

    def __init__(self, agent: ShimAgent, session_id: str, ws: BackendWebsocket) -> None:
        self.agent = agent
        self.id = session_id
        self.ws = ws
        self.version = 0
        self.server_messages = Channel(CHANNEL_CAPACITY)
        self.client_messages = Channel(CHANNEL_CAPACITY)
        self.done = threading.Event()
        self._activity_lock = threading.Lock()
        self._last_activity = time.monotonic()
        self._close_lock = threading.Lock()
        self._close_sent = False
        self._threads = [threading.Thread(target=self._read, daemon=True, name=f"shim-read-{session_id}"),
                         threading.Thread(target=self._write, daemon=True, name=f"shim-write-{session_id}")]
        for thread in self._threads:
            thread.start()

    def touch(self) -> None:
        with self._activity_lock:
            self._last_activity = time.monotonic()

    def idle_for(self) -> float:
        with self._activity_lock:
            return time.monotonic() - self._last_activity

    def _cancel(self) -> None:
        if not self.done.is_set():
            self.done.set()
            self.ws.close()

    def _read(self) -> None:
        try:
            while not self.done.is_set():
                try:
                    opcode, data = self.ws.read_message()
                except BackendClosed as exc:
                    self.agent.report_error(f"failed to read a websocket message from the server: {exc}")
                    return
                if not self.server_messages.put(ShimMessage(opcode, data), self.done):
                    return
        finally:
            self.server_messages.close()
            self._cancel()

    def _write(self) -> None:
        try:
            deadline = time.monotonic() + self.agent.session_lifetime
            while not self.done.is_set() and time.monotonic() < deadline:
                item = self.client_messages.get(0.2)
                if item is None:
                    continue
                if item is CLOSED:
                    self.agent.report_error(None)
                    return
                if item.opcode == -1:  # a nil message (a one-element list that is not a string): skipped
                    continue
                try:
                    if item.opcode == OP_CLOSE:
                        self.ws.write_control(OP_CLOSE, item.data)
                    else:
                        self.ws.write_message(item.opcode, item.data)
                except OSError as exc:
                    self.agent.report_error(f"failed to forward websocket data to the server: {exc}")
                    return
        finally:
            self._cancel()

    def send_client_message(self, msg: Any) -> str | None:
        """Queue one ``msg`` of a data request for the backend; an error text, or None."""
        self.touch()
        if isinstance(msg, str):
            message = ShimMessage(OP_TEXT, msg.encode("utf-8", "replace"))
        elif isinstance(msg, list) and len(msg) == 1:
            if not isinstance(msg[0], str):
                message = ShimMessage(-1, b"")
            elif self.version == 0:
                message = ShimMessage(OP_BINARY, msg[0].encode("utf-8", "replace"))
            else:
                try:
                    message = ShimMessage(OP_BINARY, base64.b64decode(msg[0], validate=True))
                except (binascii.Error, ValueError):
                    return f"unexpected websocket-shim message format: {msg!r}"
        else:
            return f"unexpected websocket-shim message type: {msg!r}"
        if self.done.is_set():
            return "attempt to send a client message on a closed websocket connection"
        if not self.client_messages.put(message, self.done):
            # Go blocks here for ever once the writer is gone; the double gives up instead.
            return "attempt to send a client message on a closed websocket connection"
        return None

    def read_server_messages(self, timeout: float) -> list[ShimMessage] | None:
        """The agent's ReadServerMessages: messages, None on timeout; raise EOFError once closed."""
        self.touch()
        try:
            first = self.server_messages.get(timeout)
            if first is None:
                return None
            if first is CLOSED:
                raise EOFError("attempt to read a server message from a closed websocket connection")
            messages = [first]
            while (item := self.server_messages.get_nowait()) is not None and item is not CLOSED:
                messages.append(item)
            return messages
        finally:
            self.touch()

    def close(self) -> None:
        """The agent's Connection.Close: queue close 1000, then close the channel (the writer ends)."""
        with self._close_lock:
            if self._close_sent:
                return
            self._close_sent = True
        self.client_messages.put(_CLOSE_1000, self.done, timeout=5.0)
        self.client_messages.close()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))


# ---------------------------------------------------------------------------
# The agent's HTTP side


class _AgentHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _AgentHTTPServer
    timeout = 120.0

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass

    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.agent.track(self.connection, True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.agent.track(self.connection, False)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _answer(self, status: int, body: bytes = b"", *, error: bool = False) -> None:
        self.send_response(status)
        if body or status != 408:
            self.send_header("Content-Type", "text/plain; charset=utf-8")
        if error:
            self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.server.agent.count(status)

    def _error(self, status: int, text: str) -> None:
        self._answer(status, (text + "\n").encode(), error=True)

    def do_POST(self) -> None:
        agent = self.server.agent
        path = urlsplit(self.path).path
        body = self._body()
        endpoint = {agent.endpoint(name): name for name in ("open", "data", "poll", "close")}.get(path)
        if endpoint is None:
            self._error(404, "404 page not found")
            return
        getattr(self, f"_{endpoint}")(body)

    do_GET = do_PUT = do_POST  # noqa: N815 - Go's mux takes any method

    def _forwarded_headers(self) -> dict[str, list[str]]:
        headers: dict[str, list[str]] = {}
        for name, value in self.headers.items():
            canonical = go_canonical(name)
            if canonical in ("Host", "Transfer-Encoding"):  # Go's server moves these out of the header map
                continue
            headers.setdefault(canonical, []).append(value)
        if self.server.agent.rewrite_host and self.headers.get("Host"):
            headers["Host"] = [self.headers["Host"]]
        return {name: values for name, values in headers.items() if name not in STRIPPED_HEADERS}

    def _open(self, body: bytes) -> None:
        agent = self.server.agent
        try:
            parts = urlsplit(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            self._error(400, f"malformed shim open request: {exc}")
            return
        session_id = agent.next_session_id()
        url = f"ws://{agent.host}{parts.path}" + (f"?{parts.query}" if parts.query else "")
        try:
            ws = BackendWebsocket.dial(url, self._forwarded_headers(), agent.dial_timeout, agent.handshakes)
        except DialFailure as exc:
            agent.log(f"Failed to dial the websocket server {go_quote(url)}: {exc}")
            self._error(500, f"internal error opening a shim connection: {exc}")
            return
        session = ShimSession(agent, session_id, ws)
        version = self.headers.get(SHIM_VERSION_HEADER)
        if version and re.fullmatch(r"[+-]?[0-9]+", version.strip()):
            session.version = int(version)
        agent.add(session)
        agent.log(f"Websocket connection to the server {go_quote(url)} established for session: {session_id}")
        answer: dict[str, Any] = {"id": session_id, "msg": url}
        if session.version:
            answer["v"] = session.version
        if ws.subprotocol:
            answer["s"] = ws.subprotocol
        self._answer(200, json.dumps(answer, separators=(",", ":")).encode())

    def _json(self, body: bytes) -> Any:
        try:
            return json.loads(body)
        except ValueError as exc:
            self._error(400, f"error parsing a shim request: {exc}")
            return _INVALID

    def _session(self, session_id: Any) -> ShimSession | None:
        session = self.server.agent.get(session_id if isinstance(session_id, str) else "")
        if session is None:
            self._error(400, f"unknown shim session ID: {go_quote(str(session_id or ''))}")
        return session

    def _data(self, body: bytes) -> None:
        msgs = self._json(body)
        if msgs is _INVALID:
            return
        if msgs is None:
            msgs = []
        if not isinstance(msgs, list) or not all(isinstance(msg, dict) for msg in msgs):
            self._error(400, "error parsing a shim request: json: cannot unmarshal into []sessionMessage")
            return
        for msg in msgs:
            session = self._session(msg.get("id"))
            if session is None:
                return
            failure = session.send_client_message(msg.get("msg"))
            if failure is not None:
                self.server.agent.log(failure)
                text = f"attempt to send data on a closed session: {go_quote(session.id)}"
                if (reason := self.server.agent.first_error) is not None:
                    text += f", closure reason: {go_quote(reason)}"
                self._error(400, text)
                return
        self._answer(200, b"ok")

    def _poll(self, body: bytes) -> None:
        agent = self.server.agent
        msg = self._json(body)
        if msg is _INVALID:
            return
        session = self._session(msg.get("id") if isinstance(msg, dict) else None)
        if session is None:
            return
        try:
            messages = session.read_server_messages(agent.poll_timeout)
        except EOFError:
            text = f"attempt to read data from a closed session: {go_quote(session.id)}"
            if (reason := agent.first_error) is not None:
                text += f", closure reason: {go_quote(reason)}"
            self._error(400, text)
            agent.remove(session.id)
            return
        if messages is None:
            self._answer(408)
            return
        payload = [message.serialize(session.version) for message in messages]
        self._answer(200, json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))

    def _close(self, body: bytes) -> None:
        msg = self._json(body)
        if msg is _INVALID:
            return
        session = self._session(msg.get("id") if isinstance(msg, dict) else None)
        if session is None:
            return
        self.server.agent.remove(session.id)
        session.close()
        self._answer(200, b"ok")


_INVALID: Final = object()


class _AgentHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    agent: ShimAgent


class ShimAgent:
    """The agent's websocket shim endpoints on 127.0.0.1 (see the module docstring).

    ``host`` is the agent's ``--host`` (the backend's listen address), ``shim_path`` its
    ``--shim-path`` and ``shim_timeout`` its ``--websocket-shim-timeout`` (polls wait half of it,
    at most 20 s). Start with :meth:`start` (or ``with``); :meth:`close` ends every session.
    """

    def __init__(self, host: str, shim_path: str = "websocket-shim", *, shim_timeout: float = DEFAULT_SHIM_TIMEOUT,
                 rewrite_host: bool = False, dial_timeout: float = DIAL_TIMEOUT,
                 session_lifetime: float = 600.0) -> None:
        self.host = host
        self.shim_path = posixpath.normpath("/" + shim_path.strip("/"))
        self.shim_timeout = shim_timeout
        self.poll_timeout = min(20.0, shim_timeout / 2)
        self.rewrite_host = rewrite_host
        self.dial_timeout = dial_timeout
        self.session_lifetime = session_lifetime
        #: Every upgrade request sent to the backend, in order (with the status it got).
        self.handshakes: list[Handshake] = []
        #: The agent's log lines.
        self.lines: list[str] = []
        #: Answers given, by status code.
        self.statuses: collections.Counter[int] = collections.Counter()
        #: Sessions ever opened, and closed by the inactivity reaper.
        self.opened = 0
        self.reaped = 0
        self._sessions: dict[str, ShimSession] = {}
        self._all_sessions: list[ShimSession] = []
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._counter = 0
        self._first_error: str | None = None
        self._error_reported = False
        self._stop = threading.Event()
        self._server = _AgentHTTPServer(("127.0.0.1", 0), _AgentHandler)
        self._server.agent = self
        self.port = int(self._server.server_address[1])
        self._threads = [threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                          daemon=True, name="shim-agent"),
                         threading.Thread(target=self._reap, daemon=True, name="shim-reaper")]

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def endpoint(self, name: str) -> str:
        return posixpath.join(self.shim_path, name)

    def start(self) -> ShimAgent:
        for thread in self._threads:
            thread.start()
        return self

    def __enter__(self) -> ShimAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)

    def count(self, status: int) -> None:
        with self._lock:
            self.statuses[status] += 1

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._lock:
            (self._connections.add if alive else self._connections.discard)(conn)

    def report_error(self, error: str | None) -> None:
        """Go's connectionErrorHandler: one per agent, keeps only the very first report."""
        with self._lock:
            if self._error_reported:
                return
            self._error_reported = True
            self._first_error = error
        if error is not None:
            self.log(f"Websocket failure: {error}")

    @property
    def first_error(self) -> str | None:
        with self._lock:
            return self._first_error

    def next_session_id(self) -> str:
        with self._lock:
            self._counter += 1
            return str(self._counter)

    def add(self, session: ShimSession) -> None:
        with self._lock:
            self._sessions[session.id] = session
            self._all_sessions.append(session)
            self.opened += 1

    def get(self, session_id: str) -> ShimSession | None:
        with self._lock:
            return self._sessions.get(session_id)

    def remove(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def pings(self) -> int:
        """Pings the backend sent on every session so far (the agent answers them itself)."""
        with self._lock:
            return sum(session.ws.pings for session in self._all_sessions)

    def live_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _reap(self) -> None:
        interval = min(self.shim_timeout, 30.0)
        while not self._stop.wait(interval):
            with self._lock:
                sessions = list(self._sessions.values())
            for session in sessions:
                if session.idle_for() > self.shim_timeout:
                    self.log(f"Closing inactive websocket shim session {go_quote(session.id)} after timeout")
                    session.close()
                    self.remove(session.id)
                    with self._lock:
                        self.reaped += 1

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            sessions, connections = list(self._all_sessions), list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for session in sessions:
            session.close()
            session._cancel()
        for session in sessions:
            session.join(2.0)
        for thread in self._threads:
            thread.join(2.0)


# ---------------------------------------------------------------------------
# The hosted proxy and the JavaScript client


class ShimHTTP:
    """One keep-alive HTTP connection from the proxy to the agent (a browser's XHR connection)."""

    def __init__(self, address: tuple[str, int], shim_path: str) -> None:
        self.address = address
        self.shim_path = shim_path
        self._conn: http.client.HTTPConnection | None = None

    def post(self, action: str, body: str, headers: Iterable[tuple[str, str]] = ()) -> tuple[int, bytes]:
        """POST ``<shim>/<action>``; (status, body). Raises OSError/HTTPException on transport failure."""
        if self._conn is None:
            self._conn = http.client.HTTPConnection(*self.address, timeout=HTTP_TIMEOUT)
        conn = self._conn
        try:
            conn.putrequest("POST", posixpath.join(self.shim_path, action), skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            data = body.encode("utf-8")
            conn.putheader(SHIM_VERSION_HEADER, "1")
            conn.putheader("Content-Type", XHR_CONTENT_TYPE)
            conn.putheader("Content-Length", str(len(data)))
            conn.endheaders(data)
            response = conn.getresponse()
            return response.status, response.read()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


#: Upgrade headers the proxy does not put on the open request (http.client writes its own).
_NOT_FORWARDED: Final = frozenset({"host", "content-length", "transfer-encoding"})


@dataclass
class ProxySession:
    """One websocket accepted by :class:`ShimProxy`; its outcome, for tests to inspect."""

    path: str
    upgrade_headers: list[tuple[str, str]]
    open_status: int = 0
    session_id: str = ""
    version: int = 0
    #: the close code the frontend sent (None: it sent none)
    client_close_code: int | None = None
    #: why the session ended, in a few words
    ended: str = ""
    data_requests: int = 0
    #: pings received from the frontend (answered by the proxy itself)
    pings: int = 0
    polls: collections.Counter[int] = field(default_factory=collections.Counter)


class _ProxyConnection:
    """The two halves of one proxied websocket: the reading loop (this thread) and the poller."""

    def __init__(self, proxy: ShimProxy, sock: socket.socket) -> None:
        self.proxy = proxy
        self.sock = sock
        self.ws = WSConnection(ConnectionType.SERVER)
        self.lock = threading.Lock()  # serialises wsproto state and socket writes
        self.closing = threading.Event()  # no more messages to the frontend
        self.record: ProxySession | None = None
        self.upstream_dead = False

    # -- writing to the frontend -------------------------------------------

    def send(self, event: Any) -> bool:
        with self.lock:
            try:
                data = self.ws.send(event)
                self.sock.sendall(data)
                return True
            except Exception:
                return False

    def close_frontend(self, reason: str) -> None:
        """Close the frontend's websocket with 1000, once."""
        with self.lock:
            if self.closing.is_set():
                return
            self.closing.set()
        if self.record is not None and not self.record.ended:
            self.record.ended = reason
        self.send(CloseConnection(code=1000))

    # -- the session ------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.closing.set()
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()

    def _handshake(self) -> Request | None:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            data = self.sock.recv(65536)
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                if isinstance(event, Request):
                    return event
                return None
            if not data:
                return None
        return None

    def _run(self) -> None:
        try:
            request = self._handshake()
        except (OSError, Exception):
            return
        if request is None:
            return
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in request.extra_headers]
        record = ProxySession(request.target, headers)
        self.record = record
        self.proxy.add(record)
        http_up = ShimHTTP(self.proxy.agent_address, self.proxy.shim_path)
        forwarded = [(name, value) for name, value in headers if name.lower() not in _NOT_FORWARDED]
        try:
            status, body = http_up.post("open", f"ws://{request.host}{request.target}", forwarded)
        except (OSError, http.client.HTTPException) as exc:
            status, body = 502, f"agent unreachable: {exc}\n".encode()
        record.open_status = status
        if status != 200:
            record.ended = f"open answered {status}"
            self.send(RejectConnection(status_code=status, has_body=True,
                                       headers=[(b"content-type", b"text/plain; charset=utf-8"),
                                                (b"content-length", str(len(body)).encode())]))
            self.send(RejectData(data=body))
            http_up.close()
            return
        try:
            answer = json.loads(body)
            record.session_id = str(answer["id"])
            record.version = int(answer.get("v", 0))
        except (ValueError, KeyError, TypeError):
            record.ended = "open answered nonsense"
            self.send(RejectConnection(status_code=502))
            http_up.close()
            return
        offered = request.subprotocols
        subprotocol = answer.get("s") if answer.get("s") in offered else None
        if not self.send(AcceptConnection(subprotocol=subprotocol)):
            http_up.close()
            return
        poller = threading.Thread(target=self._poll, args=(record,), daemon=True, name=f"shim-poll-{record.session_id}")
        poller.start()
        try:
            self._pump_up(record, http_up)
        finally:
            self.closing.set()
            http_up.close()
            poller.join(HTTP_TIMEOUT + 5)

    def _pump_up(self, record: ProxySession, http_up: ShimHTTP) -> None:
        """Frontend -> agent: read frames, batch whole messages into data requests, handle close."""
        deadline = time.monotonic() + self.proxy.session_lifetime
        batch: list[dict[str, Any]] = []
        batch_bytes = 0
        partial: list[str | bytes] = []
        close_wait: float | None = None
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            if close_wait is None and self.closing.is_set():
                close_wait = time.monotonic() + 5.0  # we closed: wait this long for the frontend's reply
            if close_wait is not None and time.monotonic() > close_wait:
                return
            try:
                data = self.sock.recv(1 << 18)
            except TimeoutError:
                data = None
            except OSError:
                data = b""
            if data is None:
                continue
            with self.lock:
                self.ws.receive_data(data or None)
                events = list(self.ws.events())
            for event in events:
                if isinstance(event, (TextMessage, BytesMessage)):
                    partial.append(event.data if isinstance(event.data, str) else bytes(event.data))
                    if event.message_finished:
                        msg = self._shim_message(partial, record.version)
                        partial = []
                        batch.append({"id": record.session_id, "msg": msg})
                        batch_bytes += len(msg) if isinstance(msg, str) else len(msg[0])
                elif isinstance(event, Ping):
                    record.pings += 1
                    self.send(event.response())
                elif isinstance(event, CloseConnection):
                    record.client_close_code = event.code
                    self._flush(record, http_up, batch)
                    batch, batch_bytes = [], 0
                    if not self.closing.is_set():
                        self.closing.set()
                        record.ended = f"frontend closed with {event.code}"
                        # Posted even after a refused data request, as the JS's close() does: the
                        # session may still be in the agent (its backend closed, no poll saw it yet).
                        self._post_close(record, http_up)
                        self.send(event.response())
                    return
            if not data:
                # dropped without a close frame: a browser would post nothing; we post close
                self._flush(record, http_up, batch)
                with self.lock:
                    self.closing.set()
                if not record.ended:
                    record.ended = "frontend dropped"
                if not self.upstream_dead:
                    self._post_close(record, http_up)
                return
            more, _, _ = select.select([self.sock], [], [], 0)
            if batch and (not more or batch_bytes >= MAX_BATCH_BYTES):
                self._flush(record, http_up, batch)
                batch, batch_bytes = [], 0

    @staticmethod
    def _shim_message(parts: list[str | bytes], version: int) -> str | list[str]:
        if parts and isinstance(parts[0], str):
            return "".join(part for part in parts if isinstance(part, str))
        data = b"".join(part for part in parts if isinstance(part, bytes))
        if version == 0:
            return [data.decode("utf-8", "replace")]
        return [base64.b64encode(data).decode("ascii")]

    def _flush(self, record: ProxySession, http_up: ShimHTTP, batch: list[dict[str, Any]]) -> None:
        if not batch or self.upstream_dead:
            return
        record.data_requests += 1
        try:
            status, _ = http_up.post("data", json.dumps(batch, separators=(",", ":"), ensure_ascii=False))
        except (OSError, http.client.HTTPException):
            status = 0
        if status != 200:
            # The session is gone or broken: drop what follows; the poll's 400 closes the frontend.
            self.upstream_dead = True

    def _post_close(self, record: ProxySession, http_up: ShimHTTP) -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            http_up.post("close", json.dumps({"id": record.session_id}))

    def _poll(self, record: ProxySession) -> None:
        """Agent -> frontend: one poll at a time; 200 delivers, 408 polls again, anything else closes."""
        http_down = ShimHTTP(self.proxy.agent_address, self.proxy.shim_path)
        deadline = time.monotonic() + self.proxy.session_lifetime
        body = json.dumps({"id": record.session_id})
        try:
            while not self.closing.is_set() and time.monotonic() < deadline:
                try:
                    status, answer = http_down.post("poll", body)
                except (OSError, http.client.HTTPException):
                    status, answer = 0, b""
                record.polls[status] += 1
                if status == 408:
                    continue
                if status != 200:
                    self.upstream_dead = True
                    self.close_frontend(f"poll answered {status}")
                    return
                try:
                    messages = json.loads(answer)
                except ValueError:
                    self.close_frontend("poll answered nonsense")
                    return
                for msg in messages if isinstance(messages, list) else []:
                    if self.closing.is_set():
                        return
                    if isinstance(msg, str):
                        self.send(TextMessage(data=msg))
                    elif isinstance(msg, list):
                        raw = "".join(str(part) for part in msg)
                        try:
                            data = raw.encode("utf-8") if record.version == 0 else base64.b64decode(raw)
                        except (binascii.Error, ValueError):
                            self.close_frontend("poll answered bad base64")
                            return
                        self.send(BytesMessage(data=data))
        finally:
            http_down.close()


class ShimProxy:
    """A websocket server on 127.0.0.1 that turns each websocket into shim requests to ``agent``.

    Point the frontend's ``backend`` at :attr:`url`. :attr:`sessions` records every websocket
    accepted, in order.
    """

    def __init__(self, agent_address: tuple[str, int], shim_path: str = "websocket-shim", *,
                 session_lifetime: float = 600.0) -> None:
        self.agent_address = agent_address
        self.shim_path = posixpath.normpath("/" + shim_path.strip("/"))
        self.session_lifetime = session_lifetime
        self.sessions: list[ProxySession] = []
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = int(self.sock.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept, daemon=True, name="shim-proxy")

    @classmethod
    def for_agent(cls, agent: ShimAgent, **kwargs: Any) -> ShimProxy:
        return cls(agent.address, agent.shim_path, **kwargs)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def start(self) -> ShimProxy:
        self._acceptor.start()
        return self

    def __enter__(self) -> ShimProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, record: ProxySession) -> None:
        with self._lock:
            self.sessions.append(record)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._sockets.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            _ProxyConnection(self, conn).run()
        finally:
            with self._lock:
                self._sockets.discard(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._acceptor.join(2.0)
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for conn in sockets:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 5.0
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))

