"""The frontend's dial path: HTTP CONNECT proxies (a real tinyproxy) and per-tunnel connection caps.

Every target is on loopback, which the ``env`` proxy setting never proxies; so the environment
rules (no_proxy, scheme, precedence) are unit-tested on :func:`bridge.transport.choose_proxy`,
and end to end only what loopback allows: exempt when ``http_proxy`` is set, proxied when
``proxy: http://...`` says so.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.transport import ProxyChoice, choose_proxy, is_loopback, no_proxy_matches
from tests.helpers import (
    Daemon,
    TcpServer,
    backend,
    free_port,
    frontend,
    pattern,
    recv_all,
    recv_exactly,
    send_then_shutdown,
    sha256,
    wait_until,
    write_yaml,
)
from tests.pki import Server, require_tools, tinyproxy

# ---------------------------------------------------------------------------
# Choosing a proxy: a pure function of the URL, the setting and the environment


def test_none_and_explicit_settings_ignore_the_environment() -> None:
    env = {"http_proxy": "http://env:1", "no_proxy": "*"}
    assert choose_proxy("ws://example.com/", "none", env) is None
    explicit = choose_proxy("ws://127.0.0.1:9/", "http://u:p@proxy:3128", env)
    assert explicit == ProxyChoice("http://u:p@proxy:3128", "proxy setting")
    assert str(explicit) == "http://proxy:3128 (from proxy setting)"  # credentials never shown


@pytest.mark.parametrize(("url", "env", "expected"), [
    ("ws://example.com/", {"http_proxy": "http://p:1"}, "http://p:1"),
    ("ws://example.com/", {"HTTP_PROXY": "http://P:2"}, "http://P:2"),
    ("ws://example.com/", {"http_proxy": "http://p:1", "HTTP_PROXY": "http://P:2"}, "http://p:1"),
    ("ws://example.com/", {"https_proxy": "http://s:3"}, None),  # ws:// uses http_proxy only
    ("wss://example.com/", {"https_proxy": "http://s:3"}, "http://s:3"),
    ("wss://example.com/", {"HTTPS_PROXY": "http://S:4"}, "http://S:4"),
    ("wss://example.com/", {"http_proxy": "http://p:1"}, None),  # wss:// uses https_proxy only
    ("ws://example.com/", {"http_proxy": "p:1"}, "http://p:1"),  # no scheme: http
    ("ws://example.com/", {"http_proxy": "  "}, None),
    ("ws://example.com/", {}, None),
])
def test_env_picks_the_variable_of_the_scheme(url: str, env: dict[str, str], expected: str | None) -> None:
    choice = choose_proxy(url, "env", env)
    assert (choice.url if choice else None) == expected
    if choice:
        assert choice.source.startswith("environment variable ")


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "localhost.", "a.localhost", "127.0.0.1", "127.1.2.3",
                                  "[::1]", "[::ffff:127.0.0.1]", "ip6-localhost"])
def test_loopback_backends_are_never_proxied_from_the_environment(host: str) -> None:
    env = {"http_proxy": "http://p:1", "https_proxy": "http://p:1", "no_proxy": ""}
    assert choose_proxy(f"ws://{host}:8080/", "env", env) is None
    assert choose_proxy(f"wss://{host}/", "env", env) is None
    # ... but an explicit proxy setting is obeyed for them too.
    assert choose_proxy(f"ws://{host}:8080/", "http://p:1", env) is not None


@pytest.mark.parametrize("host", ["128.0.0.1", "10.0.0.1", "[::2]", "localhost.example.com", "mylocalhost"])
def test_non_loopback_hosts(host: str) -> None:
    assert not is_loopback(host.strip("[]"))
    assert choose_proxy(f"ws://{host}/", "env", {"http_proxy": "http://p:1"}) is not None


@pytest.mark.parametrize(("host", "port", "no_proxy", "bypass"), [
    ("example.com", 80, "*", True),
    ("example.com", 80, "example.com", True),
    ("api.example.com", 80, "example.com", True),
    ("api.example.com", 80, ".example.com", True),
    ("api.example.com", 80, "*.example.com", True),
    ("example.com", 80, ".example.com", True),
    ("badexample.com", 80, "example.com", False),
    ("example.com", 80, "other.org, example.com", True),
    ("example.com", 80, " other.org ,EXAMPLE.COM ", True),
    ("example.com", 80, "other.org", False),
    ("example.com", 80, "", False),
    ("example.com", 80, ",,", False),
    ("example.com", 8443, "example.com:8443", True),
    ("example.com", 80, "example.com:8443", False),
    ("example.com", 80, "example.com:bad", False),
    ("10.1.2.3", 80, "10.1.2.3", True),
    ("10.1.2.3", 80, "10.0.0.0/8", True),
    ("11.1.2.3", 80, "10.0.0.0/8", False),
    ("example.com", 80, "10.0.0.0/8", False),
    ("fd00::5", 80, "fd00::/8", True),
    ("fd00::5", 443, "[fd00::5]:443", True),
    ("fd00::5", 80, "[fd00::5]:443", False),
    ("fd00::5", 80, "fd00::5", True),
])
def test_no_proxy_rules(host: str, port: int, no_proxy: str, bypass: bool) -> None:
    assert no_proxy_matches(host, port, no_proxy) is bypass
    env = {"http_proxy": "http://p:1", "no_proxy": no_proxy}
    url_host = f"[{host}]" if ":" in host else host
    assert (choose_proxy(f"ws://{url_host}:{port}/", "env", env) is None) is bypass


def test_upper_case_no_proxy_is_read_when_lower_case_is_absent() -> None:
    assert choose_proxy("ws://example.com/", "env", {"http_proxy": "http://p:1", "NO_PROXY": "example.com"}) is None
    assert choose_proxy("ws://example.com/", "env", {"http_proxy": "http://p:1", "no_proxy": "other.org",
                                                     "NO_PROXY": "example.com"}) is not None


# ---------------------------------------------------------------------------
# End to end through tinyproxy


@pytest.fixture
def echo() -> Iterator[TcpServer]:
    server = TcpServer(_echo)
    yield server
    server.close()


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(1 << 18):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


@dataclass
class Pair:
    frontend: Daemon
    backend: Daemon
    frontend_port: int
    backend_port: int


@pytest.fixture
def pairs() -> Iterator[list[Pair]]:
    started: list[Pair] = []
    yield started
    for pair in started:
        pair.frontend.stop()
        pair.backend.stop()


@pytest.fixture
def proxies() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def make_pair(pairs: list[Pair], tmp_path: Path, target: TcpServer, *, backend_port: int | None = None,
              url_port: int | None = None, env: dict[str, str] | None = None, top: dict[str, Any] | None = None,
              **tunnel: Any) -> Pair:
    """Our backend (route default -> ``target``) on ``backend_port``, and a frontend tunnel ``t``
    to ``ws://127.0.0.1:<url_port or backend_port>/`` with the given tunnel settings."""
    backend_port = backend_port or free_port()
    frontend_port = free_port()
    back = backend(write_yaml(tmp_path, f"backend{len(pairs)}.yaml", {"listeners": [
        {"name": "main", "listen": f"127.0.0.1:{backend_port}", "routes": {"default": target.address}}]}))
    try:
        back.wait_ready()
        front = frontend(write_yaml(tmp_path, f"frontend{len(pairs)}.yaml", {
            "backend": f"ws://127.0.0.1:{url_port or backend_port}/", "connect_timeout": 5, **(top or {}),
            "tunnels": [{"name": "t", "listen": f"127.0.0.1:{frontend_port}", **tunnel}]}), env=env)
    except BaseException:
        back.stop()
        raise
    pair = Pair(front, back, frontend_port, backend_port)
    pairs.append(pair)
    try:
        front.wait_ready()
    except BaseException:
        pairs.pop()
        front.stop()
        back.stop()
        raise
    return pair


def roundtrip(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        send_then_shutdown(client, data)
        return recv_all(client, timeout=20)


def refused(port: int) -> float:
    """Connect, and return how long it took until the frontend reset us."""
    started = time.monotonic()
    # On loopback the reset can even beat connect() back to us.
    with pytest.raises((ConnectionResetError, BrokenPipeError)), \
            socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"x")
        recv_all(client, timeout=15)
    return time.monotonic() - started


def start_proxy(proxies: list[Server], tmp_path: Path, ports: list[int], **kwargs: object) -> Server:
    require_tools("tinyproxy")
    server = tinyproxy(tmp_path / f"proxy{len(proxies)}", ports, **kwargs)  # type: ignore[arg-type]
    proxies.append(server)
    return server


def test_an_explicit_proxy_carries_the_tunnel(pairs: list[Pair], proxies: list[Server], tmp_path: Path,
                                             echo: TcpServer) -> None:
    backend_port = free_port()
    proxy = start_proxy(proxies, tmp_path, [backend_port])
    pair = make_pair(pairs, tmp_path, echo, proxy=f"http://127.0.0.1:{proxy.port}", backend_port=backend_port)
    assert f"via proxy http://127.0.0.1:{proxy.port} (from proxy setting)" in pair.frontend.log
    data = pattern(2 << 20)
    assert sha256(roundtrip(pair.frontend_port, data)) == sha256(data)
    assert f"CONNECT 127.0.0.1:{backend_port} HTTP/1.1" in proxy.log(), proxy.log()


def test_proxy_credentials_are_sent_and_never_logged(pairs: list[Pair], proxies: list[Server], tmp_path: Path,
                                                    echo: TcpServer) -> None:
    backend_port = free_port()
    proxy = start_proxy(proxies, tmp_path, [backend_port], auth=("bridge", "pr0xy-s3cret"))
    pair = make_pair(pairs, tmp_path, echo, proxy=f"http://bridge:pr0xy-s3cret@127.0.0.1:{proxy.port}",
                     backend_port=backend_port, top={"log_level": "debug"})
    assert roundtrip(pair.frontend_port, b"authorised") == b"authorised"
    assert f"CONNECT 127.0.0.1:{backend_port}" in proxy.log()
    assert "pr0xy-s3cret" not in pair.frontend.log


def test_wrong_proxy_credentials_give_the_proxy_status(pairs: list[Pair], proxies: list[Server], tmp_path: Path,
                                                      echo: TcpServer) -> None:
    backend_port = free_port()
    proxy = start_proxy(proxies, tmp_path, [backend_port], auth=("bridge", "right"))
    pair = make_pair(pairs, tmp_path, echo, proxy=f"http://bridge:wr0ng-pw@127.0.0.1:{proxy.port}",
                     backend_port=backend_port)
    refused(pair.frontend_port)
    reason = (f"proxy http://127.0.0.1:{proxy.port} (from proxy setting) refused CONNECT "
              f"127.0.0.1:{backend_port}: HTTP 40")
    assert pair.frontend.wait_for_log(reason), pair.frontend.log
    # tinyproxy says 401 Unauthorized to CONNECT where RFC 9110 has 407: pass on whatever it says.
    assert "HTTP 407 Proxy Authentication Required" in pair.frontend.log or \
        "HTTP 401 Unauthorized" in pair.frontend.log
    assert "wr0ng-pw" not in pair.frontend.log


def test_a_proxy_refusing_the_port_gives_one_clear_line(pairs: list[Pair], proxies: list[Server], tmp_path: Path,
                                                       echo: TcpServer) -> None:
    proxy = start_proxy(proxies, tmp_path, [free_port()])  # CONNECT allowed to some other port only
    pair = make_pair(pairs, tmp_path, echo, proxy=f"http://127.0.0.1:{proxy.port}")
    assert refused(pair.frontend_port) < 5
    reason = (f"proxy http://127.0.0.1:{proxy.port} (from proxy setting) refused CONNECT "
              f"127.0.0.1:{pair.backend_port}: HTTP 403")
    assert pair.frontend.wait_for_log(reason), pair.frontend.log
    lines = [line for line in pair.frontend.log.splitlines() if "cannot open ws://127.0.0.1" in line]
    assert len(lines) == 1 and reason in lines[0], pair.frontend.log


def test_a_proxy_that_is_not_there_gives_one_clear_line(pairs: list[Pair], tmp_path: Path, echo: TcpServer) -> None:
    dead = free_port()
    pair = make_pair(pairs, tmp_path, echo, proxy=f"http://user:hunter2@127.0.0.1:{dead}")
    assert refused(pair.frontend_port) < 5
    reason = f"cannot connect to proxy http://127.0.0.1:{dead} (from proxy setting): connection refused"
    assert pair.frontend.wait_for_log(reason), pair.frontend.log
    assert "hunter2" not in pair.frontend.log


def test_loopback_backends_ignore_proxy_variables(pairs: list[Pair], proxies: list[Server], tmp_path: Path,
                                                  echo: TcpServer) -> None:
    proxy = start_proxy(proxies, tmp_path, [])
    dead = free_port()
    env = {"http_proxy": f"http://127.0.0.1:{proxy.port}", "HTTP_PROXY": f"http://127.0.0.1:{dead}",
           "https_proxy": f"http://127.0.0.1:{dead}", "no_proxy": "", "NO_PROXY": ""}
    pair = make_pair(pairs, tmp_path, echo, env=env)  # proxy: env, the default
    assert "via proxy" not in pair.frontend.log
    assert roundtrip(pair.frontend_port, b"direct") == b"direct"
    assert "CONNECT 127.0.0.1:" not in proxy.log()


# ---------------------------------------------------------------------------
# max_connections


def test_connections_over_the_cap_are_reset_at_once_and_logged(pairs: list[Pair], tmp_path: Path,
                                                               echo: TcpServer) -> None:
    pair = make_pair(pairs, tmp_path, echo, max_connections=2)
    port = pair.frontend_port
    first = socket.create_connection(("127.0.0.1", port), timeout=10)
    second = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        for client in (first, second):
            client.sendall(b"ping")
            assert recv_exactly(client, 4) == b"ping"
        assert refused(port) < 5
        assert pair.frontend.wait_for_log("tunnel t: refused 127.0.0.1:")
        assert pair.frontend.wait_for_log("max_connections (2) reached, connection reset")
        # A burst: at most one warning a second, each counting the refusals it stood for.
        burst_started = time.monotonic()
        for _ in range(5):
            refused(port)
        burst = time.monotonic() - burst_started
        time.sleep(1.1)
        refused(port)  # more than a second after any warning: logged, with the count
        assert wait_until(lambda: refusals_counted(pair.frontend.log) == 7, 10), pair.frontend.log
        warnings = pair.frontend.log.count("max_connections (2) reached")
        assert warnings <= 2 + int(burst), pair.frontend.log
        if burst < 0.9:  # the usual case: the whole burst inside one second
            assert warnings == 2 and "(5 more refused since the previous warning)" in pair.frontend.log
        # One leaves: the next client is served.
        first.close()
        assert pair.frontend.wait_for_log("] closed (")
        # Its slot is freed just after the closed line is logged: allow that instant.
        assert wait_until(lambda: served(port), 5), pair.frontend.log
        second.sendall(b"still")
        assert recv_exactly(second, 5) == b"still"
    finally:
        first.close()
        second.close()


def served(port: int) -> bool:
    """Whether a new client gets its bytes echoed (False if the cap reset it)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"pong")
            return recv_exactly(client, 4) == b"pong"
    except (ConnectionResetError, BrokenPipeError, EOFError):
        return False


def refusals_counted(log: str) -> int:
    """How many refusals the cap warnings account for: one each, plus the ones each says it stood for."""
    lines = [line for line in log.splitlines() if "max_connections (2) reached" in line]
    return sum(1 + int(match.group(1)) if (match := re.search(r"\((\d+) more refused", line)) else 1
               for line in lines)


def test_connections_still_dialing_count_against_the_cap(pairs: list[Pair], tmp_path: Path) -> None:
    release = threading.Event()

    def silent(conn: socket.socket) -> None:  # accepts the TCP connection, never answers the upgrade
        release.wait(15)

    stalled = TcpServer(silent)
    try:
        pair = make_pair(pairs, tmp_path, stalled, max_connections=1, url_port=stalled.port)
        with socket.create_connection(("127.0.0.1", pair.frontend_port), timeout=10) as dialing:
            assert wait_until(lambda: len(stalled.connections) == 1)
            assert refused(pair.frontend_port) < 5
            assert pair.frontend.wait_for_log("max_connections (1) reached")
            release.set()  # the stalled dial fails; its slot is freed
            with pytest.raises(ConnectionResetError):
                recv_all(dialing, timeout=10)
    finally:
        release.set()
        stalled.close()

