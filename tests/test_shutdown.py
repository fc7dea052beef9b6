"""Stopping a daemon, as gunicorn's arbiter does: drain on SIGTERM/SIGINT, a second one ends the drain,
SIGQUIT is the fast stop, and the drain waits for connections still dialling.

Real daemons on 127.0.0.1, except for the registry tests at the end. Every wait is bounded; no test
needs anything to be fast, only to happen before a generous limit.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.config import TunnelOptions
from bridge.frontend import ClientEndpoint
from bridge.outcome import Kind, Outcome
from bridge.registry import TunnelRegistry
from bridge.tunnel import Tunnel
from tests.conftest import Pair, start_pair
from tests.helpers import (
    Daemon,
    TcpServer,
    backend,
    free_port,
    frontend,
    recv_all,
    recv_exactly,
    wait_until,
    write_yaml,
)
from tests.test_service import Notifications

#: The drain_timeout of these tests: far longer than any of them may take.
LONG_DRAIN = 30
#: How long a stopping daemon may take to exit when it should exit "at once".
EXIT_LIMIT = 10.0


def held_tunnel(pair: Pair) -> socket.socket:
    """A client whose tunnel through ``pair`` is open (one echoed round trip)."""
    client = socket.create_connection(pair.address(), timeout=10)
    client.sendall(b"open")
    assert recv_exactly(client, 4) == b"open"
    return client


def still_flows(client: socket.socket, data: bytes) -> None:
    client.sendall(data)
    assert recv_exactly(client, len(data)) == data


def exit_status(daemon: Daemon, timeout: float = EXIT_LIMIT) -> int:
    """Wait for ``daemon`` to exit on its own (never signalling it) and return its status."""
    try:
        return daemon.proc.wait(timeout)
    except Exception:
        raise AssertionError(f"still running after {timeout} s:\n{daemon.log}") from None


@pytest.fixture
def long_drain_pair(tmp_path: Path, echo: TcpServer) -> Iterator[Pair]:
    pair = start_pair(tmp_path, echo.address, frontend_extra={"drain_timeout": LONG_DRAIN},
                      backend_extra={"drain_timeout": LONG_DRAIN})
    yield pair
    pair.frontend.stop(signal.SIGQUIT), pair.backend.stop(signal.SIGQUIT)


@pytest.mark.parametrize(("side", "first", "second", "says"), [
    ("frontend", signal.SIGTERM, signal.SIGTERM, "second SIGTERM during the drain: resetting 1 tunnels now"),
    ("backend", signal.SIGINT, signal.SIGINT, "second SIGINT during the drain: resetting 1 tunnels now"),
    ("backend", signal.SIGTERM, signal.SIGINT, "second SIGINT during the drain: resetting 1 tunnels now"),
    ("frontend", signal.SIGINT, signal.SIGQUIT, "SIGQUIT: fast stop, resetting 1 tunnels"),
], ids=["frontend-TERM-TERM", "backend-INT-INT", "backend-TERM-INT", "frontend-INT-QUIT"])
def test_a_second_signal_ends_the_drain_at_once(long_drain_pair: Pair, side: str, first: signal.Signals,
                                                second: signal.Signals, says: str) -> None:
    daemon = getattr(long_drain_pair, side)
    client = held_tunnel(long_drain_pair)
    with client:
        daemon.proc.send_signal(first)
        assert daemon.wait_for_log(f"{first.name} received; no longer accepting, draining 1 tunnels for up to 30 s")
        still_flows(client, b"while draining")

        daemon.proc.send_signal(signal.SIGHUP)  # no reload while stopping
        assert daemon.wait_for_log("SIGHUP during the drain: ignored")
        still_flows(client, b"after SIGHUP")
        assert "reload of" not in daemon.log

        daemon.proc.send_signal(second)
        assert exit_status(daemon) == 0
        assert says in daemon.log
        with pytest.raises(ConnectionResetError):
            recv_all(client, timeout=10)


@pytest.mark.parametrize("side", ["frontend", "backend"])
def test_sigquit_resets_everything_at_once(long_drain_pair: Pair, side: str) -> None:
    daemon = getattr(long_drain_pair, side)
    with held_tunnel(long_drain_pair) as client:
        daemon.proc.send_signal(signal.SIGQUIT)
        assert exit_status(daemon) == 0
        assert "SIGQUIT: fast stop, resetting 1 tunnels" in daemon.log
        assert "no longer accepting, draining" not in daemon.log
        with pytest.raises(ConnectionResetError):
            recv_all(client, timeout=10)


def test_sigquit_with_nothing_open_exits_zero(long_drain_pair: Pair) -> None:
    long_drain_pair.backend.proc.send_signal(signal.SIGQUIT)
    assert exit_status(long_drain_pair.backend) == 0
    assert "SIGQUIT: fast stop, resetting 0 tunnels" in long_drain_pair.backend.log


def test_status_and_watchdog_pings_carry_on_during_a_drain(tmp_path: Path, echo: TcpServer) -> None:
    notify = Notifications(tmp_path)
    backend_port, frontend_port = free_port(), free_port()
    back = backend(write_yaml(tmp_path, "b.yaml", {"drain_timeout": LONG_DRAIN, "listeners": [
        {"name": "main", "listen": f"127.0.0.1:{backend_port}", "routes": {"default": echo.address}}]}),
        env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
    front = frontend(write_yaml(tmp_path, "f.yaml", {"backend": f"ws://127.0.0.1:{backend_port}", "tunnels": [
        {"name": "t", "listen": f"127.0.0.1:{frontend_port}"}]}))
    try:
        notify.wait_for("READY=1")
        front.wait_ready()
        with socket.create_connection(("127.0.0.1", frontend_port), timeout=10) as client:
            still_flows(client, b"x")
            back.proc.send_signal(signal.SIGTERM)
            notify.wait_for("STOPPING=1")
            notify.wait_for("WATCHDOG=1", timeout=5)
            notify.wait_for("WATCHDOG=1", timeout=5)
            assert back.proc.poll() is None
            still_flows(client, b"still draining")
            client.shutdown(socket.SHUT_WR)  # the tunnel ends cleanly: so does the drain
            assert recv_all(client) == b""
            assert exit_status(back) == 0
        assert "resetting" not in back.log
    finally:
        front.stop(), back.stop(signal.SIGQUIT)
        notify.sock.close()


# ---------------------------------------------------------------------------
# Connections still dialling


class HeldRelay:
    """A TCP relay to ``127.0.0.1:target_port`` that holds each connection, unanswered, until :meth:`release`.

    Put between a frontend and its backend, it keeps the frontend's websocket
    dial (and so its client's tunnel) in progress as long as the test wants.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.accepted = threading.Event()
        self._released = threading.Event()
        self._closing = False
        self.server = TcpServer(self._handle)

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self._closing = True
        self._released.set()
        self.server.close()

    def _handle(self, conn: socket.socket) -> None:
        self.accepted.set()
        if not self._released.wait(60) or self._closing:
            return
        with socket.create_connection(("127.0.0.1", self.target_port), timeout=10) as upstream:
            upstream.settimeout(60)
            conn.settimeout(60)
            down = threading.Thread(target=_copy, args=(upstream, conn), daemon=True)
            down.start()
            _copy(conn, upstream)
            down.join(60)


def _copy(source: socket.socket, destination: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(1 << 16):
            destination.sendall(data)
        destination.shutdown(socket.SHUT_WR)


@pytest.fixture
def relayed(tmp_path: Path, echo: TcpServer) -> Iterator[tuple[Daemon, int, HeldRelay]]:
    """A frontend whose websocket dials go through a :class:`HeldRelay` to a backend: (frontend, port, relay)."""
    backend_port, frontend_port = free_port(), free_port()
    back = backend(write_yaml(tmp_path, "b.yaml", {"listeners": [
        {"name": "main", "listen": f"127.0.0.1:{backend_port}", "routes": {"default": echo.address}}]}))
    relay = HeldRelay(backend_port)
    front = frontend(write_yaml(tmp_path, "f.yaml", {
        "backend": f"ws://127.0.0.1:{relay.server.port}", "drain_timeout": LONG_DRAIN,
        "tunnels": [{"name": "t", "listen": f"127.0.0.1:{frontend_port}"}]}))
    try:
        back.wait_ready(), front.wait_ready()
        yield front, frontend_port, relay
    finally:
        front.stop(signal.SIGQUIT), back.stop(signal.SIGQUIT)
        relay.close()


def test_the_drain_waits_for_a_tunnel_still_dialling(relayed: tuple[Daemon, int, HeldRelay]) -> None:
    front, port, relay = relayed
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"sent before the websocket opened")
        assert relay.accepted.wait(10), "the frontend did not dial"
        front.proc.send_signal(signal.SIGTERM)
        assert front.wait_for_log("draining 0 tunnels (and 1 connection still opening) for up to 30 s")
        assert front.proc.poll() is None

        relay.release()  # the dial completes during the drain: the tunnel runs normally
        assert recv_exactly(client, 32) == b"sent before the websocket opened"
        assert front.wait_for_log("[t] open")
        still_flows(client, b"and after")
        assert front.proc.poll() is None, "the drain did not wait for the tunnel"
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
        assert exit_status(front) == 0
    assert "[t] closed (clean)" in front.log
    assert "resetting" not in front.log


@pytest.mark.parametrize("how", ["second SIGTERM", "drain timeout"])
def test_a_dial_still_in_progress_when_the_drain_ends_is_reset(tmp_path: Path, echo: TcpServer,
                                                               how: str) -> None:
    backend_port, port = free_port(), free_port()
    relay = HeldRelay(backend_port)  # never released: the dial never completes
    drain = LONG_DRAIN if how == "second SIGTERM" else 1
    front = frontend(write_yaml(tmp_path, "f.yaml", {
        "backend": f"ws://127.0.0.1:{relay.server.port}", "drain_timeout": drain,
        "tunnels": [{"name": "t", "listen": f"127.0.0.1:{port}"}]}))
    try:
        front.wait_ready()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:  # sends nothing
            assert relay.accepted.wait(10), "the frontend did not dial"
            front.proc.send_signal(signal.SIGTERM)
            assert front.wait_for_log("draining 0 tunnels (and 1 connection still opening)")
            if how == "second SIGTERM":
                front.proc.send_signal(signal.SIGTERM)
            assert exit_status(front) == 0
            says = ("second SIGTERM during the drain: resetting 0 tunnels (and 1 connection still opening) now"
                    if how == "second SIGTERM" else
                    "drain timeout: resetting 0 tunnels (and 1 connection still opening)")
            assert says in front.log
            with pytest.raises(ConnectionResetError):  # a reset, not the FIN of a clean end
                recv_all(client, timeout=10)
    finally:
        front.stop(signal.SIGQUIT)
        relay.close()


# ---------------------------------------------------------------------------
# The registry's count of connections still opening (in-process)


class _FakeTunnel:
    def __init__(self, tunnel_id: str) -> None:
        self.id = tunnel_id
        self.label = "t"
        self.bytes_to_ws = self.bytes_to_tcp = 0
        self.session_id = None
        self.resume_state, self.resumes, self.resume_failure = "", 0, None


def test_wait_idle_counts_openings_until_their_tunnel_registers() -> None:
    registry = TunnelRegistry()
    opening = registry.opening()  # made on one thread (the accepting one) ...
    assert (registry.opening_count(), registry.wait_idle(0)) == (1, False)
    assert registry.wait_idle(0, opening=False)
    registered = threading.Event()

    def dial_then_register() -> None:  # ... entered on the one that dials and runs the tunnel
        with opening:
            registry.add(_FakeTunnel("a"))  # type: ignore[arg-type]
            registered.set()
            assert registry.opening_count() == 0

    thread = threading.Thread(target=dial_then_register)
    thread.start()
    thread.join(10)
    assert registered.is_set()
    assert (registry.opening_count(), len(registry.active()), registry.wait_idle(0)) == (0, 1, False)

    failed = registry.opening()
    with failed:
        pass  # the dial failed: nothing registered
    assert registry.opening_count() == 0
    registry.end_opening(failed)  # idempotent
    assert registry.opening_count() == 0


def test_wait_idle_returns_when_the_last_opening_ends() -> None:
    registry = TunnelRegistry()
    opening = registry.opening()
    timer = threading.Timer(0.2, registry.end_opening, args=(opening,))
    timer.start()
    try:
        assert registry.wait_idle(10)
    finally:
        timer.cancel()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        one = socket.create_connection(server.getsockname(), timeout=10)
        other, _ = server.accept()
    other.settimeout(10)
    return one, other


def test_a_tunnel_that_opens_after_abort_all_is_reset_not_run() -> None:
    registry = TunnelRegistry()
    registry.start()
    client, client_peer = _tcp_pair()  # the TCP side, and the client at its other end
    ws, ws_peer = _tcp_pair()  # the websocket, and the backend at its other end
    try:
        with registry.opening(client):
            registry.abort_all(Outcome(Kind.SHUTDOWN, "abort: daemon shutting down"))
            tunnel = Tunnel(client, ClientEndpoint(ws, 1 << 20), label="t", peer="p", destination="d",
                            options=TunnelOptions(), tcp_first=True)
            result: list[Outcome] = []
            runner = threading.Thread(target=lambda: result.append(registry.run(tunnel)))
            runner.start()
            runner.join(10)
        assert result == [(Kind.SHUTDOWN, "abort: daemon shutting down")]
        assert registry.active() == [] and registry.opening_count() == 0
        assert registry.snapshot().totals()["opened"] == 0
        with pytest.raises(ConnectionResetError):
            recv_all(client_peer, timeout=10)
        closing = ws_peer.recv(2)
        assert closing[:1] == b"\x88", closing  # a close frame (1001) reached the websocket peer
        assert wait_until(lambda: client.fileno() == -1 and ws.fileno() == -1, timeout=5)  # both released
    finally:
        registry.stop()
        for sock in (client, client_peer, ws, ws_peer):
            sock.close()
