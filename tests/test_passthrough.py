"""HTTP passthrough on the backend: everything that is not a bridge upgrade goes to an HTTP origin.

A real origin (a stdlib ThreadingHTTPServer written here: it echoes what it got,
streams large and chunked bodies, and has a websocket and a raw Upgrade
endpoint) behind a real backend process, reached by real clients: curl,
http.client, websocket-client and raw sockets. Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import websocket

from tests.gopeer import (
    GoCloseError,
    GoWebsocket,
    go_frontend,
    go_frontend_request,
    new_key,
    read_http_body,
    read_http_head,
)
from tests.helpers import (
    Daemon,
    TcpServer,
    backend,
    free_port,
    pattern,
    recv_all,
    send_then_shutdown,
    wait_until,
    write_yaml,
)

MIB = 1024 * 1024
BIG = 64 * MIB
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# ---------------------------------------------------------------------------
# The origin


def read_request_body(handler: BaseHTTPRequestHandler) -> Iterator[bytes]:
    """The request body in pieces: Content-Length or chunked (trailers skipped)."""
    if "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower():
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return
            while size:
                data = handler.rfile.read(min(size, MIB))
                assert data
                size -= len(data)
                yield data
            handler.rfile.readline()
        return
    left = int(handler.headers.get("Content-Length") or 0)
    while left:
        data = handler.rfile.read(min(left, MIB))
        assert data
        left -= len(data)
        yield data


class OriginHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Origin

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def handle_one_request(self) -> None:
        """Every method, known or not, lands in :meth:`serve`."""
        self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline:
            self.close_connection = True
            return
        if not self.parse_request():
            return
        self.serve()
        self.wfile.flush()

    def serve(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/reject":  # answers at once, without reading the body, and hangs up
            self.send_response(413)
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            return None
        digest = hashlib.sha256()
        length = 0
        for piece in read_request_body(self):
            digest.update(piece)
            length += len(piece)
        seen = {"method": self.command, "path": self.path, "headers": list(self.headers.items()),
                "length": length, "sha256": digest.hexdigest(), "version": self.request_version}
        with self.server.lock:
            self.server.seen.append(seen)
        if url.path == "/ws/echo":
            return self.websocket_echo()
        if url.path == "/raw":
            return self.raw_echo()
        if url.path == "/download":
            return self.download(int(query["size"][0]), chunked="chunked" in query)
        if url.path == "/hop":
            body = b"hop\n"
            self.send_response(200)
            for name, value in [("Connection", "X-Origin-Hop"), ("X-Origin-Hop", "1"), ("Keep-Alive", "timeout=5"),
                                ("Proxy-Authenticate", "Basic"), ("Trailer", "X-Nothing"), ("X-End-To-End", "yes"),
                                ("Content-Length", str(len(body)))]:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
            return None
        body = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return None

    def download(self, size: int, *, chunked: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "X-Checksum")
        else:
            self.send_header("Content-Length", str(size))
        self.end_headers()
        block = pattern(MIB)  # pattern() repeats every 256 bytes, so blocks join seamlessly
        left = size
        while left:
            data = block[:min(left, MIB)]
            self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
            left -= len(data)
        if chunked:
            checksum = hashlib.sha256(pattern(size)).hexdigest() if size <= 16 * MIB else "big"
            self.wfile.write(f"0\r\nX-Checksum: {checksum}\r\n\r\n".encode())

    def switch(self, protocol: str, extra: list[tuple[str, str]]) -> None:
        self.send_response(101)
        self.send_header("Upgrade", protocol)
        self.send_header("Connection", "Upgrade")
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True

    def websocket_echo(self) -> None:
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1(key.encode() + WEBSOCKET_GUID).digest()).decode()
        self.switch("websocket", [("Sec-WebSocket-Accept", accept)])
        ws = GoWebsocket(self.connection, is_server=True)  # the client waits for the 101: nothing is buffered
        with contextlib.suppress(GoCloseError, EOFError, OSError, TimeoutError):
            while True:
                opcode, payload = ws.read_message(timeout=20)
                ws.send_frame(opcode, payload)

    def raw_echo(self) -> None:
        """Upgrade: rawecho — echo bytes until EOF, then half-close."""
        self.switch("rawecho", [])
        sock = self.connection
        sock.settimeout(20)
        with contextlib.suppress(OSError):  # a test may reset the spliced connection
            while data := sock.recv(65536):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)


class Origin(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), OriginHandler)
        self.lock = threading.Lock()
        self.seen: list[dict[str, Any]] = []
        self.connections = 0
        self.port = int(self.server_address[1])
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def last(self) -> dict[str, Any]:
        with self.lock:
            return self.seen[-1]

    def last_to(self, path: str) -> dict[str, Any]:
        """The latest request for ``path`` (a pipelined request after it may already have arrived)."""
        with self.lock:
            return next(seen for seen in reversed(self.seen) if seen["path"] == path)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def curl() -> str:
    """curl, installed with apt-get if missing (skip, saying why, if that fails)."""
    found = shutil.which("curl")
    if found:
        return found
    try:
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "curl"],
                       check=True, capture_output=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"curl is not installed and apt-get could not install it: {exc}")
    found = shutil.which("curl")
    if not found:
        pytest.skip("curl is not installed and apt-get did not provide it")
    return found


def start_backend(tmp_path: Path, passthrough: str, routes: dict[str, str] | None = None,
                  **listener: Any) -> tuple[Daemon, int]:
    port = free_port()
    config = write_yaml(tmp_path, "backend.yaml", {"listeners": [{
        "name": "main", "listen": f"127.0.0.1:{port}", "routes": routes or {"default": "127.0.0.1:9"},
        "passthrough": passthrough, **listener}]})
    return backend(config, "--log-level", "debug").wait_ready(), port


@pytest.fixture
def proxied(tmp_path: Path, origin: Origin, echo: TcpServer) -> Iterator[tuple[Daemon, int]]:
    """A backend whose default route leads to an echo server and whose passthrough leads to the origin."""
    daemon, port = start_backend(tmp_path, f"http://127.0.0.1:{origin.port}", {"default": echo.address})
    yield daemon, port
    daemon.stop()


def header(headers: list[list[str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name.lower()]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@contextlib.contextmanager
def peak_rss(pid: int) -> Iterator[list[int]]:
    """Sample the process's RSS every 20 ms; yields a list whose one element becomes the peak (KiB)."""
    peak = [rss_kib(pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            with contextlib.suppress(OSError, AssertionError):
                peak[0] = max(peak[0], rss_kib(pid))
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join(5)


# ---------------------------------------------------------------------------
# Ordinary requests


METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "BREW"]


def test_every_method_passes_through_on_one_kept_alive_connection(proxied: tuple[Daemon, int],
                                                                   origin: Origin) -> None:
    daemon, port = proxied
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.connect()
    first_sock = conn.sock
    for method in METHODS:
        body = f"body of {method}".encode() if method not in ("GET", "HEAD") else None
        conn.request(method, f"/echo/{method.lower()}?q=1", body=body, headers={"Host": "app.example:8443"})
        response = conn.getresponse()
        data = response.read()
        assert response.status == 200, (method, data)
        seen = origin.last()
        assert seen["method"] == method
        assert seen["path"] == f"/echo/{method.lower()}?q=1"
        assert seen["length"] == (len(body) if body else 0)
        assert header(seen["headers"], "Host") == ["app.example:8443"]  # as the client sent it, like Go
        assert header(seen["headers"], "X-Forwarded-For") == ["127.0.0.1"]
        assert header(seen["headers"], "X-Forwarded-Proto") == ["http"]
        assert header(seen["headers"], "X-Forwarded-Host") == ["app.example:8443"]
        if method == "HEAD":
            assert data == b""
            assert int(response.getheader("Content-Length") or 0) > 0
        else:
            assert json.loads(data)["method"] == method
    assert conn.sock is first_sock, "the client connection was kept alive throughout"
    conn.close()
    assert origin.connections <= 2, "the backend reuses its connections to the origin"
    assert "not a tcpbridge upgrade" not in daemon.log


def test_hop_by_hop_headers_are_dropped_both_ways(proxied: tuple[Daemon, int], origin: Origin) -> None:
    _, port = proxied
    request = (b"GET /echo HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Client-Hop\r\nX-Client-Hop: 1\r\n"
               b"Keep-Alive: 300\r\nProxy-Authorization: Basic eA==\r\nProxy-Connection: keep-alive\r\n"
               b"TE: trailers, deflate\r\nTrailer: X-Foo\r\nX-Forwarded-For: 203.0.113.9\r\n"
               b"X-Forwarded-Proto: https\r\nX-End-To-End: kept\r\n\r\n"
               b"GET /hop HTTP/1.1\r\nHost: h\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        buffer = bytearray()
        first = read_http_head(sock, buffer)
        read_http_body(sock, first, buffer)
        seen = origin.last_to("/echo")
        names = {name.lower() for name, _ in seen["headers"]}
        for dropped in ("connection", "x-client-hop", "keep-alive", "proxy-authorization", "proxy-connection",
                        "trailer", "upgrade", "transfer-encoding"):
            assert dropped not in names, dropped
        assert header(seen["headers"], "TE") == ["trailers"]
        assert header(seen["headers"], "X-End-To-End") == ["kept"]
        assert header(seen["headers"], "X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"]  # appended
        assert header(seen["headers"], "X-Forwarded-Proto") == ["https"]  # an upstream proxy's value is kept
        hop = read_http_head(sock, buffer)
        assert read_http_body(sock, hop, buffer) == b"hop\n"
        assert hop.status == 200
        for dropped in ("Connection", "X-Origin-Hop", "Keep-Alive", "Proxy-Authenticate", "Trailer"):
            assert not hop.has(dropped), dropped
        assert hop.get("X-End-To-End") == "yes"


def test_chunked_both_ways_with_trailers(proxied: tuple[Daemon, int], origin: Origin) -> None:
    _, port = proxied
    data = pattern(3 * MIB + 17)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    pieces = [data[i:i + 100_000] for i in range(0, len(data), 100_000)]
    conn.request("POST", "/upload", body=iter(pieces), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    response = conn.getresponse()
    seen = json.loads(response.read())
    assert response.status == 200
    assert seen["length"] == len(data)
    assert seen["sha256"] == hashlib.sha256(data).hexdigest()
    assert header(seen["headers"], "Transfer-Encoding") == ["chunked"]
    conn.close()
    # A chunked answer stays chunked, trailers included (raw socket: http.client drops trailers).
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /download?size=1000000&chunked=1 HTTP/1.1\r\nHost: h\r\nTE: trailers\r\n"
                     b"Connection: close\r\n\r\n")
        raw = recv_all(sock, timeout=20)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    decoded, rest = bytearray(), body
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        decoded += rest[:size]
        rest = rest[size + 2:]
    assert bytes(decoded) == pattern(1000000)
    assert f"X-Checksum: {hashlib.sha256(pattern(1000000)).hexdigest()}".encode() in rest


def test_a_request_pipelined_after_a_chunked_body_is_served_next(proxied: tuple[Daemon, int], origin: Origin) -> None:
    """The request body is framed by h11 and read no further than its last chunk and trailers: a request
    sent in the same packet right after it is the next request, not part of the body."""
    _, port = proxied
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /first HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n\r\n" + body
                     + b"GET /second HTTP/1.1\r\nHost: h\r\n\r\n")
        buffer = bytearray()
        statuses = []
        for _ in range(2):
            head = read_http_head(sock, buffer)
            read_http_body(sock, head, buffer)  # the origin's JSON, with a Content-Length
            statuses.append(head.status)
    assert statuses == [200, 200]
    first, second = origin.last_to("/first"), origin.last_to("/second")
    assert (first["length"], first["sha256"]) == (11, hashlib.sha256(b"hello world").hexdigest())
    assert second["method"] == "GET" and second["length"] == 0


def test_64_mib_upload_and_download_stream_with_bounded_memory(proxied: tuple[Daemon, int]) -> None:
    daemon, port = proxied
    data_sha = hashlib.sha256(pattern(BIG)).hexdigest()
    block = pattern(MIB)
    baseline = rss_kib(daemon.pid)
    with peak_rss(daemon.pid) as peak:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for chunked in (False, True):  # Content-Length, then chunked
            headers = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(BIG)}
            conn.request("PUT", "/upload", body=(block for _ in range(BIG // MIB)), encode_chunked=chunked,
                         headers=headers)
            response = conn.getresponse()
            seen = json.loads(response.read())
            assert (seen["length"], seen["sha256"]) == (BIG, data_sha)
            for suffix in ("", "&chunked=1"):
                conn.request("GET", f"/download?size={BIG}{suffix}")
                response = conn.getresponse()
                digest, got = hashlib.sha256(), 0
                while piece := response.read(MIB):
                    digest.update(piece)
                    got += len(piece)
                assert (got, digest.hexdigest()) == (BIG, data_sha), suffix
        conn.close()
    growth = (peak[0] - baseline) / 1024
    print(f"RSS baseline {baseline / 1024:.1f} MiB, peak {peak[0] / 1024:.1f} MiB")
    assert growth < 64, f"backend RSS grew by {growth:.1f} MiB while 4 x 64 MiB crossed it"


def test_origin_down_is_a_502_naming_it(tmp_path: Path) -> None:
    dead = free_port()
    daemon, port = start_backend(tmp_path, f"http://127.0.0.1:{dead}")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(2):  # the client's connection stays usable
            conn.request("GET", "/tree?token=x")
            response = conn.getresponse()
            body = response.read().decode()
            assert response.status == 502
            assert f"http://127.0.0.1:{dead}" in body
            assert "connection refused" in body
        conn.close()
        assert wait_until(lambda: daemon.log.count("502") >= 2)
        warnings = [line for line in daemon.log.splitlines() if "WARNING" in line and "passthrough" in line]
        assert len(warnings) == 2, warnings  # one per failed request
        assert "token=x" not in daemon.log  # the query (which may carry secrets) is not logged
    finally:
        daemon.stop()


def test_a_refused_upload_gets_its_answer_and_the_rest_is_not_a_request(tmp_path: Path, origin: Origin) -> None:
    """Origin down, or answering before reading the body: the client gets the answer, then the connection closes."""
    dead = free_port()
    for url, status in ((f"http://127.0.0.1:{dead}", 502), (f"http://127.0.0.1:{origin.port}", 413)):
        daemon, port = start_backend(tmp_path, url)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                body = b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n" * 20000  # 760 KB that must not be parsed
                sock.sendall(f"POST /reject HTTP/1.1\r\nHost: h\r\nContent-Length: {len(body)}\r\n\r\n".encode())
                sender = send_then_shutdown(sock, body)
                buffer = bytearray()
                head = read_http_head(sock, buffer, timeout=10)
                assert head.status == status
                read_http_body(sock, head, buffer)
                assert recv_all(sock, timeout=10) == b""  # closed, nothing more
                sender.join(10)
            assert not any(seen["path"] == "/smuggled" for seen in origin.seen)
        finally:
            daemon.stop()


def test_connect_timeout_is_the_listeners(tmp_path: Path) -> None:
    """A host that does not answer SYNs is not available on loopback; an unresolvable name fails fast instead."""
    daemon, port = start_backend(tmp_path, "http://nonexistent.invalid:8888", connect_timeout=2)
    try:
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 502
        assert "nonexistent.invalid" in response.read().decode()
        assert time.monotonic() - started < 8
    finally:
        daemon.stop()


# ---------------------------------------------------------------------------
# Upgrades


def test_websocket_upgrade_on_another_path_is_spliced_to_the_origin(proxied: tuple[Daemon, int]) -> None:
    _, port = proxied
    ws = websocket.WebSocket()
    ws.connect(f"ws://127.0.0.1:{port}/ws/echo", timeout=10)
    try:
        for message in ["hello", "é" * 1000]:
            ws.send(message)
            assert ws.recv() == message
        big = pattern(2 * MIB)
        ws.send_binary(big)
        assert ws.recv() == big
    finally:
        ws.close()


def test_raw_upgrade_is_spliced_with_half_close(proxied: tuple[Daemon, int]) -> None:
    _, port = proxied
    data = pattern(5 * MIB)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /raw HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: rawecho\r\n\r\n")
        buffer = bytearray()
        head = read_http_head(sock, buffer)
        assert head.status == 101
        assert head.get("Upgrade") == "rawecho"
        sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)), daemon=True)
        sender.start()
        echoed = bytes(buffer) + recv_all(sock, timeout=30)  # EOF only after the origin saw ours
        sender.join(10)
    assert echoed == data


def test_a_spliced_upgrade_is_a_tunnel_with_the_listeners_idle_timeout(tmp_path: Path, origin: Origin,
                                                                      echo: TcpServer) -> None:
    """One pump: the spliced connection is logged and counted as a tunnel of ``main/(passthrough)``, and the
    listener's idle_timeout resets it (a RST to the client, never a FIN that would look like a clean end)."""
    daemon, port = start_backend(tmp_path, f"http://127.0.0.1:{origin.port}", {"default": echo.address},
                                 idle_timeout=1)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /raw HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: rawecho\r\n\r\n")
            buffer = bytearray()
            assert read_http_head(sock, buffer).status == 101
            sock.sendall(b"ping")
            while len(buffer) < 4:
                buffer += sock.recv(4 - len(buffer))
            assert bytes(buffer) == b"ping"
            assert daemon.wait_for_log("[main/(passthrough)] open")
            started = time.monotonic()
            with pytest.raises(ConnectionResetError):
                while sock.recv(65536):
                    pass
            assert time.monotonic() - started < 8
        assert daemon.wait_for_log("idle timeout (1 s without data)")
    finally:
        daemon.stop()


def test_bridge_upgrade_after_passthrough_requests_on_one_connection(proxied: tuple[Daemon, int],
                                                                     origin: Origin) -> None:
    _, port = proxied
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        buffer = bytearray()
        for index in range(2):
            sock.sendall(f"GET /echo/{index} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            head = read_http_head(sock, buffer)
            assert head.status == 200
            assert json.loads(read_http_body(sock, head, buffer))["path"] == f"/echo/{index}"
        sock.sendall(go_frontend_request(f"127.0.0.1:{port}", new_key()))
        head = read_http_head(sock, buffer)
        assert head.status == 101
        ws = GoWebsocket(sock, is_server=False, buffered=bytes(buffer))
        ws.write(b"through the tunnel")
        assert ws.read_exactly(len(b"through the tunnel")) == b"through the tunnel"
    assert len(origin.seen) == 2  # the upgrade did not reach the origin


def test_bridge_upgrades_keep_their_checks_and_passthrough_is_unauthenticated(
        tmp_path: Path, origin: Origin, echo: TcpServer) -> None:
    daemon, port = start_backend(tmp_path, f"http://127.0.0.1:{origin.port}", {"default": echo.address},
                                 token="s3cret-token")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/anything")
        assert conn.getresponse().status == 200  # no token needed: as in Go
        conn.close()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(go_frontend_request(f"127.0.0.1:{port}", new_key()))
            head = read_http_head(sock, bytearray())
            assert head.status == 401
        assert not echo.connections
    finally:
        daemon.stop()


def test_header_limit_applies_to_passthrough(proxied: tuple[Daemon, int], origin: Origin) -> None:
    _, port = proxied
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        head = read_http_head(sock, bytearray())
    assert head.status == 431
    assert not origin.seen


def test_handshake_timeout_applies_to_passthrough(origin: Origin, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, with the 30 s handshake timeout shortened: a request that never completes is dropped."""
    from bridge import frontdoor
    from bridge.config import Address, Listener
    from bridge.listen import bind_listener
    from bridge.registry import TunnelRegistry

    monkeypatch.setattr(frontdoor.BridgeRequestHandler, "timeout", 1.0)  # each read
    monkeypatch.setattr(frontdoor, "HANDSHAKE_TIMEOUT", 1.0)  # the whole request line and headers, if bounded
    listener = Listener(name="main", listen=Address("127.0.0.1", 0), routes={"default": Address("127.0.0.1", 9)},
                        passthrough=f"http://127.0.0.1:{origin.port}")
    server = frontdoor.ListenerServer(listener, TunnelRegistry(), bind_listener(listener.listen, "test"))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    try:
        port = server.server_address[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /echo HTTP/1.1\r\nHost: h\r\n")  # no blank line: never complete
            started = time.monotonic()
            assert recv_all(sock, timeout=10) == b""
            assert time.monotonic() - started < 5
        # and an idle kept-alive connection is closed the same way after a passthrough request
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /echo HTTP/1.1\r\nHost: h\r\n\r\n")
            buffer = bytearray()
            head = read_http_head(sock, buffer)
            read_http_body(sock, head, buffer)
            started = time.monotonic()
            assert recv_all(sock, timeout=10) == b""
            assert time.monotonic() - started < 5
        assert len(origin.seen) == 1
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------
# Go-compatible flags, curl


def test_go_flags_serve_a_tunnel_and_passthrough_on_one_port(origin: Origin) -> None:
    """``--backend-port T`` is both the tunnel's target and the passthrough origin, as in Go."""
    port = free_port()
    daemon = backend(None, "--frontend-port", str(port), "--backend-port", str(origin.port)).wait_ready()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/echo/direct")
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["path"] == "/echo/direct"
        conn.close()
        with go_frontend(port) as ws:  # a tunnel to the same port: HTTP spoken through it by hand
            ws.write(b"GET /echo/tunnelled HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            received = b""
            deadline = time.monotonic() + 10
            while b"/echo/tunnelled" not in received and time.monotonic() < deadline:
                received += ws.read(timeout=10)
            assert received.startswith(b"HTTP/1.1 200 ")
        seen = origin.last()
        assert seen["path"] == "/echo/tunnelled"
        assert not header(seen["headers"], "X-Forwarded-For")  # raw bytes through the tunnel, untouched
    finally:
        daemon.stop()


def test_curl(proxied: tuple[Daemon, int], origin: Origin, curl: str, tmp_path: Path) -> None:
    _, port = proxied
    base = f"http://127.0.0.1:{port}"
    upload = tmp_path / "upload.bin"
    upload.write_bytes(pattern(8 * MIB + 3))

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([curl, "-sS", "--max-time", "60", *args], capture_output=True, timeout=90, check=True)

    # an upload with Expect: 100-continue (curl's default for large bodies), then a chunked one
    for extra in ([], ["-H", "Transfer-Encoding: chunked"]):
        seen = json.loads(run("-X", "PUT", "--data-binary", f"@{upload}", *extra, f"{base}/upload").stdout)
        assert seen["length"] == 8 * MIB + 3
        assert seen["sha256"] == hashlib.sha256(upload.read_bytes()).hexdigest()
    # a download, chunked and not
    for suffix in ("", "&chunked=1"):
        body = run(f"{base}/download?size={5 * MIB}{suffix}").stdout
        assert hashlib.sha256(body).digest() == hashlib.sha256(pattern(5 * MIB)).digest()
    # HEAD, DELETE
    assert b"HTTP/1.1 200" in run("-I", f"{base}/echo").stdout
    assert json.loads(run("-X", "DELETE", f"{base}/echo/x").stdout)["method"] == "DELETE"
    # several URLs in one run reuse one connection
    result = run("-v", f"{base}/echo/1", f"{base}/echo/2", f"{base}/echo/3")
    assert result.stderr.count(b"Connected to") == 1, result.stderr.decode()
    assert [seen["path"] for seen in origin.seen[-3:]] == ["/echo/1", "/echo/2", "/echo/3"]


def test_without_passthrough_it_is_still_a_404(tmp_path: Path, echo: TcpServer) -> None:
    port = free_port()
    config = write_yaml(tmp_path, "backend.yaml", {"listeners": [{
        "name": "main", "listen": f"127.0.0.1:{port}", "routes": {"default": echo.address}}]})
    daemon = backend(config).wait_ready()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"BREW /pot HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            assert recv_all(sock).startswith(b"HTTP/1.1 501 ")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            assert recv_all(sock).startswith(b"HTTP/1.1 404 ")
    finally:
        daemon.stop()



def test_concurrent_clients_share_the_origin_pool(proxied: tuple[Daemon, int], origin: Origin) -> None:
    _, port = proxied
    failures: list[str] = []

    def client(index: int) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
            for round_ in range(5):
                body = f"{index}-{round_}".encode() * 1000
                conn.request("POST", f"/echo/{index}/{round_}", body=body)
                response = conn.getresponse()
                seen = json.loads(response.read())
                if (seen["path"], seen["length"]) != (f"/echo/{index}/{round_}", len(body)):
                    failures.append(f"{index}/{round_}: {seen['path']} {seen['length']}")
            conn.close()
        except Exception as exc:  # reported below
            failures.append(f"{index}: {exc!r}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    assert len(origin.seen) == 100
    assert origin.connections < 100  # connections were reused


@pytest.mark.parametrize(("value", "problem"), [
    ("https://127.0.0.1:8888", "only http://"),
    ("127.0.0.1:8888", "only http://"),
    ("http://127.0.0.1:8888/app", "requests keep their own path"),
    ("http://user:pw@127.0.0.1:8888", "user info"),
    ("http://127.0.0.1:99999", "out of range"),
    (8888, "expected an http://host:port URL"),
])
def test_passthrough_urls_are_validated(value: object, problem: str) -> None:
    from bridge.config import ConfigError, parse_backend

    with pytest.raises(ConfigError) as error:
        parse_backend({"listeners": [{"name": "m", "listen": 8080, "routes": {"default": 22},
                                      "passthrough": value}]})
    assert problem in str(error.value)
    assert "passthrough" in str(error.value)


def test_passthrough_urls_are_normalised() -> None:
    from bridge.config import parse_backend

    for value, expected in [("http://localhost", "http://localhost:80"), ("http://[::1]:8888/", "http://[::1]:8888"),
                            ("http://127.0.0.1:8888", "http://127.0.0.1:8888")]:
        config = parse_backend({"listeners": [{"name": "m", "listen": 8080, "routes": {"default": 22},
                                               "passthrough": value}]})
        assert config.listeners[0].passthrough == expected
