"""The bridge through a double of the inverting proxy's websocket shim (tests/shim.py).

TCP client -> frontend ==ws==> ShimProxy --HTTP open/data/poll/close--> ShimAgent ==ws==> backend -> target.
The daemons are the real ones, run as processes; the agent polls with a 1 s timeout
(``--websocket-shim-timeout 2s``), so idle tunnels cross several empty polls.
"""

from __future__ import annotations

import hashlib
import os
import queue
import socket
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import websocket

from tests.gopeer import OP_BINARY, OP_CLOSE, OP_CONT, OP_TEXT, GoBackend, GoCloseError
from tests.helpers import (
    Daemon,
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
    wait_until,
    write_yaml,
)
from tests.shim import ShimAgent, ShimProxy

SHIM_TIMEOUT = 2.0  # the agent's --websocket-shim-timeout: polls answer 408 after 1 s
MiB = 1024 * 1024


@dataclass
class Chain:
    agent: ShimAgent
    proxy: ShimProxy
    backend: Daemon
    frontend: Daemon
    ports: dict[str, int]  # frontend tunnel name -> its listen port

    def connect(self, tunnel: str = "t") -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.ports[tunnel]), timeout=10)

    def stop(self) -> None:
        self.frontend.stop()
        self.backend.stop()
        self.proxy.close()
        self.agent.close()


def start_chain(directory: Path, routes: dict[str, str], *, options: dict[str, Any] | None = None,
                tunnel_headers: dict[str, str] | None = None) -> Chain:
    """Backend with ``routes``; agent dialing it; proxy; a frontend tunnel per route (named after it)."""
    backend_port = free_port()
    backend_cfg = write_yaml(directory, "backend.yaml", {
        **(options or {}),
        "listeners": [{"name": "main", "listen": f"127.0.0.1:{backend_port}", "routes": routes}],
    })
    agent = ShimAgent(f"127.0.0.1:{backend_port}", "websocket-shim", shim_timeout=SHIM_TIMEOUT).start()
    proxy = ShimProxy.for_agent(agent).start()
    ports = {name: free_port() for name in [*routes, "nope"]}
    frontend_cfg = write_yaml(directory, "frontend.yaml", {
        "backend": proxy.url,
        **(options or {}),
        "tunnels": [{"name": "t" if name == "default" else name, "listen": f"127.0.0.1:{port}",
                     **({} if name == "default" else {"route": name}),
                     **({"headers": tunnel_headers} if tunnel_headers else {})}
                    for name, port in ports.items()],
    })
    ports["t"] = ports.pop("default")
    back, front = backend(backend_cfg), frontend(frontend_cfg)  # started together: the frontend dials lazily
    try:
        back.wait_ready()
        front.wait_ready()
    except BaseException:
        back.stop()
        front.stop()
        proxy.close()
        agent.close()
        raise
    return Chain(agent, proxy, back, front, ports)


def closed_port() -> int:
    return free_port()  # bound and released: nothing listens there


def sink_handler(conn: socket.socket) -> None:
    """Read to EOF, answer with the sha256 of what arrived, close."""
    digest = hashlib.sha256()
    while chunk := conn.recv(1 << 18):
        digest.update(chunk)
    conn.sendall(digest.hexdigest().encode())
    conn.shutdown(socket.SHUT_WR)


def source_handler(conn: socket.socket) -> None:
    """Send 8 MiB of :func:`pattern`, FIN, and wait for the client's end."""
    conn.sendall(pattern(8 * MiB))
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(30)
    conn.recv(1)


REPLY = pattern(300_000)


def reply_handler(conn: socket.socket) -> None:
    """A request/response server: read the request to EOF, then answer its sha256 and 300,000 bytes."""
    request = recv_all(conn, timeout=20)
    conn.sendall(hashlib.sha256(request).digest() + REPLY)
    conn.shutdown(socket.SHUT_WR)


class Recorder:
    """Handlers that report what their side of the connection saw."""

    def __init__(self) -> None:
        self.events: queue.Queue[str] = queue.Queue()

    def greet(self, conn: socket.socket) -> None:
        """Greet, FIN, then record what the client still sends."""
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)
        self.events.put(recv_all(conn, timeout=20).decode())

    def abort(self, conn: socket.socket) -> None:
        """``reset me``: send ``partial`` and reset. Anything else: record how the stream ended."""
        first = conn.recv(16)
        if first == b"reset me":
            conn.sendall(b"partial")
            time.sleep(0.3)
            reset(conn)
            self.events.put("target reset")
            return
        try:
            rest = recv_all(conn, timeout=20)
            self.events.put(f"eof after {len(first) + len(rest)} bytes")
        except ConnectionResetError:
            self.events.put("reset")

    def next(self, timeout: float = 20.0) -> str:
        return self.events.get(timeout=timeout)


@pytest.fixture(scope="module")
def echo() -> Iterator[TcpServer]:
    server = TcpServer(echo_handler)
    yield server
    server.close()


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, echo: TcpServer, recorder: Recorder) -> Iterator[Chain]:
    """One chain for most tests: a frontend tunnel per backend route, plus ``nope`` (unknown route).

    Routes: default (tunnel ``t``) -> echo; sink, source, reply, greet, abort -> the handlers above;
    gone -> a closed port.
    """
    servers = {name: TcpServer(handler) for name, handler in (
        ("sink", sink_handler), ("source", source_handler), ("reply", reply_handler),
        ("greet", recorder.greet), ("abort", recorder.abort))}
    routes = {"default": echo.address, **{name: s.address for name, s in servers.items()},
              "gone": f"127.0.0.1:{closed_port()}"}
    started = start_chain(tmp_path_factory.mktemp("chain"), routes)
    yield started
    started.stop()
    for server in servers.values():
        server.close()


def echo_through(chain: Chain, data: bytes, tunnel: str = "t") -> bytes:
    with chain.connect(tunnel) as sock:
        send_then_shutdown(sock, data)
        return recv_all(sock, timeout=60)


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# ---------------------------------------------------------------------------
# Bytes


@pytest.mark.parametrize("size", [1, 64 * 1024 + 1, MiB, 8 * MiB])
def test_echo_is_byte_exact(chain: Chain, size: int) -> None:
    data = pattern(size)  # every byte value, repeating
    reply = echo_through(chain, data)
    assert len(reply) == size
    assert sha256(reply) == sha256(data)


def test_all_byte_values_and_random_bytes(chain: Chain) -> None:
    data = bytes(range(256)) + os.urandom(300_000) + bytes(range(255, -1, -1))
    assert echo_through(chain, data) == data


def test_upload_only(chain: Chain) -> None:
    """8 MiB client -> target; the target answers the sha256 of what it got."""
    data = os.urandom(8 * MiB)
    assert echo_through(chain, data, "sink").decode() == sha256(data)


def test_download_only(chain: Chain) -> None:
    """8 MiB target -> client."""
    with chain.connect("source") as sock:
        assert sha256(recv_all(sock, timeout=60)) == sha256(pattern(8 * MiB))


def test_fifty_concurrent_tunnels(chain: Chain) -> None:
    def one(i: int) -> bool:
        data = os.urandom(64 * 1024 + i)
        return echo_through(chain, data) == data

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    assert all(results)
    assert wait_until(lambda: chain.agent.live_sessions() == 0, 15), chain.agent.live_sessions()


# ---------------------------------------------------------------------------
# Half-close and close


def test_request_then_shut_wr_gets_the_whole_reply(chain: Chain) -> None:
    """The client's FIN crosses the shim as an empty text message; the reply still flows back."""
    request = os.urandom(100_000)
    assert echo_through(chain, request, "reply") == hashlib.sha256(request).digest() + REPLY


def test_target_half_close_gives_eof_and_the_client_can_still_send(chain: Chain, recorder: Recorder) -> None:
    with chain.connect("greet") as sock:
        assert recv_all(sock, timeout=20) == b"hello"  # EOF after the greeting
        sock.sendall(b"after your FIN")
        sock.shutdown(socket.SHUT_WR)
        assert recorder.next() == "after your FIN"


@pytest.fixture
def abort_chain(tmp_path: Path, recorder: Recorder, request: pytest.FixtureRequest) -> Iterator[Chain]:
    """A chain of its own whose routes (``default`` and ``abort``) lead to :meth:`Recorder.abort`, with the
    options the test is parametrized with (indirectly)."""
    server = TcpServer(recorder.abort)
    started = start_chain(tmp_path, {"default": server.address, "abort": server.address}, options=request.param)
    yield started
    started.stop()
    server.close()


@pytest.mark.parametrize("abort_chain", [{"resume": False}], indirect=True)
def test_without_resume_aborts_arrive_as_clean_closes(abort_chain: Chain, recorder: Recorder) -> None:
    """Close codes do not cross the shim: every close arrives as 1000, so a reset becomes a FIN.

    Client RST -> frontend sends 1011 -> proxy posts ``close`` -> agent sends 1000 -> the backend
    ends cleanly: the target gets EOF, not a reset. Target RST -> backend sends 1011 -> the
    agent's poll answers 400 -> proxy closes with 1000 -> the client gets EOF after the data.
    """
    chain = abort_chain
    before = len(chain.proxy.sessions)
    sock = chain.connect("abort")
    sock.sendall(b"abcdef")
    assert wait_until(lambda: any(s.data_requests for s in chain.proxy.sessions[before:]), 10)
    [record] = chain.proxy.sessions[before:]
    assert record.path.endswith("/abort")
    reset(sock)
    assert recorder.next() == "eof after 6 bytes"
    assert wait_until(lambda: record.ended != "", 10)
    assert record.client_close_code == 1011
    assert record.ended == "frontend closed with 1011"

    before = len(chain.proxy.sessions)
    with chain.connect("abort") as sock:
        sock.sendall(b"reset me")
        got = recv_all(sock, timeout=20)  # EOF: no ConnectionResetError
    assert recorder.next() == "target reset"
    assert got == b"partial"
    [record] = chain.proxy.sessions[before:]
    assert wait_until(lambda: record.ended == "poll answered 400", 10), record


def test_resumable_tunnels_end_clean_through_the_shim_without_lingering(
        tmp_path: Path, echo: TcpServer, recorder: Recorder) -> None:
    """The agent echoes a backend's close at once, before the frontend has read what preceded it: a
    backend that took that for a drop would keep every ended tunnel for ``resume_timeout``, and its
    frontend redial. So a resumable tunnel closes only once the peer acknowledged its end-of-stream
    marker, and then nothing is left to resume: whichever side ends last, both end clean at once."""
    servers = [TcpServer(source_handler), TcpServer(recorder.greet)]
    chain = start_chain(tmp_path, {"default": echo.address, "source": servers[0].address,
                                   "greet": servers[1].address}, options={"resume": True})
    try:
        assert echo_through(chain, pattern(300_000)) == pattern(300_000)  # the frontend's side ends first
        with chain.connect("source") as sock:  # the backend's side ends first
            assert recv_all(sock, timeout=60) == pattern(8 * MiB)
        with chain.connect("greet") as sock:
            assert recv_all(sock, timeout=20) == b"hello"
            sock.sendall(b"bye")
            sock.shutdown(socket.SHUT_WR)
            assert recorder.next() == "bye"
        for daemon, label in ((chain.frontend, "tunnel"), (chain.backend, "tunnel")):
            assert wait_until(lambda d=daemon: d.log.count("closed (clean)") == 3, 10), daemon.log
            assert "dropped" not in daemon.log, label
        assert wait_until(lambda: chain.agent.live_sessions() == 0, 10)
        assert len(chain.proxy.sessions) == 3  # no redials
    finally:
        chain.stop()
        for server in servers:
            server.close()


@pytest.mark.parametrize("abort_chain", [{}], indirect=True)
def test_with_resume_aborts_cross_the_shim_as_aborts(abort_chain: Chain, recorder: Recorder) -> None:
    """Resumable tunnels (the default) announce their close code in a text message before the close frame
    (``tcpbridge:closing``), which the shim carries: a reset on either side resets the other."""
    chain = abort_chain
    sock = chain.connect("abort")
    sock.sendall(b"abcdef")
    assert wait_until(lambda: any(s.data_requests for s in chain.proxy.sessions), 10)
    reset(sock)
    assert recorder.next() == "reset"
    assert chain.frontend.wait_for_log("closed (abort: client reset")
    assert chain.backend.wait_for_log("closed (abort: peer closed the websocket with 1011)")

    with chain.connect("abort") as sock:
        sock.sendall(b"reset me")
        with pytest.raises(ConnectionResetError):
            recv_all(sock, timeout=20)
    assert recorder.next() == "target reset"
    assert chain.frontend.wait_for_log("closed (abort: peer closed the websocket with 1011)")
    assert len(chain.proxy.sessions) == 2  # ended, not resumed


def test_full_close_reclaims_the_session(chain: Chain) -> None:
    with chain.connect() as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
    # the client's close ends the echo, whose FIN comes back: the whole tunnel is reclaimed
    assert wait_until(lambda: chain.agent.live_sessions() == 0, 10)
    assert wait_until(lambda: all(s.ended for s in chain.proxy.sessions), 10)


# ---------------------------------------------------------------------------
# Idle tunnels and keepalives


def test_idle_tunnel_survives_many_poll_timeouts(chain: Chain, tmp_path: Path, echo: TcpServer) -> None:
    """Idle for 4.5 s = 4 empty polls and 2 reaper rounds, with default pings and with 1 s pings.

    Pings never cross the shim: the proxy answers the frontend's, the agent the backend's.
    """
    pinging = start_chain(tmp_path, {"default": echo.address}, options={"ping_interval": 1, "ping_timeout": 2})
    try:
        socks = [chain.connect(), pinging.connect()]
        for sock in socks:
            sock.sendall(b"before")
            assert recv_exactly(sock, 6) == b"before"
        timeouts = [c.agent.statuses[408] for c in (chain, pinging)]
        backend_pings = pinging.agent.pings()
        time.sleep(4.5)
        for c, before in zip((chain, pinging), timeouts, strict=True):
            assert c.agent.statuses[408] - before >= 3
            assert c.agent.reaped == 0
        assert pinging.proxy.sessions[-1].pings >= 3  # the frontend's pings, answered by the proxy
        assert pinging.agent.pings() - backend_pings >= 3  # the backend's, answered by the agent
        for sock in socks:
            sock.sendall(b"after")
            assert recv_exactly(sock, 5) == b"after"
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock, timeout=10) == b""
            sock.close()
    finally:
        pinging.stop()
    assert "closed (clean)" in pinging.frontend.log
    assert "unresponsive" not in pinging.frontend.log + pinging.backend.log


def test_a_session_nobody_polls_is_reaped(chain: Chain) -> None:
    """The agent's inactivity reaper (``--websocket-shim-timeout``) closes the backend side with 1000."""
    proxy_less = socket.create_connection(chain.agent.address, timeout=10)
    try:
        body = b"ws://127.0.0.1/tcp-over-websocket-bridge/35218cb7-1201-4940-89e8-48d8f03fed96"
        proxy_less.sendall(b"POST /websocket-shim/open HTTP/1.1\r\nHost: x\r\nX-Websocket-Shim-Version: 1\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = proxy_less.recv(4096)
        assert b" 200 " in answer.split(b"\r\n", 1)[0]
        reaped = chain.agent.reaped
        assert wait_until(lambda: chain.agent.reaped > reaped, 3 * SHIM_TIMEOUT + 2)
    finally:
        proxy_less.close()


# ---------------------------------------------------------------------------
# Refusals


def test_backend_refusals_arrive_as_500(chain: Chain) -> None:
    for tunnel, backend_says in (("nope", "404"), ("gone", "502")):
        with pytest.raises((ConnectionResetError, EOFError)), chain.connect(tunnel) as sock:
            if not sock.recv(1):
                raise EOFError
        assert wait_until(lambda: "HTTP 500" in chain.frontend.log, 10), chain.frontend.log
        assert any(h.status == int(backend_says) for h in chain.agent.handshakes)
    assert "bad handshake" in chain.frontend.log
    assert [s.open_status for s in chain.proxy.sessions if s.open_status != 200] == [500, 500]


# ---------------------------------------------------------------------------
# What the agent does on the wire (against a fake Go backend that records it)


def test_agent_request_headers_and_continuation_frames(tmp_path: Path) -> None:
    with GoBackend() as fake:
        agent = ShimAgent(f"127.0.0.1:{fake.port}", shim_timeout=SHIM_TIMEOUT).start()
        proxy = ShimProxy.for_agent(agent).start()
        port = free_port()
        cfg = write_yaml(tmp_path, "frontend.yaml", {
            "backend": proxy.url,
            "tunnels": [{"name": "t", "listen": f"127.0.0.1:{port}",
                         "headers": {"X-Tcpbridge-Token": "secret", "Authorization": "Bearer abc"}}],
        })
        front = frontend(cfg).wait_ready()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                accepted = fake.accept(10)
                request = accepted.request
                assert request.get("Host") == f"127.0.0.1:{fake.port}"
                assert request.get("X-Tcpbridge-Token") == "secret"
                assert request.get("Authorization") == "Bearer abc"
                assert request.get("X-Websocket-Shim-Version") == "1"
                assert request.get("Content-Type") == "text/plain;charset=UTF-8"
                assert request.get("Origin") is None
                for name in ("Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version"):
                    assert len([v for k, v in request.headers if k.lower() == name.lower()]) == 1, name
                data = os.urandom(10_000)
                sock.sendall(data)
                ws = accepted.ws
                assert ws is not None
                assert ws.read_exactly(len(data), timeout=10) == data
                frames = [f for f in ws.received if f.opcode in (OP_TEXT, OP_CONT)]
                assert all(f.mask is not None for f in frames)
                assert all(len(f.payload) == 4096 for f in frames if not f.fin)
                assert any(not f.fin for f in frames)  # 20,000 hex characters do not fit one frame
                ws.write(b"back")
                assert recv_exactly(sock, 4) == b"back"
                ws.send_frame(OP_CLOSE, struct.pack("!H", 4000) + b"bye")
                assert recv_all(sock, timeout=10) == b""  # the 4000 reached the frontend as 1000
        finally:
            front.stop()
            proxy.close()
            agent.close()


def test_binary_and_empty_messages_through_the_double() -> None:
    """The v1 binary path (base64) and empty text messages, websocket-client to fake backend."""
    with GoBackend() as fake:
        agent = ShimAgent(f"127.0.0.1:{fake.port}", shim_timeout=SHIM_TIMEOUT).start()
        proxy = ShimProxy.for_agent(agent).start()
        client = websocket.create_connection(proxy.url + "some/path?q=1", timeout=10, suppress_origin=True)
        try:
            accepted = fake.accept(10)
            assert accepted.request.path == "/some/path?q=1"
            ws = accepted.ws
            assert ws is not None
            blob = bytes(range(256)) * 40
            client.send_binary(blob)
            client.send("")
            assert ws.read_message(10) == (OP_BINARY, blob)
            assert ws.read_message(10) == (OP_TEXT, b"")
            ws.send_frame(OP_BINARY, blob[::-1])
            ws.send_frame(OP_TEXT, b"")
            assert client.recv_data() == (websocket.ABNF.OPCODE_BINARY, blob[::-1])
            assert client.recv_data() == (websocket.ABNF.OPCODE_TEXT, b"")
            client.close(status=4001)
            with pytest.raises(GoCloseError) as closed:
                ws.read_message(10)
            assert closed.value.code == 1000
        finally:
            client.shutdown()  # type: ignore[no-untyped-call]
            proxy.close()
            agent.close()
