"""Faults and bad input: what a user sees when a peer misbehaves, and that everyone else is still served.

Every case ends by opening a fresh tunnel through the same daemons and round-tripping bytes
(:func:`assert_serves`). Most cases share one frontend+backend pair (module scope) whose
backend has a route per kind of target; the kill/restart cases run their own pair.
Every loop here is bounded in count and time; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge.protocol import BRIDGE_PATH
from bridge.workers import IDLE_SECONDS
from tests import gopeer
from tests.conftest import start_pair
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

MASK = b"\x01\x02\x03\x04"
TOKEN_BYTES = 16
RESTART_BOUND = 10.0
#: The shared backend's resume_timeout: how long a resumable tunnel whose websocket went away waits.
RESUME_TIMEOUT = 3.0


# ---------------------------------------------------------------------------
# Targets


class EchoRecorder:
    """An echo target (half-close aware), or with ``echo=False`` a sink, that records how each
    connection ended.

    Connections are keyed by the first :data:`TOKEN_BYTES` bytes they carried (:attr:`seen`
    as soon as those arrived); the ending is ``eof`` (a clean FIN), ``reset``, or ``timeout``.
    """

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.seen: set[bytes] = set()
        self.endings: dict[bytes, str] = {}
        self._lock = threading.Lock()
        self.server = TcpServer(self._handle)

    @property
    def address(self) -> str:
        return self.server.address

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        head = b""
        ending = "eof"
        try:
            while data := conn.recv(1 << 18):
                if len(head) < TOKEN_BYTES:
                    head += data[: TOKEN_BYTES - len(head)]
                    if len(head) == TOKEN_BYTES:
                        self.seen.add(head)
                if self.echo:
                    conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except (ConnectionResetError, BrokenPipeError):
            ending = "reset"
        except TimeoutError:
            ending = "timeout"
        with self._lock:
            self.endings[head] = ending

    def ending(self, token: bytes, timeout: float = 10.0) -> str | None:
        wait_until(lambda: token in self.endings, timeout)
        return self.endings.get(token)


def resetting_handler(conn: socket.socket) -> None:
    """Send 256 KiB, then reset the connection (SO_LINGER 0) in the middle of the stream."""
    conn.sendall(pattern(256 * 1024))
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Staller:
    """A target that accepts and never reads, until :meth:`release` (then it closes, resetting)."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.server = TcpServer(self._handle)

    def _handle(self, conn: socket.socket) -> None:
        self.released.wait(60)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def release(self) -> None:
        self.released.set()

    def stall(self) -> None:
        """Stall the connections accepted from now on (after a :meth:`release`)."""
        self.released.clear()


# ---------------------------------------------------------------------------
# The shared pair


@dataclass
class Stack:
    frontend: Daemon
    backend: Daemon
    backend_port: int
    ports: dict[str, int]  # frontend tunnel name -> local port
    recorder: EchoRecorder
    sink: EchoRecorder
    staller: Staller


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("faults")
    recorder, sink, staller = EchoRecorder(), EchoRecorder(echo=False), Staller()
    resetter = TcpServer(resetting_handler)
    backend_port = free_port()
    routes = {"default": recorder.address, "sink": sink.address, "stall": staller.server.address,
              "reset": resetter.address,
              "refuse": f"127.0.0.1:{free_port()}"}
    back = backend(write_yaml(tmp, "backend.yaml", {"listeners": [
        {"name": "main", "listen": f"127.0.0.1:{backend_port}", "routes": routes,
         "resume_timeout": RESUME_TIMEOUT}]})).wait_ready()
    ports = {name: free_port() for name in ("echo", "stall", "stall-unresumable", "reset", "refuse")}
    tunnels = [{"name": name, "listen": f"127.0.0.1:{port}",
                "route": name.removesuffix("-unresumable"), "resume": not name.endswith("-unresumable")}
               if name != "echo" else {"name": name, "listen": f"127.0.0.1:{port}"}
               for name, port in ports.items()]
    try:
        front = frontend(write_yaml(tmp, "frontend.yaml", {
            "backend": f"ws://127.0.0.1:{backend_port}/", "tunnels": tunnels})).wait_ready()
    except BaseException:
        back.stop()
        raise
    yield Stack(front, back, backend_port, ports, recorder, sink, staller)
    staller.release()
    front.stop(), back.stop()
    recorder.server.close(), sink.server.close(), staller.server.close(), resetter.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def round_trip(port: int, size: int = 64 * 1024) -> None:
    """Send ``size`` random bytes through an echo tunnel, half-close, and check all of them came back."""
    data = os.urandom(size)
    with connect(port) as client:
        send_then_shutdown(client, data)
        received = recv_all(client, timeout=30)
    assert len(received) == size and sha256(received) == sha256(data)


def assert_serves(stack: Stack) -> None:
    """The daemons still serve other tunnels: a fresh one round-trips bytes, promptly."""
    started = time.monotonic()
    round_trip(stack.ports["echo"])
    assert time.monotonic() - started < 5


def warnings(daemon: Daemon) -> list[str]:
    return [line for line in daemon.log.splitlines() if " WARNING " in line or line.startswith("<4>")]


def settled(daemon: Daemon, timeout: float = IDLE_SECONDS + 10.0) -> tuple[int, int]:
    """The daemon's (fds, threads) once they stayed the same for longer than a pooled worker stays parked.

    Earlier tests leave parked worker threads that exit up to IDLE_SECONDS after
    their last task: a baseline taken before they are gone would never be seen again.
    """
    deadline = time.monotonic() + timeout
    last = (daemon.fds(), daemon.threads())
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = (daemon.fds(), daemon.threads())
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= IDLE_SECONDS + 0.5:
            break
    return last


def back_to(daemon: Daemon, baseline: tuple[int, int], timeout: float = IDLE_SECONDS + 20.0) -> bool:
    """Whether the daemon's (fds, threads) return to ``baseline``: threads once its idle workers exited."""
    return wait_until(lambda: (daemon.fds(), daemon.threads()) == baseline, timeout, interval=0.1)


def close_code(ws: gopeer.GoWebsocket, timeout: float = 10.0) -> int:
    """Read frames until the close frame; return its status code."""
    deadline = time.monotonic() + timeout
    while True:
        frame = ws.recv_frame(max(deadline - time.monotonic(), 0.01))
        if frame.opcode == gopeer.OP_CLOSE:
            return int(struct.unpack("!H", frame.payload[:2])[0])


def reads_eof_or_reset(sock: socket.socket, timeout: float = 10.0) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def open_raw(stack: Stack) -> tuple[gopeer.GoWebsocket, bytes]:
    """A websocket to the backend's sink route, carrying a token the target has already received.

    A sink, not an echo: while the backend is sending a data frame, an abort does not wait to
    send its close frame (the peer then sees the connection drop without one), so bad input is
    tested on a tunnel whose backend has nothing to send.
    """
    ws = gopeer.go_frontend_dial(stack.backend_port, path=f"{BRIDGE_PATH}/sink")
    token = os.urandom(TOKEN_BYTES)
    ws.write(token)
    assert wait_until(lambda: token in stack.sink.seen, 10)
    return ws, token


def _frame(opcode: int, payload: bytes, **kwargs: object) -> bytes:
    return gopeer.encode_frame(opcode, payload, mask=kwargs.pop("mask", MASK), **kwargs)  # type: ignore[arg-type]


MALFORMED = [
    pytest.param(_frame(0x3, b""), id="reserved-opcode-0x3"),
    pytest.param(_frame(gopeer.OP_TEXT, b"6869", rsv=0x4), id="rsv1-set"),
    pytest.param(_frame(gopeer.OP_TEXT, b"6869", mask=None), id="unmasked-client-frame"),
    pytest.param(_frame(gopeer.OP_PING, b"x" * 126), id="control-frame-126-bytes"),
    pytest.param(_frame(gopeer.OP_PING, b"x", fin=False), id="fragmented-control-frame"),
    pytest.param(_frame(gopeer.OP_CONT, b"6869"), id="continuation-without-start"),
    pytest.param(_frame(gopeer.OP_TEXT, b"68", fin=False) + _frame(gopeer.OP_TEXT, b"69"),
                 id="new-message-inside-fragmented-one"),
]


# ---------------------------------------------------------------------------
# Malformed websocket input


@pytest.mark.parametrize("raw", MALFORMED)
def test_malformed_frame_closes_1002_and_resets_the_target(stack: Stack, raw: bytes) -> None:
    """User sees: the websocket peer gets close 1002 and then EOF; the target's connection is reset
    (never a clean FIN); the backend logs exactly one warning line naming the problem."""
    ws, token = open_raw(stack)
    before = len(warnings(stack.backend))
    try:
        ws.send_raw(raw)
        assert close_code(ws) == 1002
        assert reads_eof_or_reset(ws.sock)
    finally:
        ws.close()
    assert stack.sink.ending(token) == "reset"
    assert wait_until(lambda: len(warnings(stack.backend)) > before, 5)
    time.sleep(0.1)
    new = warnings(stack.backend)[before:]
    assert len(new) == 1 and "bad frame from the websocket peer" in new[0] and "closing with 1002" in new[0], new
    assert_serves(stack)


def test_bad_hex_odd_length_and_oversized_messages(stack: Stack) -> None:
    """User sees: close 1007 for non-hex or odd-length text, 1009 for a message over max_message_bytes
    (1 MiB by default); each time the target is reset and others are served."""
    cases = [(b"zz", 1007), (b"abc", 1007), (b"00" * (512 * 1024) + b"00", 1009)]
    for payload, code in cases:
        ws, token = open_raw(stack)
        try:
            ws.send_raw(_frame(gopeer.OP_TEXT, payload))
            assert close_code(ws) == code, payload[:8]
        finally:
            ws.close()
        assert stack.sink.ending(token) == "reset"
    assert_serves(stack)


# ---------------------------------------------------------------------------
# Garbage and slow clients on the backend port

GARBAGE = [
    bytes(range(256)) * 16,
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64) + b"\r\n\r\n",  # a TLS ClientHello
    b"\x00" * 1000 + b"\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"A" * 70000,  # one endless request line
    b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
    f"GET {BRIDGE_PATH} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n".encode()
    + b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: \xff\xfe\r\n\r\n",
]


def test_garbage_on_the_backend_port_is_refused_and_harmless(stack: Stack) -> None:
    """User sees: an HTTP error (400/414/431/505, or just a closed connection), never a 101; the target
    is never dialled, nothing crashes (no traceback), and other clients are served."""
    dialled = len(stack.recorder.endings)
    tracebacks = stack.backend.log.count("Traceback")
    for garbage in GARBAGE:
        with socket.create_connection(("127.0.0.1", stack.backend_port), timeout=10) as sock:
            with contextlib.suppress(OSError):
                sock.sendall(garbage)
                sock.shutdown(socket.SHUT_WR)
            try:
                answer = recv_all(sock, timeout=10)
            except ConnectionResetError:
                answer = b""
        assert not answer.startswith(b"HTTP/1.1 101"), answer[:80]
        status = answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/") else answer[:3]
        assert answer == b"" or status[:1] in (b"4", b"5"), answer[:80]
    time.sleep(0.2)
    assert len(stack.recorder.endings) == dialled
    assert stack.backend.log.count("Traceback") == tracebacks, stack.backend.log[-3000:]
    assert_serves(stack)


def test_slowloris_does_not_block_other_clients(stack: Stack) -> None:
    """A client sending its request one byte every 0.5 s holds only its own connection: meanwhile
    fresh tunnels open and round-trip at normal speed. (The 30 s handshake timeout is not waited for.)"""
    request = f"GET {BRIDGE_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n".encode()
    slow = socket.create_connection(("127.0.0.1", stack.backend_port), timeout=10)
    stop = threading.Event()
    sent = []

    def trickle() -> None:
        for byte in request[:12]:  # 12 bytes, 6 s at most
            if stop.is_set():
                return
            with contextlib.suppress(OSError):
                slow.sendall(bytes([byte]))
                sent.append(byte)
            stop.wait(0.5)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        latencies = []
        for _ in range(6):
            started = time.monotonic()
            round_trip(stack.ports["echo"], 16 * 1024)
            latencies.append(time.monotonic() - started)
            time.sleep(0.4)
        assert len(sent) >= 5, "the slow client was not trickling meanwhile"
        assert max(latencies) < 2, latencies
        slow.settimeout(0.01)
        with pytest.raises(TimeoutError):
            slow.recv(1)  # no answer yet: its request is still incomplete
    finally:
        stop.set()
        thread.join(5)
        slow.close()
    assert_serves(stack)


def test_handshake_timeout_is_a_deadline_not_a_per_read_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client trickling its request must be cut off once the handshake timeout has passed in total.

    The backend documents HANDSHAKE_TIMEOUT as the seconds a connection may take to send a complete
    request, but it is applied as a per-read socket timeout: one byte every 0.5 s keeps a handler
    thread and an fd forever (measured on a real backend: still open after 40 s with the 30 s value).
    Shortened here to 1 s on an in-process backend so the check takes ~2 s.
    """
    from bridge import backend as backend_module
    from bridge import frontdoor
    from bridge.config import parse_backend
    from bridge.registry import TunnelRegistry

    monkeypatch.setattr(frontdoor, "HANDSHAKE_TIMEOUT", 1.0)
    monkeypatch.setattr(frontdoor.BridgeRequestHandler, "timeout", 1.0)
    port = free_port()
    registry = TunnelRegistry()  # its housekeeper enforces the deadline, as in the daemon
    registry.start()
    daemon = backend_module.Backend(parse_backend({"listeners": [
        {"name": "l", "listen": f"127.0.0.1:{port}", "routes": {"default": f"127.0.0.1:{free_port()}"}}]}),
        registry)
    daemon.bind()
    daemon.start()
    request = f"GET {BRIDGE_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
    cut_after = None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            started = time.monotonic()
            sock.settimeout(0.3)
            for byte in request[:10]:  # 10 x 0.3 s = 3 s at most
                try:
                    sock.sendall(bytes([byte]))
                    if not sock.recv(4096):
                        cut_after = time.monotonic() - started
                        break
                except TimeoutError:
                    continue
                except OSError:
                    cut_after = time.monotonic() - started
                    break
    finally:
        daemon.close_listeners()
        registry.stop()
    assert cut_after is not None and cut_after < 2.5, (
        "a client sending one byte every 0.3 s was never cut off by the 1 s handshake timeout")


def test_flood_of_unfinished_handshakes(stack: Stack) -> None:
    """2000 connections that send half a request and stall: a normal tunnel still works meanwhile;
    once they close, the backend's fds and threads return to their baseline."""
    count = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = count + 1024
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    baseline = settled(stack.backend)
    tracebacks = stack.backend.log.count("Traceback")
    half = f"GET {BRIDGE_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgr".encode()
    socks: list[socket.socket] = []
    try:
        started = time.monotonic()
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", stack.backend_port), timeout=10)
            sock.sendall(half)
            socks.append(sock)
        assert wait_until(lambda: stack.backend.fds() >= baseline[0] + count, 30, interval=0.1), (
            f"backend holds {stack.backend.fds()} fds, baseline {baseline[0]}")
        print(f"\n{count} stalled handshakes opened in {time.monotonic() - started:.2f} s; backend holds "
              f"{stack.backend.fds()} fds, {stack.backend.threads()} threads")
        began = time.monotonic()
        round_trip(stack.ports["echo"], 256 * 1024)
        assert time.monotonic() - began < 5
    finally:
        for index, sock in enumerate(socks):
            if index % 2:  # half of them reset, half close cleanly
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
    assert back_to(stack.backend, baseline, IDLE_SECONDS + 30), (
        f"backend: fds {stack.backend.fds()}, threads {stack.backend.threads()}; baseline {baseline}")
    assert stack.backend.log.count("Traceback") == tracebacks, stack.backend.log[-3000:]
    assert_serves(stack)


# ---------------------------------------------------------------------------
# Targets that refuse, stall, reset


def test_refusing_target_resets_the_client_at_once(stack: Stack) -> None:
    """User sees: the connection is reset within moments (the backend answered 502 with the reason)."""
    started = time.monotonic()
    with pytest.raises(ConnectionResetError), connect(stack.ports["refuse"]) as client:  # reset may beat connect()
        recv_all(client)
    assert time.monotonic() - started < 5
    assert stack.frontend.wait_for_log("HTTP 502")
    assert_serves(stack)


@pytest.mark.parametrize("tunnel", ["stall", "stall-unresumable"])
def test_closing_the_client_ends_a_tunnel_whose_target_stalls(stack: Stack, tunnel: str) -> None:
    """The target accepts and never reads; the client pushes until blocked, then goes away (reset).
    Expected: both daemons end that tunnel (docs/reliability.md: a reset on one TCP side resets the
    other), a tunnel without resume within seconds.

    The backend's reader is stuck writing to the target, so it cannot read the frontend's close frame
    behind the queued bytes: it sees the websocket's connection gone. A resumable tunnel takes that for
    a drop and waits ``resume_timeout`` for a re-attach that never comes.
    """
    closed = f"[{tunnel}] closed", "[main/stall] closed"
    bound = 10 + (RESUME_TIMEOUT if tunnel == "stall" else 0)
    before = stack.frontend.log.count(closed[0]), stack.backend.log.count(closed[1])
    stack.staller.stall()
    client = connect(stack.ports[tunnel])
    pushed = 0
    try:
        client.settimeout(2)
        block = os.urandom(1 << 20)
        with pytest.raises(TimeoutError):
            for _ in range(64):
                client.sendall(block)
                pushed += 1
        assert pushed < 48, f"{pushed} MiB went in: nothing pushed back"
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        ended = wait_until(lambda: (stack.frontend.log.count(closed[0]), stack.backend.log.count(closed[1]))
                           == (before[0] + 1, before[1] + 1), bound, interval=0.1)
        assert ended, f"{bound} s after the client reset, the stalled tunnel is still open in " + " and ".join(
            name for name, log, marker, n in (("frontend", stack.frontend.log, closed[0], before[0]),
                                              ("backend", stack.backend.log, closed[1], before[1]))
            if log.count(marker) == n)
    finally:
        client.close()
        stack.staller.release()  # its reset ends whatever is left of the tunnel
        wait_until(lambda: stack.backend.log.count(closed[1]) > before[1], 10)
    assert_serves(stack)


def test_target_reset_mid_stream_is_a_reset_never_an_eof(stack: Stack) -> None:
    """The target sends 256 KiB then resets. User sees: part of the stream (a true prefix), then
    ECONNRESET — never a clean EOF, so a cut download cannot pass for a complete one."""
    expected = pattern(256 * 1024)
    for _ in range(5):
        received = bytearray()
        with connect(stack.ports["reset"]) as client:
            client.settimeout(10)
            with pytest.raises(ConnectionResetError):
                while data := client.recv(1 << 16):
                    received += data
        assert expected.startswith(bytes(received))
    assert_serves(stack)


# ---------------------------------------------------------------------------
# A daemon killed mid-transfer, then restarted


class Stream:
    """A client pushing a known stream through an echo tunnel while reading the echo back.

    Sending happens on a non-blocking duplicate of the socket, so :meth:`stop_sending` takes
    effect at once. A test that judges how the connection ended must stop sending first: a send
    that meets the reset consumes the socket's ECONNRESET, and a later recv() then returns a
    plain EOF even though no FIN ever arrived.
    """

    LIMIT = 64 * 1024 * 1024

    def __init__(self, port: int) -> None:
        self.sock = connect(port)
        self.token = os.urandom(TOKEN_BYTES)
        self.data = self.token + pattern(self.LIMIT)
        self.received = bytearray()
        self._stop = threading.Event()
        self._sender = threading.Thread(target=self._send, daemon=True)
        self._sender.start()

    def _send(self) -> None:
        sock = self.sock.dup()
        sock.setblocking(False)
        view, offset = memoryview(self.data), 0
        try:
            while offset < len(view) and not self._stop.is_set():
                if select.select([], [sock], [], 0.05)[1]:
                    try:
                        offset += sock.send(view[offset:offset + 65536])
                    except BlockingIOError:
                        continue
                    except OSError:
                        return
        finally:
            sock.close()

    def stop_sending(self) -> None:
        self._stop.set()
        self._sender.join(10)

    def read_at_least(self, n: int, timeout: float = 10.0) -> None:
        self.sock.settimeout(timeout)
        while len(self.received) < n:
            data = self.sock.recv(1 << 18)
            assert data, "EOF while streaming"
            self.received += data

    def ending(self, timeout: float = 10.0) -> str:
        """Read on until the connection ends: 'reset' or 'eof' (a clean close)."""
        self.sock.settimeout(timeout)
        try:
            while data := self.sock.recv(1 << 18):
                self.received += data
        except ConnectionResetError:
            return "reset"
        except TimeoutError:
            return "timeout"
        return "eof"

    def close(self) -> None:
        self.stop_sending()
        self.sock.close()


def restart_to_first_byte(spawn: Callable[[], Daemon], port: int,
                          timeout: float = 15.0) -> tuple[Daemon, float, int]:
    """Spawn a daemon; return it, the seconds until a new tunnel through ``port`` echoed a byte, and
    how many attempts that took."""
    started = time.monotonic()
    start = spawn()
    attempts = 0
    while time.monotonic() - started < timeout:
        attempts += 1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as client:
                client.sendall(b"x")
                if recv_exactly(client, 1, timeout=2) == b"x":
                    return start, time.monotonic() - started, attempts
        except (OSError, EOFError):
            time.sleep(0.02)
    raise AssertionError(f"nothing served {timeout} s after the restart ({attempts} attempts):\n{start.log}")


def test_backend_killed_mid_transfer_resets_the_client_then_restarts(tmp_path: Path) -> None:
    """SIGKILL of the backend while bytes flow, without resume: user sees ECONNRESET (never a clean EOF),
    and every byte received before it is a true prefix of what was sent. Restarted on the same port,
    the backend serves a new tunnel within seconds (time printed; run with -s). A resumable tunnel
    redials instead (tests/test_reliability.py: the restarted backend's refusal resets the client)."""
    recorder = EchoRecorder()
    pair = start_pair(tmp_path, recorder.address, frontend_extra={"resume": False})
    stream = Stream(pair.frontend_port)
    try:
        stream.read_at_least(2 << 20)
        stream.stop_sending()  # the frontend still holds unsent upload: its send to the dead backend fails
        pair.backend.proc.send_signal(signal.SIGKILL)
        assert stream.ending() == "reset"
        assert stream.data.startswith(bytes(stream.received))
        assert pair.frontend.wait_for_log("closed (abort: websocket ")
        restarted, elapsed, attempts = restart_to_first_byte(lambda: backend(tmp_path / "backend.yaml"),
                                                             pair.frontend_port)
        print(f"\nbackend SIGKILL -> restart-to-first-byte {elapsed:.3f} s ({attempts} attempts)")
        assert elapsed < RESTART_BOUND
        round_trip(pair.frontend_port, 256 * 1024)
        restarted.stop()
    finally:
        stream.close()
        pair.frontend.stop(), pair.backend.stop(), recorder.server.close()


def test_frontend_killed_mid_transfer_resets_the_target_then_restarts(tmp_path: Path) -> None:
    """SIGKILL of the frontend while bytes flow, without resume: the target's connection is reset (the
    backend saw the websocket drop without a close frame). Restarted on the same port, the frontend
    serves a new tunnel within seconds (time printed; run with -s). A resumable tunnel's target waits
    ``resume_timeout`` first (tests/test_reliability.py)."""
    recorder = EchoRecorder()
    pair = start_pair(tmp_path, recorder.address, frontend_extra={"resume": False})
    stream = Stream(pair.frontend_port)
    try:
        stream.read_at_least(2 << 20)
        pair.frontend.proc.send_signal(signal.SIGKILL)
        assert recorder.ending(stream.token) == "reset"
        assert pair.backend.wait_for_log("closed (abort: websocket ")
        restarted, elapsed, attempts = restart_to_first_byte(lambda: frontend(tmp_path / "frontend.yaml"),
                                                             pair.frontend_port)
        print(f"\nfrontend SIGKILL -> restart-to-first-byte {elapsed:.3f} s ({attempts} attempts)")
        assert elapsed < RESTART_BOUND
        round_trip(pair.frontend_port, 256 * 1024)
        restarted.stop()
    finally:
        stream.close()
        pair.frontend.stop(), pair.backend.stop(), recorder.server.close()


def test_a_websocket_reset_mid_transfer_never_reaches_the_client_as_a_clean_eof(tmp_path: Path) -> None:
    """The backend's connection is reset while bytes flow both ways (what a SIGKILLed or crashed backend
    looks like). User must see ECONNRESET, never a clean EOF: a cut download must not look complete.

    Fails today, about one time in five: when the abort comes from the upload thread (its websocket
    send failed) while the download thread is inside sendall() to the client, Tunnel.abort() shuts the
    client socket down with SHUT_RDWR to wake that writer. That sends a FIN, which the client reads
    (after the data already queued) before the RST that close() sends a moment later; recv() returns
    0. Played here with a fake Go backend (it never reads, streams data, then resets), up to 30 times.
    """
    fake = gopeer.GoBackend()
    port = free_port()
    front = frontend(write_yaml(tmp_path, "frontend.yaml", {
        "backend": f"ws://127.0.0.1:{fake.port}/", "tunnels": [{"name": "t", "listen": f"127.0.0.1:{port}"}]}))
    frame = gopeer.go_backend_message(os.urandom(32 * 1024))
    endings: dict[str, int] = {}
    try:
        front.wait_ready()
        deadline = time.monotonic() + 30
        for _ in range(30):
            if time.monotonic() > deadline or endings.get("eof"):
                break
            client = connect(port)
            conn = fake.accept()
            assert conn.ws is not None
            stop = threading.Event()

            def feed(ws: gopeer.GoWebsocket = conn.ws, stop: threading.Event = stop) -> None:
                with contextlib.suppress(OSError):
                    while not stop.is_set():
                        ws.send_raw(frame)

            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            upload = client.dup()  # sends on a duplicate, so that only recv() meets the end
            upload.setblocking(False)
            block, pushed, got = os.urandom(1 << 16), 0, 0
            push_until = time.monotonic() + 3
            while time.monotonic() < push_until and not (got > 1 << 20 and pushed > 6 << 20):
                with contextlib.suppress(BlockingIOError):
                    pushed += upload.send(block)
                if select.select([client], [], [], 0)[0]:
                    got += len(client.recv(1 << 18))
            upload.close()
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.sock.close()  # RST: the backend is gone
            stop.set()
            client.settimeout(10)
            try:
                while client.recv(1 << 18):
                    pass
                ending = "eof"
            except ConnectionResetError:
                ending = "reset"
            except TimeoutError:
                ending = "timeout"
            client.close()
            feeder.join(5)
            endings[ending] = endings.get(ending, 0) + 1
    finally:
        front.stop()
        fake.close()
    assert set(endings) == {"reset"}, f"how the client's stream ended, over {sum(endings.values())} tries: {endings}"


# ---------------------------------------------------------------------------
# Many tunnels at once (the 1000 x 1 MiB version is bench/soak.py)


def test_200_concurrent_tunnels_of_256_kib_both_ways_lose_and_corrupt_nothing(stack: Stack) -> None:
    """200 tunnels at once, each echoing 256 KiB of random bytes: 0 corrupted, 0 lost (sha256 checked),
    and both daemons return to their idle fd and thread counts."""
    count, size = 200, 256 * 1024
    baselines = {daemon: settled(daemon) for daemon in (stack.frontend, stack.backend)}

    def one(_: int) -> str:
        data = os.urandom(size)
        try:
            with connect(stack.ports["echo"]) as client:
                send_then_shutdown(client, data)
                received = recv_all(client, timeout=60)
        except OSError as exc:
            return f"lost ({exc})"
        if len(received) != size:
            return f"lost ({len(received)} of {size} bytes)"
        return "ok" if hashlib.sha256(received).digest() == hashlib.sha256(data).digest() else "corrupted"

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=count) as pool:
        results = list(pool.map(one, range(count)))
    elapsed = time.monotonic() - started
    print(f"\n{count} tunnels x {size // 1024} KiB both ways in {elapsed:.2f} s "
          f"({2 * count * size / elapsed / 2**20:.1f} MiB/s through)")
    failures = [result for result in results if result != "ok"]
    assert not failures, f"{len(failures)} of {count}: {failures[:5]}"
    for daemon, baseline in baselines.items():
        assert back_to(daemon, baseline), f"{daemon.args[0]}: {(daemon.fds(), daemon.threads())} vs {baseline}"
    assert_serves(stack)
