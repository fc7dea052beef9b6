"""Tunnel semantics through a real frontend+backend pair: transfers, half-close, abort, cleanup."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bridge.config import TunnelOptions
from bridge.frontend import ClientEndpoint
from bridge.outcome import Kind
from bridge.protocol import DEFAULT_MAX_MESSAGE_BYTES
from bridge.registry import TunnelRegistry
from bridge.server_end import ServerEndpoint
from bridge.sockets import failed_sockets
from bridge.tunnel import PEER_GONE_WAIT, Tunnel
from bridge.workers import IDLE_SECONDS
from tests.conftest import Pair, start_pair
from tests.helpers import (
    TcpServer,
    pattern,
    recv_all,
    recv_exactly,
    send_then_shutdown,
    sha256,
    wait_until,
)
from tests.test_session import tcp_pair

SIZES = [1, 64 * 1024 + 1, 8 * 1024 * 1024]


def connect(pair: Pair) -> socket.socket:
    return socket.create_connection(pair.address(), timeout=10)


def sink_handler(conn: socket.socket) -> None:
    """Read to EOF, then answer with the sha256 of what arrived and close."""
    digest = hashlib.sha256()
    while data := conn.recv(1 << 18):
        digest.update(data)
    conn.sendall(digest.hexdigest().encode())
    conn.shutdown(socket.SHUT_WR)


def source_handler(size: int):  # type: ignore[no-untyped-def]
    def handler(conn: socket.socket) -> None:
        conn.sendall(pattern(size))
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(10)
        conn.recv(1)  # wait for the client's side to end
    return handler


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("size", SIZES)
def test_upload_arrives_whole_and_reply_follows_half_close(tmp_path: Path, size: int) -> None:
    """Client sends N bytes then SHUT_WR; the target sees EOF and its reply still arrives."""
    sink = TcpServer(sink_handler)
    pair = start_pair(tmp_path, sink.address)
    try:
        data = pattern(size)
        with connect(pair) as client:
            send_then_shutdown(client, data)
            assert recv_all(client).decode() == sha256(data)
    finally:
        pair.frontend.stop(), pair.backend.stop(), sink.close()


@pytest.mark.parametrize("size", SIZES)
def test_download_arrives_whole_then_eof(tmp_path: Path, size: int) -> None:
    """The target sends N bytes and closes: the client gets them all, then EOF."""
    source = TcpServer(source_handler(size))
    pair = start_pair(tmp_path, source.address)
    try:
        with connect(pair) as client:
            received = recv_all(client)
            assert len(received) == size
            assert sha256(received) == sha256(pattern(size))
    finally:
        pair.frontend.stop(), pair.backend.stop(), source.close()


def test_every_byte_value_round_trips(pair: Pair) -> None:
    data = bytes(range(256)) * 4 + bytes(reversed(range(256)))
    with connect(pair) as client:
        send_then_shutdown(client, data)
        assert recv_all(client) == data


def test_clean_close_is_logged_on_both_sides(pair: Pair) -> None:
    with connect(pair) as client:
        send_then_shutdown(client, b"hello")
        assert recv_all(client) == b"hello"
    assert pair.frontend.wait_for_log("closed (clean): client sent 5 B, received 5 B")
    assert pair.backend.wait_for_log("closed (clean): target sent 5 B, received 5 B")


def test_hundred_concurrent_tunnels(pair: Pair) -> None:
    def one(index: int) -> bool:
        data = os.urandom(32 * 1024 + index)
        with connect(pair) as client:
            send_then_shutdown(client, data)
            return recv_all(client) == data

    with ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(one, range(100)))
    assert results.count(True) == 100


def test_target_reset_resets_the_client(tmp_path: Path) -> None:
    """An abort is never turned into a clean end: a cut stream must look cut."""
    def handler(conn: socket.socket) -> None:
        conn.sendall(b"partial")
        time.sleep(0.3)
        reset(conn)

    server = TcpServer(handler)
    pair = start_pair(tmp_path, server.address)
    try:
        with connect(pair) as client:
            assert recv_exactly(client, 7) == b"partial"
            with pytest.raises(ConnectionResetError):
                recv_all(client)
        assert pair.frontend.wait_for_log("abort")
    finally:
        pair.frontend.stop(), pair.backend.stop(), server.close()


def test_client_reset_resets_the_target(tmp_path: Path) -> None:
    outcome: list[str] = []
    done = threading.Event()

    def handler(conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            while conn.recv(65536):
                pass
            outcome.append("eof")
        except ConnectionResetError:
            outcome.append("reset")
        done.set()

    server = TcpServer(handler)
    pair = start_pair(tmp_path, server.address)
    try:
        client = connect(pair)
        client.sendall(b"some bytes")
        assert pair.backend.wait_for_log("open:")
        time.sleep(0.2)
        reset(client)
        assert done.wait(10)
        assert outcome == ["reset"]
    finally:
        pair.frontend.stop(), pair.backend.stop(), server.close()


def test_half_close_timeout_reclaims_a_tunnel_whose_target_never_finishes(tmp_path: Path) -> None:
    """The client half-closes; the target reads EOF but never closes: the tunnel ends after the timeout."""
    def handler(conn: socket.socket) -> None:
        while conn.recv(65536):
            pass
        conn.sendall(b"reply")
        time.sleep(30)

    server = TcpServer(handler)
    pair = start_pair(tmp_path, server.address, listener_extra={"half_close_timeout": 1})
    try:
        with connect(pair) as client:
            send_then_shutdown(client, b"request")
            started = time.monotonic()
            assert recv_all(client, timeout=15) == b"reply"
            assert time.monotonic() - started < 15
        assert pair.backend.wait_for_log("closed (half-close timeout)")
    finally:
        pair.frontend.stop(), pair.backend.stop(), server.close()


def test_without_half_close_a_fin_closes_the_whole_tunnel(tmp_path: Path) -> None:
    """half_close: false sends close 1000 on FIN instead of a marker; the target gets EOF."""
    seen = threading.Event()

    def handler(conn: socket.socket) -> None:
        conn.settimeout(10)
        while conn.recv(65536):
            pass
        seen.set()

    server = TcpServer(handler)
    pair = start_pair(tmp_path, server.address, tunnel_extra={"half_close": False})
    try:
        with connect(pair) as client:
            client.sendall(b"bye")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b""
        assert seen.wait(10)
        assert pair.frontend.wait_for_log("closed (clean)")
        assert pair.backend.wait_for_log("closed (closed by peer)")
    finally:
        pair.frontend.stop(), pair.backend.stop(), server.close()


def test_nothing_survives_closed_tunnels(pair: Pair) -> None:
    """200 tunnels opened and closed: fds and threads of both daemons return to idle.

    The fds at once; the threads once the pooled workers that ran the tunnels have
    waited ``IDLE_SECONDS`` for more work and exited.
    """
    time.sleep(0.3)
    baseline = {d: (d.fds(), d.threads()) for d in (pair.frontend, pair.backend)}

    def one(index: int) -> None:
        with connect(pair) as client:
            payload = f"tunnel {index}".encode()
            send_then_shutdown(client, payload)
            assert recv_all(client) == payload

    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(one, range(200)))
    for daemon, (fds, threads) in baseline.items():
        assert wait_until(lambda d=daemon, f=fds, t=threads: (d.fds(), d.threads()) == (f, t),
                          timeout=IDLE_SECONDS + 15), (
            f"{daemon.args[0]}: fds {daemon.fds()} (idle {fds}), threads {daemon.threads()} (idle {threads})"
        )


def test_ipv6_listen_and_target(tmp_path: Path) -> None:
    from tests.helpers import backend, echo_handler, free_port, frontend, write_yaml

    echo = TcpServer(echo_handler, host="::1")
    backend_port, frontend_port = free_port("::1"), free_port("::1")
    back = backend(write_yaml(tmp_path, "b.yaml", {"listeners": [
        {"name": "v6", "listen": f"[::1]:{backend_port}", "routes": {"default": echo.address}}]})).wait_ready()
    front = frontend(write_yaml(tmp_path, "f.yaml", {"tunnels": [
        {"name": "v6", "listen": f"[::1]:{frontend_port}", "backend": f"ws://[::1]:{backend_port}"}]})).wait_ready()
    try:
        with socket.create_connection(("::1", frontend_port), timeout=10) as client:
            send_then_shutdown(client, b"over ipv6")
            assert recv_all(client) == b"over ipv6"
    finally:
        front.stop(), back.stop(), echo.close()


def test_unreachable_target_is_a_502_and_the_client_is_dropped_at_once(tmp_path: Path) -> None:
    from tests.helpers import free_port

    pair = start_pair(tmp_path, f"127.0.0.1:{free_port()}")
    try:
        with connect(pair) as client:
            started = time.monotonic()
            with pytest.raises(ConnectionResetError):
                recv_all(client)
            assert time.monotonic() - started < 5
        assert pair.frontend.wait_for_log("HTTP 502")
        assert pair.backend.wait_for_log("cannot connect to 127.0.0.1:")
        assert "connection refused" in pair.backend.log
    finally:
        pair.frontend.stop(), pair.backend.stop()


def test_unknown_route_is_a_404(tmp_path: Path, echo: TcpServer) -> None:
    pair = start_pair(tmp_path, echo.address, tunnel_extra={"route": "nosuch"})
    try:
        with pytest.raises(ConnectionResetError), connect(pair) as client:  # reset may beat connect()
            recv_all(client)
        assert pair.frontend.wait_for_log("HTTP 404")
        assert pair.backend.wait_for_log("no route 'nosuch'")
    finally:
        pair.frontend.stop(), pair.backend.stop()


def test_backend_down_is_reported_with_the_url(tmp_path: Path, echo: TcpServer) -> None:
    pair = start_pair(tmp_path, echo.address)
    pair.backend.stop()
    try:
        with pytest.raises(ConnectionResetError), connect(pair) as client:  # reset may beat connect()
            recv_all(client)
        assert pair.frontend.wait_for_log(f"cannot open ws://127.0.0.1:{pair.backend_port}/tcp-over-websocket-bridge")
        assert "connection refused" in pair.frontend.log
    finally:
        pair.frontend.stop()


def test_sigterm_drains_live_tunnels_then_exits_zero(tmp_path: Path, echo: TcpServer) -> None:
    pair = start_pair(tmp_path, echo.address, frontend_extra={"drain_timeout": 5})
    try:
        client = connect(pair)
        client.sendall(b"before")
        assert recv_exactly(client, 6) == b"before"
        pair.frontend.proc.terminate()
        assert pair.frontend.wait_for_log("draining 1 tunnels")
        client.sendall(b"during drain")  # the live tunnel keeps flowing
        assert recv_exactly(client, 12) == b"during drain"
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
        assert pair.frontend.stop() == 0
    finally:
        pair.frontend.stop(), pair.backend.stop()


def test_drain_timeout_resets_what_is_left(tmp_path: Path, echo: TcpServer) -> None:
    pair = start_pair(tmp_path, echo.address, frontend_extra={"drain_timeout": 0.5})
    try:
        client = connect(pair)
        client.sendall(b"x")
        assert recv_exactly(client, 1) == b"x"
        assert pair.frontend.stop() == 0
        with pytest.raises(ConnectionResetError):
            recv_all(client)
        assert "resetting 1 tunnels" in pair.frontend.log
    finally:
        pair.backend.stop()


def test_each_open_tunnel_costs_exactly_two_threads_per_daemon(pair: Pair) -> None:
    """Two busy threads per tunnel in each daemon (pooled ones: nothing parked before the first tunnel)."""
    time.sleep(0.3)
    idle = {d: d.threads() for d in (pair.frontend, pair.backend)}
    clients = []
    try:
        for _ in range(10):
            client = connect(pair)
            client.sendall(b"ping")
            assert recv_exactly(client, 4) == b"ping"
            clients.append(client)
        for daemon, threads in idle.items():
            assert wait_until(lambda d=daemon, t=threads: d.threads() == t + 20, timeout=5), (
                f"{daemon.args[0]}: {daemon.threads()} threads with 10 tunnels, {threads} idle")
    finally:
        for client in clients:
            client.close()


def test_daemons_raise_their_open_files_limit_to_the_hard_limit(pair: Pair) -> None:
    for daemon in (pair.frontend, pair.backend):
        line = next(line for line in Path(f"/proc/{daemon.pid}/limits").read_text().splitlines()
                    if line.startswith("Max open files"))
        soft, hard = line.split()[3:5]
        assert soft == hard, line


def test_a_stalled_target_stops_the_upload_instead_of_buffering_it(tmp_path: Path) -> None:
    """Backpressure end to end: the client blocks; neither daemon's memory grows with the upload."""
    release = threading.Event()

    def stalled(conn: socket.socket) -> None:
        release.wait(60)

    server = TcpServer(stalled)
    pair = start_pair(tmp_path, server.address)
    pushed = 0
    try:
        rss_before = {d: _rss_mib(d.pid) for d in (pair.frontend, pair.backend)}
        client = connect(pair)
        client.settimeout(3)
        block = os.urandom(1 << 20)
        with pytest.raises(TimeoutError):
            for _ in range(256):  # at most 256 MiB: far more than kernel buffers can take
                client.sendall(block)
                pushed += 1
        assert pushed < 128, f"{pushed} MiB went in: nothing pushed back"
        for daemon, before in rss_before.items():
            assert _rss_mib(daemon.pid) - before < 48, f"{daemon.args[0]} grew while the target stalled"
        client.close()
    finally:
        release.set()
        pair.frontend.stop(), pair.backend.stop(), server.close()


def test_a_client_that_sends_everything_before_reading_gets_everything(tmp_path: Path) -> None:
    """Plain TCP carries this; a resumable tunnel must too, although the backend's acknowledgements of
    the upload queue behind a download the client does not read yet (bridge.session)."""
    size = 32 << 20  # more than loopback socket buffers hold on every hop
    uploaded: list[str] = []

    def target(conn: socket.socket) -> None:
        sender = send_then_shutdown(conn, pattern(size))
        uploaded.append(sha256(recv_all(conn)))
        sender.join(30)

    server = TcpServer(target)
    pair = start_pair(tmp_path, server.address, tunnel_extra={"resume": True}, listener_extra={"resume": True})
    try:
        with connect(pair) as client:
            client.settimeout(60)
            client.sendall(pattern(size)[::-1])  # reads nothing until all of it is in
            client.shutdown(socket.SHUT_WR)
            assert sha256(recv_all(client)) == sha256(pattern(size))
        assert wait_until(lambda: bool(uploaded), timeout=10)
        assert uploaded == [sha256(pattern(size)[::-1])]
        assert pair.frontend.wait_for_log("closed (clean)")
    finally:
        pair.frontend.stop(), pair.backend.stop(), server.close()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_peer_that_hangs_up_behind_a_stalled_target_write_ends_the_tunnel() -> None:
    """The websocket peer sends its abort's close frame and hangs up (a FIN, not a RST) while our reader
    is stuck writing to a target that reads nothing: the frame is never read, so the hang-up ends it."""
    back_tcp, target = tcp_pair()  # the target never reads
    back_tcp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)  # so that it is stuck soon
    target.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    peer_sock, back_ws = tcp_pair()
    peer = ClientEndpoint(peer_sock, DEFAULT_MAX_MESSAGE_BYTES)
    tunnel = Tunnel(back_tcp, ServerEndpoint(back_ws, b"", DEFAULT_MAX_MESSAGE_BYTES), label="t", peer="test",
                    destination="test", options=TunnelOptions(ping_interval=0), tcp_role="target")
    registry = TunnelRegistry()
    registry.start()
    outcome: list[object] = []
    runner = threading.Thread(target=lambda: outcome.append(registry.run(tunnel)), daemon=True)
    runner.start()
    try:
        def stuck() -> bool:
            return tunnel._writing_tcp and time.monotonic() - tunnel._tcp_write_started > 0.05

        for _ in range(2000):  # until our reader is stuck on the target, with room left on the way to us
            peer.send_data(os.urandom(1 << 14))
            if wait_until(stuck, timeout=0.1, interval=0.01):
                break
        assert tunnel._writing_tcp
        peer.send_close(1011, "abort: client reset", wait=0)
        peer_sock.shutdown(socket.SHUT_WR)  # a FIN: nothing of ours is unread, so no RST
        runner.join(PEER_GONE_WAIT + 10)
        assert not runner.is_alive(), "the tunnel outlived its hung-up peer"
        assert outcome[0].kind is Kind.WEBSOCKET_DROPPED  # type: ignore[attr-defined]
        target.settimeout(5)
        with pytest.raises(ConnectionResetError):  # the target sees a reset, never a clean end
            while target.recv(1 << 20):
                pass
    finally:
        registry.stop()
        for sock in (target, peer_sock):
            sock.close()


def test_an_abort_whose_close_frame_sits_behind_bytes_the_peer_does_not_take_resets_the_websocket() -> None:
    """Our abort's close frame and FIN were written, but wait behind bytes a stuck peer does not take:
    they would never arrive, so the websocket is reset (the peer's kernel sees that at once)."""
    client, front_tcp = tcp_pair()
    front_ws, peer = tcp_pair()  # the websocket peer reads nothing
    front_ws.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)  # room: our writes never block
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    tunnel = Tunnel(front_tcp, ClientEndpoint(front_ws, DEFAULT_MAX_MESSAGE_BYTES), label="t", peer="test",
                    destination="test", options=TunnelOptions(ping_interval=0), tcp_role="client", tcp_first=True)
    registry = TunnelRegistry()
    registry.start()
    runner = threading.Thread(target=lambda: registry.run(tunnel), daemon=True)
    runner.start()
    try:
        client.sendall(os.urandom(512 << 10))  # 1 MiB of hex: more than the peer takes, less than our queue
        assert wait_until(lambda: tunnel.bytes_to_ws == 512 << 10, timeout=10)
        reset(client)  # the housekeeper sees it and aborts; the close frame fits in our send queue
        runner.join(10)
        assert not runner.is_alive()
        assert tunnel.outcome is not None and tunnel.outcome.kind is Kind.ABORTED_BY_CLIENT
        assert wait_until(lambda: bool(failed_sockets([peer])), timeout=5), "the stuck peer never learnt of it"
    finally:
        registry.stop()
        peer.close()
