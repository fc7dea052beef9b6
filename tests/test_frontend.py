"""The frontend daemon against a websocket server we control: bad input from the backend side."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.backend import accept_token
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
