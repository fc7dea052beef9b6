"""Smuggling and malformed requests against a real backend: each is answered 400/414/431 with the
connection closed, and neither the passthrough origin nor a route's target ever sees a byte of it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from bridge import protocol
from tests.gopeer import read_http_body, read_http_head
from tests.helpers import Daemon, TcpServer, backend, echo_handler, free_port, recv_all, write_yaml

BRIDGE_PATH = protocol.BRIDGE_PATH
UPGRADE = (f"GET {BRIDGE_PATH}/default HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n").encode()
#: A second request hidden in a body, for the cases where a reading could take it for one.
HIDDEN = b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"


class RecordingOrigin:
    """A raw HTTP origin: records every byte it receives, answers 200 to each request head it sees."""

    def __init__(self) -> None:
        self.received = bytearray()
        self._lock = threading.Lock()
        self.server = TcpServer(self._handle)

    def _handle(self, conn: socket.socket) -> None:
        seen = bytearray()
        answered = 0
        while data := conn.recv(65536):
            with self._lock:
                self.received += data
            seen += data
            while seen.count(b"\r\n\r\n") > answered:
                answered += 1
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def taken(self) -> bytes:
        with self._lock:
            data = bytes(self.received)
            self.received.clear()
        return data


@pytest.fixture(scope="module")
def origin() -> Iterator[RecordingOrigin]:
    origin = RecordingOrigin()
    yield origin
    origin.server.close()


@pytest.fixture(scope="module")
def target() -> Iterator[TcpServer]:
    server = TcpServer(echo_handler)
    yield server
    server.close()


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory, origin: RecordingOrigin,
             target: TcpServer) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    config = write_yaml(tmp_path_factory.mktemp("smuggling"), "backend.yaml", {"listeners": [{
        "name": "main", "listen": f"127.0.0.1:{port}", "routes": {"default": target.address},
        "passthrough": f"http://127.0.0.1:{origin.server.port}"}]})
    daemon = backend(config, "--log-level", "debug").wait_ready()
    yield daemon, port
    daemon.stop()


def exchange(port: int, request: bytes) -> tuple[int, bool]:
    """Send ``request``; the answer's status, and whether the backend then closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        buffer = bytearray()
        head = read_http_head(sock, buffer)
        read_http_body(sock, head, buffer)
        deadline = time.monotonic() + 5
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                closed = not sock.recv(65536)
            except ConnectionResetError:
                closed = True
        return head.status, closed


CASES = {
    "conflicting Content-Length": (b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: "
                                   + str(5 + len(HIDDEN)).encode() + b"\r\n\r\nhello" + HIDDEN, 400),
    "Content-Length and Transfer-Encoding": (b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: "
                                             + str(5 + len(HIDDEN)).encode()
                                             + b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + HIDDEN, 400),
    "Transfer-Encoding and Content-Length": (b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                                             b"Content-Length: 3\r\n\r\n0\r\n\r\n" + HIDDEN, 400),
    "invalid Content-Length": (b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nhello", 400),
    "obsolete line folding": (b"GET /a HTTP/1.1\r\nHost: h\r\nX-A: b\r\n Transfer-Encoding: chunked\r\n\r\n", 400),
    "bare LF": (b"GET /a HTTP/1.1\nHost: h\nX-A: b\n\n", 400),
    "bare CR": (b"GET /a HTTP/1.1\r\nHost: h\rX-A: b\r\n\r\n", 400),
    "whitespace before a colon": (b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length : 5\r\n\r\nhello", 400),
    "NUL in a value": (b"GET /a HTTP/1.1\r\nHost: h\r\nX-A: b\x00c\r\n\r\n", 400),
    "no Host": (b"GET /a HTTP/1.1\r\nX-A: b\r\n\r\n", 400),
    "two Hosts": (b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "over-long request line": (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414),
    "over-long header line": (b"GET /a HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
    "10k headers": (b"GET /a HTTP/1.1\r\nHost: h\r\n" + b"X-A: b\r\n" * 10000 + b"\r\n", 431),
}


@pytest.mark.parametrize("case", CASES)
def test_passthrough_request_is_refused_and_never_reaches_the_origin(
        listener: tuple[Daemon, int], origin: RecordingOrigin, case: str) -> None:
    request, status = CASES[case]
    _, port = listener
    origin.taken()
    assert exchange(port, request) == (status, True)
    assert origin.taken() == b""


@pytest.mark.parametrize("case", ["Content-Length and Transfer-Encoding", "obsolete line folding", "bare LF"])
def test_bridge_upgrade_is_refused_and_the_target_is_never_dialled(
        listener: tuple[Daemon, int], target: TcpServer, case: str) -> None:
    _, port = listener
    smuggled = {
        "Content-Length and Transfer-Encoding": b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        "obsolete line folding": b"X-A: b\r\n c\r\n\r\n",
        "bare LF": b"X-A: b\n\r\n",
    }[case]
    dialled = len(target.connections)
    assert exchange(port, UPGRADE + smuggled) == (400, True)
    assert len(target.connections) == dialled


def test_the_well_formed_request_in_the_table_passes(listener: tuple[Daemon, int], origin: RecordingOrigin) -> None:
    """The control row: the same listener passes a clean request on, so the refusals above are its rules."""
    _, port = listener
    origin.taken()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
        buffer = bytearray()
        head = read_http_head(sock, buffer)
        assert (head.status, read_http_body(sock, head, buffer)) == (200, b"ok")
    deadline = time.monotonic() + 5
    while b"hello" not in (seen := origin.received) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert bytes(seen).startswith(b"POST /a HTTP/1.1\r\n") and bytes(seen).endswith(b"hello")


ANSWERS = {
    "conflicting Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    "Content-Length not a number": b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\nab",
    "a transfer coding other than chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nab",
    "not HTTP": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
}


def serve_once(tmp_path_factory: pytest.TempPathFactory, answer: bytes) -> tuple[Daemon, int, TcpServer]:
    """A backend whose passthrough origin answers every request with ``answer``, then waits."""
    def reply(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(answer)
        time.sleep(0.5)

    origin = TcpServer(reply)
    port = free_port()
    config = write_yaml(tmp_path_factory.mktemp("answers"), "backend.yaml", {"listeners": [{
        "name": "main", "listen": f"127.0.0.1:{port}", "routes": {"default": "127.0.0.1:9"},
        "passthrough": f"http://127.0.0.1:{origin.port}"}]})
    return backend(config, "--log-level", "debug").wait_ready(), port, origin


@pytest.mark.parametrize("case", ANSWERS)
def test_an_answer_head_the_origin_frames_ambiguously_is_a_502(tmp_path_factory: pytest.TempPathFactory,
                                                               case: str) -> None:
    """The other direction of a desync: h11 frames the origin's answer, and one it cannot frame never
    reaches the client."""
    daemon, port, origin = serve_once(tmp_path_factory, ANSWERS[case])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
            buffer = bytearray()
            head = read_http_head(sock, buffer)
            body = read_http_body(sock, head, buffer)
            assert head.status == 502, (head.status, body)
            assert b"bad answer" in body
    finally:
        daemon.stop()
        origin.close()


def test_a_body_the_origin_frames_badly_is_cut_short_never_completed(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Once the head went out, a malformed chunk can only end the client's connection: its chunked body
    never gets the last chunk, so no client takes it for a whole answer."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\nzz\r\ncd\r\n0\r\n\r\n"
    daemon, port, origin = serve_once(tmp_path_factory, answer)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
            buffer = bytearray()
            head = read_http_head(sock, buffer)
            rest = bytes(buffer) + recv_all(sock, timeout=10)
        assert head.status == 200 and head.get("Transfer-Encoding") == "chunked"
        assert rest == b"2\r\nab\r\n"  # the good chunk, then the end of the connection: no last chunk
        assert daemon.wait_for_log("answer body failed")
    finally:
        daemon.stop()
        origin.close()
