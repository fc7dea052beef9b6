"""Backend access control and limits: tokens, allowed Origins, tunnel caps, header size.

Real daemons as processes; the client is a raw socket speaking HTTP and websocket
frames by hand, so every byte of the request is ours (non-ASCII tokens, oversized
header blocks, malformed request lines). Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.protocol import BRIDGE_PATH
from tests.helpers import (
    Daemon,
    TcpServer,
    backend,
    free_port,
    frontend,
    recv_exactly,
    running,
    wait_until,
    write_yaml,
)

KEY = base64.b64encode(b"0123456789abcdef").decode()
LISTENER_TOKEN = "listener-Tok3n-4f1c2a"
ROUTE_TOKEN = "route-Tok3n-9b7e5d"


def start_backend(tmp_path: Path, listener: dict[str, Any], *, level: str = "debug",
                  name: str = "backend.yaml") -> tuple[Daemon, int, Path]:
    """A backend with one listener ``main`` (``listener`` gives its routes and keys) at debug level."""
    port = free_port()
    config = write_yaml(tmp_path, name, {
        "drain_timeout": 0.5, "listeners": [{"name": "main", "listen": f"127.0.0.1:{port}", **listener}]})
    return backend(config, "--log-level", level).wait_ready(), port, config


@dataclass
class Answer:
    status: int
    head: str
    body: str
    sock: socket.socket

    def header(self, name: str) -> str | None:
        for line in self.head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


def request(port: int, route: str = "", headers: list[bytes] | None = None, *,
            request_line: bytes | None = None) -> Answer:
    """Send an upgrade request with ``headers`` (raw lines) and read the answer's head and body.

    On a 101 the socket stays open (a live tunnel); otherwise it is closed.
    """
    path = BRIDGE_PATH + (f"/{route}" if route else "")
    lines = [
        request_line or f"GET {path} HTTP/1.1".encode(),
        b"Host: 127.0.0.1",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Version: 13",
        f"Sec-WebSocket-Key: {KEY}".encode(),
        *(headers or []),
    ]
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    text = head.decode("latin-1")
    status = int(text.split(" ", 2)[1]) if text.startswith("HTTP/1.1 ") else 0
    answer = Answer(status, text, "", sock)
    if status == 101:
        return answer
    length = int(answer.header("Content-Length") or 0)
    body = rest + (recv_exactly(sock, length - len(rest)) if length > len(rest) else b"")
    answer.body = body.decode("utf-8", "replace")
    sock.close()
    return answer


def token(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return b"X-Tcpbridge-Token: " + raw


def masked_text(payload: bytes) -> bytes:
    mask = b"\x11\x22\x33\x44"
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def assert_echoes(answer: Answer) -> None:
    """The tunnel behind a 101 carries bytes to the echo target and back."""
    assert answer.status == 101, answer.head
    answer.sock.sendall(masked_text(b"6869"))  # "hi"
    assert recv_exactly(answer.sock, 6, timeout=10) == b"\x81\x046869"


def close_tunnel(answer: Answer) -> None:
    """End a live tunnel with a close frame (1000)."""
    mask = b"\x01\x02\x03\x04"
    payload = struct.pack("!H", 1000)
    answer.sock.sendall(bytes([0x88, 0x80 | len(payload)]) + mask
                        + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    answer.sock.close()


def log_lines(daemon: Daemon, predicate: Callable[[str], bool], expected: int) -> list[str]:
    """The daemon's log lines matching ``predicate``, once at least ``expected`` have been read (10 s at most).

    A daemon logs a refusal before it answers, but our reader of its stderr may lag behind.
    """
    def matching() -> list[str]:
        return [line for line in daemon.log.splitlines() if predicate(line)]
    wait_until(lambda: len(matching()) >= expected, 10)
    return matching()


def refused_lines(daemon: Daemon, status: int, expected: int) -> list[str]:
    return log_lines(daemon, lambda line: ": refused 127.0.0.1:" in line and f": {status} " in line, expected)


# ---------------------------------------------------------------------------
# Tokens


def test_listener_token_missing_wrong_and_right(tmp_path: Path, echo: TcpServer) -> None:
    daemon, port, _ = start_backend(tmp_path, {"token": LISTENER_TOKEN, "routes": {"default": echo.address}})
    with running(daemon):
        missing = request(port)
        assert missing.status == 401
        assert missing.header("Content-Type") == "text/plain; charset=utf-8"
        assert "missing X-Tcpbridge-Token" in missing.body
        wrong = request(port, headers=[token("nope")])
        assert wrong.status == 403
        assert "wrong X-Tcpbridge-Token" in wrong.body
        assert not echo.connections, "a refused upgrade must not dial the target"
        assert_echoes(request(port, headers=[token(LISTENER_TOKEN)]))
        warnings = log_lines(daemon, lambda line: " WARNING " in line and "refused" in line, 2)
        assert len(warnings) == 2, warnings
        assert "401 missing X-Tcpbridge-Token header" in warnings[0]
        assert "403 wrong X-Tcpbridge-Token" in warnings[1]
        assert "the listener's token" in warnings[1]


def test_a_routes_own_token_overrides_the_listeners(tmp_path: Path, echo: TcpServer) -> None:
    daemon, port, _ = start_backend(tmp_path, {"token": LISTENER_TOKEN, "routes": {
        "default": echo.address,
        "db": {"target": echo.address, "token": ROUTE_TOKEN},
    }})
    with running(daemon):
        assert request(port, "db").status == 401
        assert request(port, "db", [token(LISTENER_TOKEN)]).status == 403
        assert request(port, "", [token(ROUTE_TOKEN)]).status == 403
        assert_echoes(request(port, "db", [token(ROUTE_TOKEN)]))
        assert_echoes(request(port, "", [token(LISTENER_TOKEN)]))
        assert daemon.wait_for_log("route 'db' requires its own token")
        assert daemon.wait_for_log("route 'default' requires the listener's token")


def test_a_route_token_without_a_listener_token_guards_only_that_route(tmp_path: Path, echo: TcpServer) -> None:
    daemon, port, _ = start_backend(tmp_path, {"routes": {
        "default": echo.address,
        "db": {"target": echo.address, "token": ROUTE_TOKEN, "max_tunnels": 0},
    }})
    with running(daemon):
        assert request(port, "db").status == 401
        assert_echoes(request(port, "db", [token(ROUTE_TOKEN)]))
        assert_echoes(request(port))


def test_a_token_file_is_reread_for_every_connection(tmp_path: Path, echo: TcpServer) -> None:
    secret = tmp_path / "token"
    secret.write_text("first-token-1a2b\n")
    daemon, port, _ = start_backend(tmp_path, {"token": {"file": str(secret)}, "routes": {"default": echo.address}})
    with running(daemon):
        assert_echoes(request(port, headers=[token("first-token-1a2b")]))
        secret.write_text("second-token-3c4d\n")  # rotated between two connections
        assert request(port, headers=[token("first-token-1a2b")]).status == 403
        assert_echoes(request(port, headers=[token("second-token-3c4d")]))
        secret.unlink()
        gone = request(port, headers=[token("second-token-3c4d")])
        assert gone.status == 503
        assert str(secret) not in gone.body, "the body does not tell the client where the token lives"
        errors = log_lines(daemon, lambda line: " ERROR " in line, 1)
        assert len(errors) == 1, errors
        assert ": 503 cannot check X-Tcpbridge-Token" in errors[0]
        assert f"cannot read file {secret}" in errors[0]
        assert len(echo.connections) == 2


def test_near_misses_are_refused_and_nothing_breaks_the_comparison(tmp_path: Path, echo: TcpServer) -> None:
    """Behaviour of a constant-time bytes comparison: only the exact bytes pass, and no input is an error."""
    right = "s3cret-ünïcode-token"
    daemon, port, _ = start_backend(tmp_path, {"token": right, "routes": {"default": echo.address}})
    near_misses = [
        right[:-1],                       # a prefix
        right + "x",                      # an extension
        right[:-1] + "m",                 # same length, last byte differs
        "S" + right[1:],                  # case
        "x" * len(right.encode()),        # same byte length, all wrong
        right.encode().decode("latin-1"),  # the right bytes re-encoded: not the same bytes
    ]
    with running(daemon):
        for miss in near_misses:
            assert request(port, headers=[token(miss)]).status == 403, miss
        for raw in (b"\xff\xfeinvalid", b"s3cret-\xfcn\xefcode-token", b"\x80" * 5000):
            assert request(port, headers=[token(raw)]).status == 403, raw
        # A control character is no header value at all: refused before the token is compared.
        assert request(port, headers=[token(b"\xff\xfe\x00invalid")]).status == 400
        assert request(port, headers=[b"X-Tcpbridge-Token:   "]).status == 401  # empty is missing
        assert request(port, headers=[token(right), token(right)]).status == 400  # two of them
        assert_echoes(request(port, headers=[token(right)]))  # the UTF-8 bytes of the secret pass
        assert_echoes(request(port, headers=[b"x-tcpbridge-token:  " + right.encode() + b" "]))
        assert "Traceback" not in daemon.log
        assert not any(" ERROR " in line for line in daemon.log.splitlines())


# ---------------------------------------------------------------------------
# Origins


def test_allowed_origins(tmp_path: Path, echo: TcpServer) -> None:
    daemon, port, _ = start_backend(tmp_path, {
        "allowed_origins": ["https://Console.Example.com/", "http://localhost:8080"],
        "routes": {"default": echo.address}})
    with running(daemon):
        assert_echoes(request(port))  # no Origin: our frontend and the Go frontend send none
        assert_echoes(request(port, headers=[b"Origin: https://console.example.com"]))
        assert_echoes(request(port, headers=[b"Origin: HTTPS://CONSOLE.EXAMPLE.COM/"]))
        assert_echoes(request(port, headers=[b"Origin: http://localhost:8080"]))
        for origin in (b"https://evil.example.com", b"null", b"https://console.example.com:8443",
                       b"http://console.example.com"):
            denied = request(port, headers=[b"Origin: " + origin])
            assert denied.status == 403, origin
            assert "Origin header not in allowed_origins" in denied.body
        assert len(refused_lines(daemon, 403, 4)) == 4
        assert "evil" not in daemon.log, "header values are never logged"
        assert len(echo.connections) == 4


def test_without_allowed_origins_any_origin_passes(tmp_path: Path, echo: TcpServer) -> None:
    daemon, port, _ = start_backend(tmp_path, {"routes": {"default": echo.address}})
    with running(daemon):
        assert_echoes(request(port, headers=[b"Origin: https://anything.example"]))


# ---------------------------------------------------------------------------
# Caps


def hold(port: int, n: int, route: str = "") -> list[Answer]:
    answers = [request(port, route) for _ in range(n)]
    for answer in answers:
        assert_echoes(answer)
    return answers


def assert_full(port: int, route: str = "", what: str = "listener is full") -> None:
    answer = request(port, route)
    assert answer.status == 503, answer.head
    assert answer.header("Retry-After") == "5"
    assert what in answer.body


def closed_count(daemon: Daemon) -> int:
    return sum(" closed (" in line for line in daemon.log.splitlines())


def close_and_wait(daemon: Daemon, answer: Answer) -> None:
    before = closed_count(daemon)
    close_tunnel(answer)
    assert wait_until(lambda: closed_count(daemon) > before, 10), daemon.log


def test_listener_max_tunnels(tmp_path: Path, echo: TcpServer) -> None:
    daemon, port, _ = start_backend(tmp_path, {"max_tunnels": 3, "routes": {
        "default": echo.address, "other": echo.address}})
    with running(daemon):
        live = hold(port, 2) + hold(port, 1, "other")
        assert_full(port)
        assert_full(port, "other")
        assert len(echo.connections) == 3, "a refused upgrade must not dial the target"
        close_and_wait(daemon, live.pop(0))
        live += hold(port, 1, "other")
        assert_full(port)
        assert log_lines(daemon, lambda line: " WARNING " in line and "503 listener is full: max_tunnels 3" in line, 1)
        for answer in live:
            close_and_wait(daemon, answer)
        live = hold(port, 3)
        assert_full(port)


def test_route_max_tunnels(tmp_path: Path, echo: TcpServer) -> None:
    daemon, port, _ = start_backend(tmp_path, {"max_tunnels": 0, "routes": {
        "default": echo.address, "db": {"target": echo.address, "max_tunnels": 2}}})
    with running(daemon):
        live = hold(port, 2, "db")
        assert_full(port, "db", "route 'db' is full: max_tunnels 2")
        live += hold(port, 3)  # other routes are not limited by db's cap, nor is the listener
        close_and_wait(daemon, live.pop(0))  # a db tunnel
        live += hold(port, 1, "db")
        assert_full(port, "db", "route 'db' is full")


def test_a_refused_route_does_not_use_up_the_listeners_count(tmp_path: Path, echo: TcpServer) -> None:
    daemon, port, _ = start_backend(tmp_path, {"max_tunnels": 2, "routes": {
        "default": echo.address, "db": {"target": echo.address, "max_tunnels": 1}}})
    with running(daemon):
        live = hold(port, 1, "db")
        for _ in range(5):
            assert_full(port, "db", "route 'db' is full")
        live += hold(port, 1)  # the listener still has room for one
        assert_full(port)


def test_a_tunnel_whose_target_refuses_is_not_counted(tmp_path: Path, echo: TcpServer) -> None:
    dead = free_port()
    daemon, port, _ = start_backend(tmp_path, {"max_tunnels": 1, "routes": {
        "default": echo.address, "dead": f"127.0.0.1:{dead}"}})
    with running(daemon):
        for _ in range(3):
            assert request(port, "dead").status == 502
        live = hold(port, 1)
        assert_full(port)
        close_and_wait(daemon, live.pop())


def test_counts_survive_a_reload(tmp_path: Path, echo: TcpServer) -> None:
    listener = {"max_tunnels": 2, "routes": {"default": echo.address, "db": {"target": echo.address,
                                                                             "max_tunnels": 1}}}
    daemon, port, config = start_backend(tmp_path, listener)
    with running(daemon):
        live = hold(port, 1) + hold(port, 1, "db")
        daemon.proc.send_signal(signal.SIGHUP)  # nothing changed
        assert daemon.wait_for_log("done: no changes"), daemon.log
        assert_full(port)
        assert_full(port, "db")
        close_and_wait(daemon, live.pop())  # the db tunnel
        live += hold(port, 1, "db")
        assert_full(port, "db")
        # a raised cap applies to the next request, with the live tunnels still counted
        write_yaml(tmp_path, config.name, {"listeners": [{
            "name": "main", "listen": f"127.0.0.1:{port}", **listener, "max_tunnels": 3}], "drain_timeout": 0.5})
        daemon.proc.send_signal(signal.SIGHUP)
        assert daemon.wait_for_log("max_tunnels changed for new connections"), daemon.log
        live += hold(port, 1)
        assert_full(port)


# ---------------------------------------------------------------------------
# Request size and shape


def filler(total: int) -> list[bytes]:
    """Header lines adding up to about ``total`` bytes (CRLFs included)."""
    line = b"X-Filler: " + b"a" * 1014  # 1024 bytes on the wire with its CRLF
    return [line] * (total // 1026)


def test_a_header_block_over_16_kib_gets_431(tmp_path: Path, echo: TcpServer) -> None:
    daemon, port, _ = start_backend(tmp_path, {"routes": {"default": echo.address}})
    with running(daemon):
        answer = request(port, headers=filler(20 * 1024))
        assert answer.status == 431, answer.head
        assert answer.header("Connection") == "close"
        assert "request header block larger than 16384 bytes" in answer.body
        lines = refused_lines(daemon, 431, 1)
        assert len(lines) == 1 and " WARNING " in lines[0], daemon.log
        one_line = request(port, headers=[b"X-Big: " + b"b" * 17000])  # a single long line counts too
        assert one_line.status == 431
        assert not echo.connections
        assert_echoes(request(port, headers=filler(15 * 1024)))  # just under the limit is fine


def http_errors_for(daemon: Daemon, sock: socket.socket) -> list[str]:
    peer = f"127.0.0.1:{sock.getsockname()[1]}"
    return [line for line in daemon.log.splitlines() if peer in line]


@pytest.mark.parametrize(("raw", "status"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/x.y\r\n\r\n", 400),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
])
def test_http_servers_own_refusals_still_work_with_one_debug_line(
    tmp_path: Path, echo: TcpServer, raw: bytes, status: int
) -> None:
    daemon, port, _ = start_backend(tmp_path, {"routes": {"default": echo.address}})
    with running(daemon):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(raw)
            sock.settimeout(10)
            head = sock.recv(4096).decode("latin-1")
            assert head.startswith(f"HTTP/1.1 {status} "), head
            assert wait_until(lambda: bool(http_errors_for(daemon, sock)), 5)
            lines = http_errors_for(daemon, sock)
        assert len(lines) == 1 and " DEBUG " in lines[0], lines


# ---------------------------------------------------------------------------
# Logs


def test_no_token_value_is_logged_at_debug(tmp_path: Path, echo: TcpServer) -> None:
    secret = tmp_path / "route-token"
    secret.write_text(ROUTE_TOKEN)
    daemon, port, _ = start_backend(tmp_path, {"token": LISTENER_TOKEN, "routes": {
        "default": echo.address, "db": {"target": echo.address, "token": {"file": str(secret)}}}})
    wrong = "wrong-Tok3n-77aa11"
    with running(daemon):
        assert_echoes(request(port, headers=[token(LISTENER_TOKEN)]))
        assert_echoes(request(port, "db", [token(ROUTE_TOKEN)]))
        assert request(port, "db", [token(wrong)]).status == 403
        assert request(port, "", [token(ROUTE_TOKEN)]).status == 403
        assert request(port, "db", [token(LISTENER_TOKEN)]).status == 403
        assert request(port, "nosuch", [token(wrong)]).status == 403  # auth comes before the route lookup
        assert request(port, request_line=b"POST / HTTP/1.1").status == 404  # logged at debug
        daemon.proc.send_signal(signal.SIGHUP)
        assert daemon.wait_for_log("reload of")
        secret.write_text("")
        assert request(port, "db", [token(ROUTE_TOKEN)]).status == 503
    log = daemon.log
    assert " DEBUG " in log
    for value in (LISTENER_TOKEN, ROUTE_TOKEN, wrong):
        assert value not in log, value
    assert f"file {secret} is empty" in log


# ---------------------------------------------------------------------------
# With our frontend


def test_our_frontend_sends_the_token_from_a_file(tmp_path: Path, echo: TcpServer) -> None:
    secret = tmp_path / "token"
    secret.write_text(LISTENER_TOKEN + "\n")
    os.chmod(secret, 0o600)
    daemon, port, _ = start_backend(tmp_path, {"token": {"file": str(secret)}, "routes": {"default": echo.address}},
                                    level="info")
    with_token, without = free_port(), free_port()
    front_config = write_yaml(tmp_path, "frontend.yaml", {
        "backend": f"ws://127.0.0.1:{port}/",
        "drain_timeout": 0.5,
        "tunnels": [
            {"name": "good", "listen": f"127.0.0.1:{with_token}",
             "headers": {"X-Tcpbridge-Token": {"file": str(secret)}}},
            {"name": "bare", "listen": f"127.0.0.1:{without}"},
        ]})
    front = frontend(front_config, "--log-level", "debug").wait_ready()
    with running(front, daemon):
        with socket.create_connection(("127.0.0.1", with_token), timeout=10) as sock:
            sock.sendall(b"through the bridge\n")
            assert recv_exactly(sock, 19, timeout=10) == b"through the bridge\n"
        with socket.create_connection(("127.0.0.1", without), timeout=10) as sock:
            sock.settimeout(10)
            with pytest.raises(ConnectionResetError):
                while sock.recv(4096):
                    pass
        assert front.wait_for_log("HTTP 401"), front.log
        assert "[bare]: cannot open" in front.log
        assert len(refused_lines(daemon, 401, 1)) == 1
    assert LISTENER_TOKEN not in front.log + daemon.log  # both stopped: their logs are complete
