"""The frontend daemon against a websocket server we control: bad input from the backend side."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge import frontend as frontend_module
from bridge import protocol
from bridge.config import parse_frontend
from bridge.handshake import accept_token
from bridge.secrets import SecretResolver
from bridge.transport import DialError, DialFailure
from tests.helpers import Daemon, frontend, recv_all, recv_exactly, write_yaml


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One masked client frame: (opcode, unmasked payload)."""
    head = recv_exactly(sock, 2)
    length = head[1] & 0x7F
    if length == 126:
        length = struct.unpack("!H", recv_exactly(sock, 2))[0]
    elif length == 127:
        length = struct.unpack("!Q", recv_exactly(sock, 8))[0]
    mask = recv_exactly(sock, 4)
    payload = recv_exactly(sock, length)
    return head[0] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_frame(opcode: int, payload: bytes) -> bytes:
    length = len(payload)
    if length < 126:
        return bytes([0x80 | opcode, length]) + payload
    if length < 65536:
        return bytes([0x80 | opcode, 126]) + struct.pack("!H", length) + payload
    return bytes([0x80 | opcode, 127]) + struct.pack("!Q", length) + payload


class FakeBackend:
    """Accepts one websocket, answers 101, sends ``frames``, then records the close code it gets."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.close_codes: list[int] = []
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(10)
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:"))
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept_token(key.decode()).encode() + b"\r\n\r\n")
            for frame in self.frames:
                conn.sendall(frame)
            try:
                while True:
                    opcode, payload = read_frame(conn)
                    if opcode == 0x8:
                        self.close_codes.append(struct.unpack("!H", payload[:2])[0])
                        break
            except (EOFError, OSError):
                pass
        self.done.set()


@pytest.fixture
def make_frontend(tmp_path: Path) -> Iterator[object]:
    started: list[Daemon] = []

    def make(port: int) -> tuple[Daemon, int]:
        from tests.helpers import free_port
        listen = free_port()
        config = write_yaml(tmp_path, "frontend.yaml", {
            "backend": f"ws://127.0.0.1:{port}", "max_message_bytes": 65536,
            "tunnels": [{"name": "t", "listen": f"127.0.0.1:{listen}"}]})
        daemon = frontend(config).wait_ready()
        started.append(daemon)
        return daemon, listen

    yield make
    for daemon in started:
        daemon.stop()


@pytest.mark.parametrize(("frame", "code", "reason"), [
    pytest.param(server_frame(0x1, b"xyz1"), 1007, "not hex", id="non-hex"),
    pytest.param(server_frame(0x1, b"616"), 1007, "odd length", id="odd-length"),
    pytest.param(server_frame(0x2, b"\x00"), 1003, "binary message", id="binary"),
    pytest.param(server_frame(0x1, b"00" * 40000), 1009, "max_message_bytes", id="too-big"),
    pytest.param(bytes([0x81, 127]) + struct.pack("!Q", 1 << 40), 1009, "max_message_bytes", id="huge-length"),
])
def test_bad_input_from_the_backend_closes_with_its_code_and_resets_the_client(
    make_frontend, frame: bytes, code: int, reason: str  # type: ignore[no-untyped-def]
) -> None:
    fake = FakeBackend([server_frame(0x1, b"6869"), frame])
    daemon, listen = make_frontend(fake.port)
    with socket.create_connection(("127.0.0.1", listen), timeout=10) as client:
        assert recv_exactly(client, 2) == b"hi"  # what arrived before the bad frame is delivered
        with pytest.raises(ConnectionResetError):
            recv_all(client)
    assert fake.done.wait(10)
    assert fake.close_codes == [code]
    assert daemon.wait_for_log(reason)


# ---------------------------------------------------------------------------
# Dialing: what the frontend makes of each kind of answer to its upgrade


class OneAnswer:
    """Accepts one connection, reads the upgrade request, answers with ``parts`` (pausing ``pause`` between,
    in pieces of ``chunk`` bytes if set), then waits for the frontend to hang up, or hangs up itself."""

    def __init__(self, parts: list[bytes] | None = None, *, pause: float = 0.0, answer_key: bool = False,
                 chunk: int = 0, hang_up: bool = False) -> None:
        self.parts = parts or []
        self.hang_up = hang_up
        self.pause = pause
        self.chunk = chunk
        self.answer_key = answer_key
        self.request = b""
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn, self.sock:
            conn.settimeout(10)
            while b"\r\n\r\n" not in self.request:
                self.request += conn.recv(4096)
            parts = self.parts
            if self.answer_key:
                key = next(line.split(b":", 1)[1].strip().decode() for line in self.request.split(b"\r\n")
                           if line.lower().startswith(b"sec-websocket-key:"))
                parts = [part.replace(b"{accept}", accept_token(key).encode()) for part in parts]
            if self.chunk:
                whole = b"".join(parts)
                parts = [whole[i:i + self.chunk] for i in range(0, len(whole), self.chunk)]
            for part in parts:
                try:
                    conn.sendall(part)
                except OSError:
                    return  # the frontend gave up (the tests that trickle want it to)
                time.sleep(self.pause)
            if self.hang_up:
                return
            with contextlib.suppress(OSError):
                conn.recv(1)  # until the frontend hangs up


def dial_to(server: OneAnswer, **options: object) -> frontend_module.Opened:
    config = parse_frontend({"backend": f"ws://127.0.0.1:{server.port}", **options,
                             "tunnels": [{"name": "t", "listen": "127.0.0.1:1"}]})
    return frontend_module.dial(config.tunnels[0], SecretResolver(), environ={})


SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"


def test_dial_sends_the_request_and_keeps_what_followed_the_101() -> None:
    server = OneAnswer([SWITCH + b"Sec-WebSocket-Accept: {accept}\r\nX-Tcpbridge-Frames: binary\r\n\r\n\x82\x01x"],
                       answer_key=True)
    opened = dial_to(server)
    try:
        assert opened.received == b"\x82\x01x"
        assert ("X-Tcpbridge-Frames", "binary") in opened.headers
        assert opened.sock.gettimeout() is None  # the connect timeout must not end an idle tunnel
    finally:
        opened.sock.close()
    start = f"GET {protocol.BRIDGE_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
    assert server.request.startswith(start.encode())


def test_dial_reads_a_101_that_arrives_a_few_bytes_at_a_time() -> None:
    server = OneAnswer([SWITCH + b"Sec-WebSocket-Accept: {accept}\r\n\r\n"], pause=0.001, answer_key=True, chunk=7)
    dial_to(server).sock.close()


@pytest.mark.parametrize(("parts", "message", "label"), [
    pytest.param([SWITCH + b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n"],
                 "websocket handshake failed: wrong Sec-WebSocket-Accept", "handshake", id="wrong-accept"),
    pytest.param([b"SSH-2.0-OpenSSH_9.6\r\n\r\n"], "websocket handshake failed: not an HTTP/1.1 response",
                 "handshake", id="not-http"),
    pytest.param([b"HTTP/1.1 404 Not Found\r\nContent-Length: 24\r\n\r\n", b"no route 'x' (routes: a)"],
                 "backend refused the upgrade: HTTP 404 Not Found (no route 'x' (routes: a))", "http_404",
                 id="body-later"),
    pytest.param([b"HTTP/1.1 302 Found\r\nLocation: https://elsewhere.example/\r\nContent-Length: 0\r\n\r\n"],
                 "backend refused the upgrade: HTTP 302 Found (redirects to https://elsewhere.example/)", "http_302",
                 id="redirect"),
    pytest.param([b"HTTP/1.1 200 OK\r\n" + b"X-Filler: yyyyyyyy\r\n" * 2000],
                 "websocket handshake failed: response head larger than 16384 bytes", "handshake",
                 id="endless-head"),
])
def test_dial_says_what_was_wrong_with_the_answer(parts: list[bytes], message: str, label: str) -> None:
    server = OneAnswer(parts)
    with pytest.raises(DialError) as raised:
        dial_to(server)
    assert str(raised.value) == message or str(raised.value).startswith(message)
    assert raised.value.label == label  # what the metrics count, set where the error was raised


def test_dial_says_when_the_backend_hangs_up_without_answering() -> None:
    with pytest.raises(DialError) as raised:
        dial_to(OneAnswer(hang_up=True))
    assert str(raised.value) == ("websocket handshake failed: "
                                 "the backend closed the connection before answering the upgrade")
    assert raised.value.reason is DialFailure.HANDSHAKE


def test_dial_gives_up_on_a_trickling_answer_at_connect_timeout() -> None:
    server = OneAnswer([b"H"] * 200, pause=0.05)
    started = time.monotonic()
    with pytest.raises(DialError, match=r"timed out after 0.5 s \(connect_timeout\)") as raised:
        dial_to(server, connect_timeout=0.5)
    assert time.monotonic() - started < 5  # a deadline for the whole answer, not a timeout per read
    assert raised.value.reason is DialFailure.TIMEOUT


def test_a_refusals_body_that_never_comes_does_not_hold_the_dial_past_its_deadline() -> None:
    server = OneAnswer([b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 100\r\n\r\npartial"])
    with pytest.raises(DialError, match=r"^backend refused the upgrade: HTTP 503 Service Unavailable \(partial\)$") \
            as raised:
        dial_to(server, connect_timeout=0.5)
    assert (raised.value.reason, raised.value.status, raised.value.label) == (DialFailure.REFUSED, 503, "http_503")


def test_a_closed_port_is_a_refused_connection() -> None:
    with socket.socket() as probe:  # a port nobody listens on: bound, never listening
        probe.bind(("127.0.0.1", 0))
        config = parse_frontend({"backend": f"ws://127.0.0.1:{probe.getsockname()[1]}",
                                 "tunnels": [{"name": "t", "listen": "127.0.0.1:1"}]})
        with pytest.raises(DialError, match=r"^connection refused$") as raised:
            frontend_module.dial(config.tunnels[0], SecretResolver(), environ={})
    assert raised.value.reason is DialFailure.CONNECT_REFUSED


def test_a_header_secret_that_cannot_be_read_fails_the_dial_as_a_secret(tmp_path: Path) -> None:
    config = parse_frontend({"backend": "ws://127.0.0.1:1",
                             "headers": {"X-Token": {"file": str(tmp_path / "missing")}},
                             "tunnels": [{"name": "t", "listen": "127.0.0.1:1"}]})
    with pytest.raises(DialError, match=r"^cannot read a header value: ") as raised:
        frontend_module.dial(config.tunnels[0], SecretResolver(), environ={})
    assert raised.value.reason is DialFailure.SECRET
