"""Keepalive: pings, dead-peer detection that never mistakes backpressure for death, idle timeout."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

import pytest

from bridge.handshake import accept_token
from tests.conftest import start_pair
from tests.helpers import TcpServer, echo_handler, free_port, frontend, recv_all, recv_exactly, write_yaml


class SilentBackend:
    """Answers the upgrade, then reads nothing and answers nothing: a peer that died after its 101."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        self.conns.append(conn)
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        key = next(line.split(b":", 1)[1].strip().decode() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Accept: {accept_token(key)}\r\n\r\n").encode())

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.sock.close()


def test_a_silent_peer_whose_kernel_still_acknowledges_is_left_to_idle_timeout(tmp_path: Path) -> None:
    """A peer process that stops answering while its machine still acknowledges our pings is slow, not
    dead: under load a starved daemon looks exactly like this (the soak run lost healthy tunnels to
    that verdict). Pings never reset it; idle_timeout does. (A peer whose machine or path is gone
    stops acknowledging, and that is what the dead-peer verdict needs.)"""
    silent = SilentBackend()
    port = free_port()
    daemon = frontend(write_yaml(tmp_path, "f.yaml", {
        "backend": f"ws://127.0.0.1:{silent.port}", "ping_interval": 0.3, "ping_timeout": 0.5, "idle_timeout": 3,
        "tunnels": [{"name": "t", "listen": port}]})).wait_ready()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            started = time.monotonic()
            with pytest.raises(ConnectionResetError):
                recv_all(client, timeout=15)
            assert time.monotonic() - started > 2.5  # many ping timeouts passed without a verdict
        assert daemon.wait_for_log("closed (idle timeout (3 s without data))")
        assert "unresponsive" not in daemon.log
    finally:
        daemon.stop(), silent.close()


def test_an_idle_tunnel_with_a_live_peer_survives_many_ping_rounds(tmp_path: Path) -> None:
    echo = TcpServer(echo_handler)
    options = {"ping_interval": 0.2, "ping_timeout": 0.5}
    pair = start_pair(tmp_path, echo.address, frontend_extra=options, backend_extra=options)
    try:
        with socket.create_connection(pair.address(), timeout=10) as client:
            client.sendall(b"a")
            assert recv_exactly(client, 1) == b"a"
            time.sleep(2.5)  # ~10 ping rounds each way
            client.sendall(b"b")
            assert recv_exactly(client, 1) == b"b"
        assert "unresponsive" not in pair.frontend.log + pair.backend.log
    finally:
        pair.frontend.stop(), pair.backend.stop(), echo.close()


def test_backpressure_is_not_death(tmp_path: Path) -> None:
    """The client reads nothing for a while as the target floods: no side may give up on pings."""
    size = 64 * 1024 * 1024
    block = bytes(range(256)) * 4096  # 1 MiB
    expected = hashlib.sha256(block * (size // len(block))).hexdigest()

    def flood(conn: socket.socket) -> None:
        for _ in range(size // len(block)):
            conn.sendall(block)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)

    source = TcpServer(flood)
    options = {"ping_interval": 0.2, "ping_timeout": 0.5}
    pair = start_pair(tmp_path, source.address, frontend_extra=options, backend_extra=options)
    try:
        with socket.create_connection(pair.address(), timeout=10) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            time.sleep(3)  # both pumps are stuck on a full pipe for many ping timeouts
            digest = hashlib.sha256()
            received = 0
            client.settimeout(30)
            while data := client.recv(1 << 20):
                digest.update(data)
                received += len(data)
        assert received == size
        assert digest.hexdigest() == expected
        assert "unresponsive" not in pair.frontend.log + pair.backend.log
    finally:
        pair.frontend.stop(), pair.backend.stop(), source.close()


def test_idle_timeout_resets_a_tunnel_without_data(tmp_path: Path) -> None:
    echo = TcpServer(echo_handler)
    pair = start_pair(tmp_path, echo.address, tunnel_extra={"idle_timeout": 1})
    try:
        with socket.create_connection(pair.address(), timeout=10) as client:
            client.sendall(b"x")
            assert recv_exactly(client, 1) == b"x"
            started = time.monotonic()
            with pytest.raises(ConnectionResetError):
                recv_all(client, timeout=10)
            assert 0.8 < time.monotonic() - started < 6
        assert pair.frontend.wait_for_log("closed (idle timeout (1 s without data))")
    finally:
        pair.frontend.stop(), pair.backend.stop(), echo.close()
