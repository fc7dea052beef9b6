"""Negotiated binary messages between two tcpbridge ends (bridge.protocol's module docstring).

Both daemons run as real processes. The other end is a raw websocket peer from
:mod:`tests.gopeer` that speaks the negotiation by hand, or the fake Go peers
(which must never switch), or our own other daemon seen through a recording
relay that checks what crosses the wire.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gopeer import (
    OP_BINARY,
    OP_CLOSE,
    OP_TEXT,
    Frame,
    GoBackend,
    GoWebsocket,
    accept_token,
    check_go_client_handshake,
    go_frontend_request,
    parse_frame,
    read_http_head,
)
from tests.helpers import (
    TcpServer,
    backend,
    echo_handler,
    free_port,
    frontend,
    pattern,
    recv_all,
    recv_exactly,
    send_then_shutdown,
    sha256,
    started,
    wait_until,
    write_yaml,
)

OFFER = "X-Tcpbridge-Offer: binary-frames"


# ---------------------------------------------------------------------------
# Harness


@contextlib.contextmanager
def echo_backend(tmp_path: Path, **options: object) -> Iterator[int]:
    """Our backend with one listener whose default route is an echo server; yields its port."""
    echo = TcpServer(echo_handler)
    port = free_port()
    config = write_yaml(tmp_path, "backend.yaml", {
        "drain_timeout": 1,
        "listeners": [{"name": "main", "listen": f"127.0.0.1:{port}", "routes": {"default": echo.address},
                       **options}],
    })
    try:
        with started(backend(config)):
            yield port
    finally:
        echo.close()


@contextlib.contextmanager
def our_frontend(tmp_path: Path, backend_url: str, **options: object) -> Iterator[int]:
    port = free_port()
    config = write_yaml(tmp_path, "frontend.yaml", {
        "drain_timeout": 1,
        "tunnels": [{"name": "t", "listen": f"127.0.0.1:{port}", "backend": backend_url, **options}],
    })
    with started(frontend(config)):
        yield port


def dial_backend(port: int, *extra_headers: str) -> GoWebsocket:
    """A raw websocket client on our backend, sending ``extra_headers`` with the upgrade."""
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    request = go_frontend_request(f"127.0.0.1:{port}", key)
    request = request[:-2] + "".join(f"{line}\r\n" for line in extra_headers).encode() + b"\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(request)
    buffer = bytearray()
    head = read_http_head(sock, buffer)
    check_go_client_handshake(head, key)
    ws = GoWebsocket(sock, is_server=False, buffered=bytes(buffer))
    ws.handshake = head
    return ws


def next_data_frame(ws: GoWebsocket) -> Frame:
    while True:
        frame = ws.recv_frame()
        if frame.opcode not in (0x9, 0xA):  # pings and pongs are not the subject here
            return frame


def close_code(frame: Frame) -> int:
    assert frame.opcode == OP_CLOSE, frame.row
    return int(struct.unpack("!H", frame.payload[:2])[0])


# ---------------------------------------------------------------------------
# Our backend against a raw client


def test_backend_consents_then_switches_at_the_markers(tmp_path: Path) -> None:
    with echo_backend(tmp_path) as port:
        ws = dial_backend(port, OFFER)
        assert ws.handshake is not None
        assert ws.handshake.get_all("X-Tcpbridge-Frames") == ["binary"]
        ws.write(b"before")  # hex is still what both sides speak until a marker
        frame = next_data_frame(ws)
        assert (frame.opcode, frame.payload) == (OP_TEXT, b"before".hex().encode())
        ws.send_frame(OP_BINARY, b"")  # our switch marker
        marker = next_data_frame(ws)
        assert (marker.opcode, marker.payload, marker.fin) == (OP_BINARY, b"", True)
        data = pattern(70000)
        ws.send_frame(OP_BINARY, data)
        echoed = bytearray()
        while len(echoed) < len(data):
            frame = next_data_frame(ws)
            assert frame.opcode == OP_BINARY and frame.mask is None, frame.row
            echoed += frame.payload
        assert bytes(echoed) == data
        ws.send_frame(OP_BINARY, b"")  # end of stream, binary style
        eos = next_data_frame(ws)  # the echo server half-closes back
        assert (eos.opcode, eos.payload) == (OP_BINARY, b"")
        assert close_code(next_data_frame(ws)) == 1000
        ws.drop()


def test_backend_refuses_text_after_the_switch(tmp_path: Path) -> None:
    with echo_backend(tmp_path) as port:
        ws = dial_backend(port, OFFER)
        ws.send_frame(OP_BINARY, b"")
        assert next_data_frame(ws).opcode == OP_BINARY
        ws.write(b"hex after the switch")
        assert close_code(next_data_frame(ws)) == 1003
        ws.drop()


def test_backend_refuses_binary_data_before_the_marker(tmp_path: Path) -> None:
    with echo_backend(tmp_path) as port:
        ws = dial_backend(port, OFFER)
        ws.send_frame(OP_BINARY, b"data, no marker first")
        assert close_code(next_data_frame(ws)) == 1003
        ws.drop()


def test_backend_accepts_a_fragmented_empty_marker(tmp_path: Path) -> None:
    with echo_backend(tmp_path) as port:
        ws = dial_backend(port, OFFER)
        ws.send_frame(OP_BINARY, b"", fin=False)
        ws.send_frame(0x0, b"", fin=True)
        assert next_data_frame(ws).opcode == OP_BINARY
        ws.send_frame(OP_BINARY, b"x")
        frame = next_data_frame(ws)
        assert (frame.opcode, frame.payload) == (OP_BINARY, b"x")
        ws.drop()


@pytest.mark.parametrize("case", ["no offer", "frames: text"])
def test_backend_without_consent_stays_hex_and_refuses_a_marker(tmp_path: Path, case: str) -> None:
    options = {"frames": "text"} if case == "frames: text" else {}
    with echo_backend(tmp_path, **options) as port:
        ws = dial_backend(port, *([OFFER] if case == "frames: text" else []))
        assert ws.handshake is not None and not ws.handshake.has("X-Tcpbridge-Frames")
        ws.write(b"hello")
        frame = next_data_frame(ws)
        assert (frame.opcode, frame.payload) == (OP_TEXT, b"hello".hex().encode())
        ws.send_frame(OP_BINARY, b"")
        assert close_code(next_data_frame(ws)) == 1003
        ws.drop()


# ---------------------------------------------------------------------------
# Our frontend against a raw backend that consents


class ConsentingBackend:
    """Answers one upgrade with a 101 that consents to binary messages (and echoes nothing)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.ws: GoWebsocket | None = None
        self.request_headers: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        buffer = bytearray()
        head = read_http_head(conn, buffer)
        self.request_headers = head.get_all("X-Tcpbridge-Offer")
        key = head.get("Sec-WebSocket-Key") or ""
        conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Accept: {accept_token(key)}\r\nX-Tcpbridge-Frames: binary\r\n\r\n").encode())
        self.ws = GoWebsocket(conn, is_server=True, buffered=bytes(buffer))
        self._ready.set()

    def accept(self) -> GoWebsocket:
        assert self._ready.wait(5), "the frontend did not connect"
        assert self.ws is not None
        return self.ws

    def close(self) -> None:
        self.server.close()
        if self.ws is not None:
            self.ws.drop()


def test_frontend_switches_first_thing_and_reads_hex_until_the_backends_marker(tmp_path: Path) -> None:
    peer = ConsentingBackend()
    try:
        with our_frontend(tmp_path, f"ws://127.0.0.1:{peer.port}") as port, \
                socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(b"up")
            ws = peer.accept()
            assert peer.request_headers == ["binary-frames"]
            marker = next_data_frame(ws)
            assert (marker.opcode, marker.payload, marker.fin) == (OP_BINARY, b"", True)
            assert marker.mask is not None
            frame = next_data_frame(ws)
            assert (frame.opcode, frame.payload) == (OP_BINARY, b"up")
            ws.write(b"hex first")  # before our marker the frontend must still read hex
            assert recv_exactly(client, 9, timeout=5) == b"hex first"
            ws.send_frame(OP_BINARY, b"")
            ws.send_frame(OP_BINARY, b"\x00\xffraw")
            assert recv_exactly(client, 5, timeout=5) == b"\x00\xffraw"
            ws.write(b"text after the switch")  # a protocol error now
            assert close_code(next_data_frame(ws)) == 1003
            with pytest.raises(ConnectionResetError):
                recv_all(client, timeout=5)
    finally:
        peer.close()


def test_frontend_takes_an_echoed_offer_for_what_it_is_not_consent(tmp_path: Path) -> None:
    """The Go backend echoes X-Tcpbridge-Offer into its 101: the frontend must stay hex."""
    with GoBackend() as go, our_frontend(tmp_path, f"ws://127.0.0.1:{go.port}") as port, \
            socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"go")
        conn = go.accept()
        assert conn.request.get_all("X-Tcpbridge-Offer") == ["binary-frames"]
        assert conn.ws is not None
        assert conn.ws.read_exactly(2) == b"go"
        data_frames = [f for f in conn.ws.received if f.opcode in (OP_TEXT, OP_BINARY, 0x0)]
        assert data_frames and all(f.opcode == OP_TEXT and f.payload for f in data_frames)
        conn.ws.drop()


def test_frontend_frames_text_sends_no_offer(tmp_path: Path) -> None:
    with GoBackend() as go, our_frontend(tmp_path, f"ws://127.0.0.1:{go.port}", frames="text") as port, \
            socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"x")
        conn = go.accept()
        assert not conn.request.has("X-Tcpbridge-Offer")
        assert conn.ws is not None
        conn.ws.drop()


# ---------------------------------------------------------------------------
# Our frontend and our backend, through a relay that records the wire


class RecordingRelay:
    """A TCP relay on loopback that keeps every byte of one connection, each way."""

    def __init__(self, upstream_port: int) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.upstream_port = upstream_port
        self.up = bytearray()
        self.down = bytearray()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.server.accept()
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._copy, args=(conn, upstream, self.up), daemon=True).start()
            self._copy(upstream, conn, self.down)

    @staticmethod
    def _copy(source: socket.socket, sink: socket.socket, record: bytearray) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                record += data
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)

    def frames(self, stream: bytearray) -> tuple[bytes, list[Frame]]:
        """The HTTP head and the complete frames recorded in ``stream``."""
        raw = bytes(stream)
        end = raw.index(b"\r\n\r\n") + 4
        frames, offset = [], end
        while (parsed := parse_frame(raw, offset)) is not None:
            frame, offset = parsed
            frames.append(frame)
        return raw[:end], frames

    def close(self) -> None:
        self.server.close()


def is_control(frame: Frame) -> bool:
    """A resume control message (bridge.resume): TEXT in either mode, never data."""
    return frame.opcode == OP_TEXT and frame.payload.startswith(b"tcpbridge:")


@pytest.mark.parametrize("frames", ["auto", "text"])
def test_two_tcpbridge_ends_go_binary_unless_told_not_to(tmp_path: Path, frames: str) -> None:
    up, down = pattern(3 * 1024 * 1024 + 7), pattern(2 * 1024 * 1024 + 1)[::-1]
    target_got = bytearray()

    def target_handler(conn: socket.socket) -> None:
        conn.sendall(down)  # the target speaks first, before the switch reached the backend
        while data := conn.recv(1 << 16):
            target_got.extend(data)
        conn.shutdown(socket.SHUT_WR)

    target = TcpServer(target_handler)
    port = free_port()
    config = write_yaml(tmp_path, "backend.yaml", {"drain_timeout": 1, "listeners": [
        {"name": "main", "listen": f"127.0.0.1:{port}", "routes": {"default": target.address}, "resume": True}]})
    relay = RecordingRelay(port)
    try:
        with started(backend(config)), \
                our_frontend(tmp_path, f"ws://127.0.0.1:{relay.port}", frames=frames, resume=True) as front, \
                socket.create_connection(("127.0.0.1", front), timeout=10) as client:
            send_then_shutdown(client, up)
            assert sha256(recv_all(client, timeout=30)) == sha256(down)
            assert wait_until(lambda: len(target_got) == len(up), 10)
            assert sha256(bytes(target_got)) == sha256(up)
        request, sent = relay.frames(relay.up)
        response, received = relay.frames(relay.down)
        sent_data = [f for f in sent if f.opcode in (OP_TEXT, OP_BINARY) and not is_control(f)]
        received_data = [f for f in received if f.opcode in (OP_TEXT, OP_BINARY) and not is_control(f)]
        # Resume is negotiated in either mode: the backend's consent comes first, then acks both ways.
        assert is_control(received[0]) and received[0].payload.startswith(b"tcpbridge:resume ")
        controls = [f.payload for f in sent if is_control(f)]
        acks = [payload for payload in controls if not payload.startswith(b"tcpbridge:closing ")]
        assert acks and all(ack.startswith(b"tcpbridge:ack ") for ack in acks)
        # Each close frame of a resumable tunnel is announced right before it (the shim loses codes).
        for frames_seen in (sent, received):
            closes = [i for i, f in enumerate(frames_seen) if f.opcode == OP_CLOSE]
            assert closes and all(frames_seen[i - 1].payload.startswith(b"tcpbridge:closing ") for i in closes)
        if frames == "auto":
            assert b"X-Tcpbridge-Offer: binary-frames\r\n" in request
            assert b"X-Tcpbridge-Frames: binary\r\n" in response
            assert (sent_data[0].opcode, sent_data[0].payload) == (OP_BINARY, b"")
            assert all(f.opcode == OP_BINARY for f in sent_data)
            # The backend's hex before its marker, then binary only; the marker is its first empty binary message.
            switch = next(i for i, f in enumerate(received_data) if f.opcode == OP_BINARY)
            assert received_data[switch].payload == b""
            assert all(f.opcode == OP_TEXT and f.payload for f in received_data[:switch])
            assert all(f.opcode == OP_BINARY for f in received_data[switch:])
            wire = sum(len(f.payload) for f in sent_data)
            assert wire == len(up)  # raw bytes: half of what hex costs
        else:
            assert b"X-Tcpbridge-Offer" not in request
            assert b"X-Tcpbridge-Frames" not in response
            assert all(f.opcode == OP_TEXT for f in sent_data + received_data)
    finally:
        relay.close()
        target.close()
