"""The backend daemon against a websocket client we control: bad input, refusals, isolation."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import websocket

from bridge.protocol import BRIDGE_PATH
from tests.helpers import Daemon, TcpServer, backend, free_port, recv_all, write_yaml


class Target:
    """A TCP target that records how each connection ended: 'eof' or 'reset'."""

    def __init__(self) -> None:
        self.endings: list[str] = []
        self.ended = threading.Event()
        self.server = TcpServer(self._handle)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(15)
        try:
            while conn.recv(65536):
                pass
            self.endings.append("eof")
        except ConnectionResetError:
            self.endings.append("reset")
        self.ended.set()


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target()
    yield t
    t.server.close()


def start_backend(tmp_path: Path, routes: dict[str, str], **options: object) -> tuple[Daemon, int]:
    port = free_port()
    config = write_yaml(tmp_path, "backend.yaml", {
        **options, "listeners": [{"name": "main", "listen": f"127.0.0.1:{port}", "routes": routes}]})
    return backend(config).wait_ready(), port


def open_ws(port: int, route: str = "") -> websocket.WebSocket:
    path = BRIDGE_PATH + (f"/{route}" if route else "")
    ws = websocket.WebSocket(skip_utf8_validation=True)
    ws.connect(f"ws://127.0.0.1:{port}{path}", timeout=10, suppress_origin=True)
    return ws


def close_code(ws: websocket.WebSocket) -> int:
    """Read frames until the close frame; return its status code."""
    while True:
        frame = ws.recv_frame()
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            return int(struct.unpack("!H", frame.data[:2])[0])


BAD_INPUT = [
    pytest.param(b"zz", websocket.ABNF.OPCODE_TEXT, 1007, "not hex", id="non-hex"),
    pytest.param(b"abc", websocket.ABNF.OPCODE_TEXT, 1007, "odd length", id="odd-length"),
    pytest.param(b"\x00\x01", websocket.ABNF.OPCODE_BINARY, 1003, "binary message", id="binary"),
    pytest.param(b"00" * 40000, websocket.ABNF.OPCODE_TEXT, 1009, "max_message_bytes", id="too-big"),
]


@pytest.mark.parametrize(("payload", "opcode", "code", "reason"), BAD_INPUT)
def test_bad_input_closes_with_its_code_and_resets_the_target(
    tmp_path: Path, target: Target, echo: TcpServer, payload: bytes, opcode: int, code: int, reason: str
) -> None:
    daemon, port = start_backend(tmp_path, {"default": target.server.address, "echo": echo.address},
                                 max_message_bytes=65536)
    try:
        bystander = open_ws(port, "echo")
        ws = open_ws(port)
        ws.send(b"6869", websocket.ABNF.OPCODE_TEXT)  # "hi" first: the target is connected and has data
        ws.send(payload, opcode)
        assert close_code(ws) == code
        assert target.ended.wait(10)
        assert target.endings == ["reset"]
        assert daemon.wait_for_log(reason)
        assert sum("bad frame from the websocket peer" in line for line in daemon.log.splitlines()) == 1
        # every other tunnel keeps going
        bystander.send(b"6f6b", websocket.ABNF.OPCODE_TEXT)
        assert bystander.recv_frame().data == b"6f6b"
        bystander.close()
        ws.close()
    finally:
        assert daemon.stop() == 0


def test_the_go_frontends_largest_message_is_accepted(tmp_path: Path, echo: TcpServer) -> None:
    daemon, port = start_backend(tmp_path, {"default": echo.address}, max_message_bytes=65536)
    try:
        ws = open_ws(port)
        data = bytes(range(256)) * 128  # 32 KiB raw = 65,536 hex characters
        ws.send(data.hex().encode(), websocket.ABNF.OPCODE_TEXT)
        ws.send(b"", websocket.ABNF.OPCODE_TEXT)  # end of stream
        received = b""
        while True:
            frame = ws.recv_frame()
            if frame.opcode == websocket.ABNF.OPCODE_CLOSE or frame.data == b"":
                break
            received += bytes.fromhex(frame.data.decode())
        assert received == data
    finally:
        daemon.stop()


def test_client_dropping_the_websocket_resets_the_target(tmp_path: Path, target: Target) -> None:
    daemon, port = start_backend(tmp_path, {"default": target.server.address})
    try:
        ws = open_ws(port)
        ws.send(b"00", websocket.ABNF.OPCODE_TEXT)
        assert daemon.wait_for_log("open:")
        ws.sock.close()  # no close frame
        assert target.ended.wait(10)
        assert target.endings == ["reset"]
        assert daemon.wait_for_log("websocket dropped")
    finally:
        daemon.stop()


@pytest.mark.parametrize(("request_line", "status"), [
    ("GET / HTTP/1.1", 404),
    (f"GET {BRIDGE_PATH} HTTP/1.1", 404),  # the bridge path without upgrade headers
    ("POST /anything HTTP/1.1", 404),
])
def test_requests_that_are_not_upgrades_get_404(tmp_path: Path, echo: TcpServer, request_line: str,
                                                status: int) -> None:
    daemon, port = start_backend(tmp_path, {"default": echo.address})
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"{request_line}\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            response = recv_all(sock).decode()
        assert response.startswith(f"HTTP/1.1 {status} ")
        assert "not a tcpbridge upgrade" in response
    finally:
        daemon.stop()


def test_malformed_upgrades_are_refused_with_a_reason(tmp_path: Path, echo: TcpServer) -> None:
    daemon, port = start_backend(tmp_path, {"default": echo.address})
    base = f"GET {BRIDGE_PATH} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    cases = {
        "Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n": "426 ",
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n": "400 ",
    }
    try:
        for extra, status in cases.items():
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall((base + extra + "Connection: close\r\n\r\n").encode())
                sock.settimeout(10)
                head = sock.recv(4096).decode()
            assert head.startswith(f"HTTP/1.1 {status}"), head
        assert not echo.connections, "a refused upgrade must not dial the target"
    finally:
        daemon.stop()


def test_bytes_sent_right_behind_the_upgrade_request_are_kept(tmp_path: Path, echo: TcpServer) -> None:
    """The Go backend drops such bytes and hangs up; ours delivers them."""
    daemon, port = start_backend(tmp_path, {"default": echo.address})
    try:
        request = (f"GET {BRIDGE_PATH} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode()
        mask = b"\x01\x02\x03\x04"
        frame = b"\x81\x82" + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"41"))  # "A"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request + frame)
            sock.settimeout(10)
            data = b""
            while not data.endswith(b"\x81\x0241"):
                chunk = sock.recv(4096)
                assert chunk, data
                data += chunk
            assert data.startswith(b"HTTP/1.1 101 ")
    finally:
        daemon.stop()
