"""Wire conformance with the Go reference (google/inverting-proxy utils/tcpbridge).

Our daemons run as real processes; the other end is played by :mod:`tests.gopeer`,
which behaves exactly as the Go frontend or backend does on the wire. The
generators in gopeer are first checked against the recorded Go bytes in
``tests/vectors/`` (captured from the Go reference at commit 4124b20 with
gorilla/websocket v1.5.0), then used against our backend and frontend.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import re
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gopeer import (
    BRIDGE_PATH,
    OP_CLOSE,
    OP_CONT,
    OP_TEXT,
    Frame,
    FrameRow,
    GoBackend,
    GoBadHandshake,
    GoCloseError,
    GoProtocolError,
    GoWebsocket,
    check_go_client_handshake,
    decode_frames,
    encode_frame,
    frame_table,
    go_backend_101,
    go_backend_frames,
    go_backend_refusal,
    go_backend_verdict,
    go_frontend,
    go_frontend_dial,
    go_frontend_frames,
    go_frontend_request,
    parse_frame,
    parse_http_head,
    read_http_head,
    reassemble,
    shortest_length_bits,
)
from tests.helpers import (
    Daemon,
    TcpServer,
    backend,
    free_port,
    frontend,
    recv_exactly,
    started,
    wait_until,
    write_yaml,
)

VECTORS = Path(__file__).parent / "vectors"
SIZES = [1, 4096, 100000]
LOWER_HEX = re.compile(rb"(?:[0-9a-f]{2})+")
#: The request behind backend_handshake_response.bin (vectors README).
VECTOR_BACKEND_REQUEST = (
    b"GET /tcp-over-websocket-bridge/35218cb7-1201-4940-89e8-48d8f03fed96 HTTP/1.1\r\n"
    b"Host: 127.0.0.1:38082\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def vector(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def vector_pattern(n: int) -> bytes:
    """The vectors' payload: ``bytes(i % 251 for i in range(n))``, built fast."""
    return (bytes(range(251)) * (n // 251 + 1))[:n]


def vector_key() -> str:
    key = parse_http_head(vector("frontend_handshake.bin")).get("Sec-WebSocket-Key")
    assert key
    return key


def assert_go_backend_style(frames: list[Frame]) -> None:
    """What the Go backend sends and the Go frontend reads: one unmasked TEXT frame per message."""
    for frame in frames:
        assert frame.opcode == OP_TEXT and frame.fin and frame.rsv == 0, frame.row
        assert frame.mask is None, frame.row
        assert frame.length_bits == shortest_length_bits(len(frame.payload)), frame.row
        assert LOWER_HEX.fullmatch(frame.payload), frame.payload[:40]


def assert_masked_lowercase_text(frames: list[Frame]) -> None:
    """What a Go backend reads from a client: masked frames of TEXT messages of lowercase hex."""
    assert all(frame.mask is not None and frame.rsv == 0 for frame in frames)
    messages = reassemble(frames)
    assert messages
    for opcode, payload in messages:
        assert opcode == OP_TEXT
        assert LOWER_HEX.fullmatch(payload), payload[:40]


# ---------------------------------------------------------------------------
# Targets and daemons


class Target:
    """A TCP target that records what arrives and how its connection ended ("eof" or "reset")."""

    def __init__(self, send: bytes = b"", half_close_after_send: bool = False) -> None:
        self.send = send
        self.half_close_after_send = half_close_after_send
        self.received = bytearray()
        self.outcome: str | None = None
        self.server = TcpServer(self._handle)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        if self.send:
            conn.sendall(self.send)
        if self.half_close_after_send:
            conn.shutdown(socket.SHUT_WR)
        try:
            while data := conn.recv(1 << 18):
                self.received += data
            self.outcome = "eof"
        except ConnectionResetError:
            self.outcome = "reset"
        except OSError as exc:
            self.outcome = repr(exc)

    def wait_received(self, n: int, timeout: float = 5.0) -> bytes:
        assert wait_until(lambda: len(self.received) >= n, timeout), f"{len(self.received)} of {n} bytes"
        return bytes(self.received)

    def close(self) -> None:
        self.server.close()
        for conn in self.server.connections:
            conn.close()


@contextlib.contextmanager
def target(send: bytes = b"", half_close_after_send: bool = False) -> Iterator[Target]:
    server = Target(send, half_close_after_send)
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def go_flags_backend(target_port: int) -> Iterator[int]:
    """Our backend started with the Go binary's flags; yields its websocket port."""
    port = free_port()
    with started(backend(None, "--frontend-port", str(port), "--backend-port", str(target_port))):
        yield port


@contextlib.contextmanager
def yaml_backend(tmp_path: Path, routes: dict[str, str]) -> Iterator[int]:
    port = free_port()
    config = write_yaml(tmp_path, "backend.yaml", {
        "drain_timeout": 1,
        "listeners": [{"name": "main", "listen": f"127.0.0.1:{port}", "routes": routes}],
    })
    with started(backend(config)):
        yield port


@contextlib.contextmanager
def yaml_frontend(tmp_path: Path, backend_url: str, **options: object) -> Iterator[tuple[int, Daemon]]:
    port = free_port()
    config = write_yaml(tmp_path, "frontend.yaml", {
        "backend": backend_url,
        "drain_timeout": 1,
        **options,
        "tunnels": [{"name": "t", "listen": f"127.0.0.1:{port}"}],
    })
    with started(frontend(config)) as daemon:
        yield port, daemon


@contextlib.contextmanager
def client(port: int) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        yield sock
    finally:
        sock.close()


# ---------------------------------------------------------------------------
# The fake Go peers against the recorded Go bytes


def test_frame_codec_lengths_masks_and_continuations() -> None:
    for length, bits in [(0, 7), (1, 7), (125, 7), (126, 16), (65535, 16), (65536, 64), (70000, 64)]:
        payload = bytes(range(256)) * (length // 256) + bytes(range(length % 256))
        for mask in (None, b"\x01\x02\x03\x04"):
            raw = encode_frame(OP_TEXT, payload, mask=mask)
            frames = decode_frames(raw)
            assert len(frames) == 1
            frame = frames[0]
            assert (frame.payload, frame.length_bits, frame.mask, frame.raw) == (payload, bits, mask, raw)
            assert frame.header_bytes == 2 + {7: 0, 16: 2, 64: 8}[bits] + (4 if mask else 0)
            assert parse_frame(raw[:-1] if raw[-1:] else raw[:1]) is None
    split = encode_frame(OP_TEXT, b"ab", fin=False) + encode_frame(OP_CONT, b"cd", mask=b"abcd")
    assert reassemble(decode_frames(split)) == [(OP_TEXT, b"abcd")]
    assert decode_frames(encode_frame(OP_TEXT, b"x", length_bits=64))[0].length_bits == 64


def test_go_frontend_request_matches_vector() -> None:
    recorded = vector("frontend_handshake.bin")
    assert go_frontend_request("127.0.0.1:38081", vector_key()) == recorded
    head = parse_http_head(recorded)
    assert not {"origin", "sec-websocket-protocol", "sec-websocket-extensions"} & {k.lower() for k, _ in head.headers}


def test_fake_go_peers_talk_to_each_other_and_are_strict() -> None:
    """Sanity check of the fakes: Go frontend against Go backend, and gorilla's masking rule."""
    with GoBackend(rotation=2) as go:
        ws = go_frontend_dial(go.port)
        try:
            conn = go.accept()
            assert conn.ws is not None and conn.early == b""
            ws.write_stream(vector_pattern(70000))
            assert conn.ws.read_exactly(70000) == vector_pattern(70000)
            conn.ws.write(b"")  # an empty message, which the Go side skips
            conn.ws.write(b"back")
            assert ws.read() == b"back"
            conn.ws.send_raw(encode_frame(OP_TEXT, b"00", mask=b"abcd"))  # a masked frame from a server
            with pytest.raises(GoProtocolError, match="bad MASK"):
                ws.read()
        finally:
            ws.drop()


@pytest.mark.parametrize("rotation", range(4))
def test_go_backend_101_matches_vector(rotation: int) -> None:
    recorded = vector("backend_handshake_response.bin")
    built = go_backend_101(parse_http_head(VECTOR_BACKEND_REQUEST), rotation)
    if rotation == 0:
        assert built == recorded  # the most common order, byte for byte
    fixed, echoed = built.split(b"\r\n")[:4], built.split(b"\r\n")[4:]
    assert fixed == recorded.split(b"\r\n")[:4]
    assert sorted(echoed) == sorted(recorded.split(b"\r\n")[4:])  # the echoed block, as a multiset


@pytest.mark.parametrize("status", [403, 500])
def test_go_backend_refusal_matches_vector(status: int) -> None:
    text = (VECTORS / "backend_responses.txt").read_text()
    start = text.index(f"HTTP/1.1 {status} ")
    head_text, _, rest = text[start:].partition("-- body received (")
    length_text, _, rest = rest.partition(" bytes):\n")
    body_text = rest.partition("-- connection")[0]
    built = go_backend_refusal(status)
    head, _, body = built.partition(b"\r\n\r\n")
    assert body.decode() == body_text and len(body) == int(length_text)
    expected = [line for line in head_text.splitlines() if not line.startswith("Date:")]
    assert [line for line in head.decode().split("\r\n") if not line.startswith("Date:")] == expected
    assert re.search(rb"\r\nDate: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT\r\n", built)


@pytest.mark.parametrize("size", SIZES)
def test_go_frontend_frames_match_vector(size: int) -> None:
    recorded = decode_frames(vector(f"frontend_frames_{size}.bin"))
    generated = decode_frames(go_frontend_frames(vector_pattern(size)))
    assert frame_table(generated) == frame_table(recorded)  # a row records whether a frame is masked, not its key
    assert [frame.payload for frame in generated] == [frame.payload for frame in recorded]
    assert len({frame.mask for frame in generated}) == len(generated) or len(generated) == 1  # a key per frame
    payload = b"".join(binascii.unhexlify(message) for _, message in reassemble(recorded))
    assert payload == vector_pattern(size)


@pytest.mark.parametrize("size", SIZES)
def test_go_backend_frames_match_vector(size: int) -> None:
    assert go_backend_frames(vector_pattern(size)) == vector(f"backend_frames_{size}.bin")  # unmasked: byte exact
    assert_go_backend_style(decode_frames(vector(f"backend_frames_{size}.bin")))


# ---------------------------------------------------------------------------
# Our backend against a fake Go frontend


def test_backend_101_is_valid_rfc6455_and_go_accepts_it() -> None:
    key = vector_key()
    with target() as tcp, go_flags_backend(tcp.server.port) as port, \
            socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(go_frontend_request(f"127.0.0.1:{port}", key))
        buffer = bytearray()
        response = read_http_head(sock, buffer)
        assert response.start_line == "HTTP/1.1 101 Switching Protocols"
        assert response.tokens("Upgrade") == {"websocket"}
        assert "upgrade" in response.tokens("Connection")
        expected = base64.b64encode(hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        assert response.get_all("Sec-WebSocket-Accept") == [expected.decode()]
        assert not response.has("Sec-WebSocket-Extensions") and not response.has("Sec-WebSocket-Protocol")
        assert not response.has("Content-Length") and not response.has("Transfer-Encoding")
        check_go_client_handshake(response, key)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            buffer += sock.recv(100)  # a silent target: nothing follows the 101
        assert buffer == b""


@pytest.mark.parametrize("size", SIZES)
def test_backend_delivers_go_frontend_frames(size: int) -> None:
    data = vector_pattern(size)
    frames = go_frontend_frames(data)
    assert frame_table(decode_frames(frames)) == frame_table(decode_frames(vector(f"frontend_frames_{size}.bin")))
    with target() as tcp, go_flags_backend(tcp.server.port) as port, go_frontend(port) as ws:
        ws.send_raw(frames)
        assert tcp.wait_received(size) == data
        time.sleep(0.1)
        assert bytes(tcp.received) == data


@pytest.mark.parametrize("size", SIZES)
def test_backend_sends_target_data_as_go_frontend_reads_it(size: int) -> None:
    data = vector_pattern(size)
    with target(send=data) as tcp, go_flags_backend(tcp.server.port) as port, go_frontend(port) as ws:
        assert ws.read_exactly(size) == data
        assert_go_backend_style(ws.received)


def test_backend_accepts_uppercase_hex() -> None:
    data = bytes(range(256))
    with target() as tcp, go_flags_backend(tcp.server.port) as port, go_frontend(port) as ws:
        ws.send_raw(encode_frame(OP_TEXT, binascii.hexlify(data).upper(), mask=b"\x0f\x1e\x2d\x3c"))
        assert tcp.wait_received(len(data)) == data


def test_backend_end_of_stream_marker_after_target_close() -> None:
    """Target sends then closes: we send the data, then exactly one empty unmasked FIN TEXT frame."""
    with target(send=b"bye", half_close_after_send=True) as tcp, go_flags_backend(tcp.server.port) as port, \
            go_frontend(port) as ws:
        assert ws.read_exactly(3) == b"bye"
        marker = ws.recv_frame()
        assert marker.raw == b"\x81\x00"  # FIN, TEXT, unmasked, empty
        ws.received.clear()
        with pytest.raises(TimeoutError):
            ws.read(timeout=0.5)  # the Go frontend reads past it: no data, no error, no close
        assert ws.received == []
        ws.write(b"still open")  # the other direction is still open
        assert tcp.wait_received(10) == b"still open"


def test_backend_half_close_timeout_against_go_frontend(tmp_path: Path) -> None:
    """A Go frontend never sends the marker: after half_close_timeout our backend closes with 1000."""
    port = free_port()
    with target(send=b"bye", half_close_after_send=True) as tcp:
        config = write_yaml(tmp_path, "backend.yaml", {
            "drain_timeout": 1, "half_close_timeout": 1,
            "listeners": [{"name": "main", "listen": f"127.0.0.1:{port}", "routes": {"default": tcp.server.address}}],
        })
        with started(backend(config)), go_frontend(port) as ws:
            assert ws.read_exactly(3) == b"bye"
            marker_seen = time.monotonic()
            with pytest.raises(GoCloseError) as closed:
                ws.read(timeout=6)  # skips the marker, then meets the close frame (and echoes it, like gorilla)
            assert closed.value.code == 1000
            assert ws.received[-1].raw == b"\x88\x02\x03\xe8"  # unmasked close 1000, no reason
            assert 0.8 <= time.monotonic() - marker_seen <= 4.0
            with pytest.raises(EOFError):
                ws.recv_frame(timeout=5)  # then our backend hangs up
            assert wait_until(lambda: tcp.outcome is not None, 5)
            assert tcp.outcome == "eof"


@pytest.mark.parametrize("fragment", [1, 4095, 65537])
def test_backend_reassembles_any_fragmentation(fragment: int) -> None:
    """RFC 6455 allows any split, odd ones included; a message of hex may break mid-byte."""
    data = vector_pattern(70000)
    text = binascii.hexlify(data[:65536])  # the first 64 KiB, as one message
    pieces = [text[i:i + fragment] for i in range(0, len(text), fragment)]
    frames = b"".join(encode_frame(OP_TEXT if i == 0 else OP_CONT, piece, fin=i == len(pieces) - 1, mask=b"abcd")
                      for i, piece in enumerate(pieces))
    with target() as tcp, go_flags_backend(tcp.server.port) as port, go_frontend(port) as ws:
        ws.send_raw(frames)
        ws.write(data[65536:])
        assert tcp.wait_received(len(data), timeout=8) == data


def test_backend_refuses_before_any_101(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with target() as tcp, yaml_backend(tmp_path, {"default": tcp.server.address, "dead": dead}) as port:
        for path, status in [(f"{BRIDGE_PATH}/nosuch", 404), (f"{BRIDGE_PATH}/dead", 502), ("/", 404),
                             ("/some/other/path", 404)]:
            with pytest.raises(GoBadHandshake) as refused:
                go_frontend_dial(port, path=path)
            response = refused.value.response
            assert response is not None
            assert response.status == status, (path, response.start_line)
            assert response.raw.startswith(f"HTTP/1.1 {status} ".encode()), path
            assert b"101" not in response.raw.split(b"\r\n")[0]
        with go_frontend(port) as ws:  # the default route still works
            ws.write(b"ok")
            assert tcp.wait_received(2) == b"ok"


def test_backend_resets_target_when_go_frontend_drops() -> None:
    with target() as tcp, go_flags_backend(tcp.server.port) as port:
        ws = go_frontend_dial(port)
        try:
            ws.write(b"hello")
            tcp.wait_received(5)
        finally:
            ws.drop()
        assert wait_until(lambda: tcp.outcome is not None, 5)
        assert tcp.outcome == "reset"


# ---------------------------------------------------------------------------
# Our frontend against a fake Go backend


def test_frontend_upgrade_request_and_nothing_before_101(tmp_path: Path) -> None:
    data = vector_pattern(300)
    with GoBackend(hold=0.5) as go, yaml_frontend(tmp_path, f"ws://127.0.0.1:{go.port}/prefix/") as (port, _), \
            client(port) as sock:
        sock.sendall(data)  # before the websocket exists
        conn = go.accept()
        request = conn.request
        assert conn.early == b""
        assert request.start_line == f"GET /prefix{BRIDGE_PATH} HTTP/1.1"
        assert request.get_all("Host") == [f"127.0.0.1:{go.port}"]
        for absent in ("Origin", "Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol"):
            assert not request.has(absent), absent
        assert request.tokens("Upgrade") == {"websocket"}
        assert "upgrade" in request.tokens("Connection")
        assert request.get_all("Sec-WebSocket-Version") == ["13"]
        assert len(base64.b64decode(request.get("Sec-WebSocket-Key") or "", validate=True)) == 16
        assert go_backend_verdict(request) is None
        assert conn.ws is not None
        assert conn.ws.read_exactly(len(data)) == data
        assert_masked_lowercase_text(conn.ws.received)
        conn.ws.drop()  # end the tunnel now rather than in the daemon's drain


@pytest.mark.parametrize("rotation", range(3))
@pytest.mark.parametrize("size", SIZES)
def test_frontend_reads_go_backend_frames(size: int, rotation: int) -> None:
    """Our frontend (Go-style flags) takes the Go 101 (duplicate headers, any order) and the Go frames."""
    data = vector_pattern(size)
    frames = go_backend_frames(data)
    assert frames == vector(f"backend_frames_{size}.bin")
    with GoBackend(rotation=rotation) as go:
        port = free_port()
        with started(frontend(None, "--frontend-port", str(port), "--backend", f"ws://127.0.0.1:{go.port}")), \
                client(port) as sock:
            sock.sendall(b"hi")
            conn = go.accept()
            assert conn.ws is not None
            assert conn.request.path == BRIDGE_PATH
            assert conn.ws.read_exactly(2) == b"hi"
            conn.ws.send_raw(frames)
            assert recv_exactly(sock, size, timeout=5) == data
            assert_masked_lowercase_text(conn.ws.received)
            conn.ws.drop()


def test_frontend_reads_frames_sent_with_the_101() -> None:
    """The target spoke first: the Go 101 and the first frames arrive in one segment."""
    data = vector_pattern(5000)
    with GoBackend(greeting=go_backend_frames(data)) as go:
        port = free_port()
        with started(frontend(None, "--frontend-port", str(port), "--backend", f"ws://127.0.0.1:{go.port}")), \
                client(port) as sock:
            assert recv_exactly(sock, len(data), timeout=5) == data
            go.accept().sock.close()


def test_frontend_half_close_marker_then_half_close_timeout(tmp_path: Path) -> None:
    request, reply = vector_pattern(1000), b"\xab\xcd reply"
    with GoBackend() as go, yaml_frontend(tmp_path, f"ws://127.0.0.1:{go.port}", half_close_timeout=1) as (port, _), \
            client(port) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        conn = go.accept()
        ws = conn.ws
        assert isinstance(ws, GoWebsocket)
        assert ws.read_exactly(len(request)) == request
        assert ws.read_message() == (OP_TEXT, b"")  # the end-of-stream marker...
        marker = ws.received[-1]
        assert marker.row == FrameRow(OP_TEXT, True, 0, True, 0, 7, 6) and len(marker.raw) == 6
        assert_masked_lowercase_text(ws.received[:-1])
        ws.write(reply)  # ...which a Go backend ignores: the reply still flows
        assert recv_exactly(sock, len(reply), timeout=5) == reply
        replied = time.monotonic()
        # A Go backend never ends the stream: after half_close_timeout we close with 1000.
        with pytest.raises(GoCloseError) as closed:
            ws.read(timeout=6)
        waited = time.monotonic() - replied
        assert closed.value.code == 1000
        assert ws.received[-1].opcode == OP_CLOSE and ws.received[-1].payload == struct.pack("!H", 1000)
        assert 0.8 <= waited <= 4.0, waited
        sock.settimeout(5)
        assert sock.recv(100) == b""  # a clean EOF, not a reset


@pytest.mark.parametrize("status", [403, 500])
def test_frontend_go_backend_refusal_closes_client_and_logs_once(tmp_path: Path, status: int) -> None:
    with GoBackend(status=status) as go, yaml_frontend(tmp_path, f"ws://127.0.0.1:{go.port}/") as (port, daemon):
        started = time.monotonic()
        try:  # the reset may even beat connect() back to us
            with client(port) as sock:
                sock.settimeout(5)
                leftover = sock.recv(100)
        except ConnectionResetError:
            leftover = b""
        assert leftover == b""
        assert time.monotonic() - started < 2.0
        assert go.accept().status == status
        url = f"ws://127.0.0.1:{go.port}{BRIDGE_PATH}"
        assert daemon.wait_for_log(f"HTTP {status}", 5), daemon.log
        lines = [line for line in daemon.log.splitlines() if f"HTTP {status}" in line]
        assert len(lines) == 1, lines
        assert url in lines[0], lines[0]


@pytest.mark.parametrize("exchange", [True, False], ids=["after-data", "right-after-101"])
def test_frontend_resets_client_when_go_backend_drops(tmp_path: Path, exchange: bool) -> None:
    """A drop mid-stream, or right after the 101 (what a Go backend does when its target is down)."""
    with GoBackend() as go, yaml_frontend(tmp_path, f"ws://127.0.0.1:{go.port}") as (port, _), client(port) as sock:
        conn = go.accept()
        assert conn.ws is not None
        if exchange:
            sock.sendall(b"hello")
            assert conn.ws.read_exactly(5) == b"hello"
            conn.ws.write(b"world")
            assert recv_exactly(sock, 5) == b"world"
        conn.ws.drop()
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):
            sock.recv(100)


def test_a_go_backend_dropping_after_the_101_is_a_plain_abort(tmp_path: Path) -> None:
    """A Go backend whose target is down sends the 101, then hangs up without a close frame.

    The client is reset and the frontend logs an abort, not an internal error:
    the close frame the abort then tries to send must fail quietly.
    """
    with GoBackend() as go, yaml_frontend(tmp_path, f"ws://127.0.0.1:{go.port}") as (port, daemon), \
            client(port) as sock:
        go.accept().sock.close()  # 101, then hang up: the Go backend with its target down
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):
            sock.recv(100)
        assert daemon.wait_for_log("closed (abort: websocket dropped", 5), daemon.log
        assert "internal error" not in daemon.log and "Traceback" not in daemon.log, daemon.log
