"""``connect_timeout`` is one deadline for the whole dial: TCP connect, the proxy's CONNECT answer, the TLS
handshake and the websocket upgrade together, and a dial that runs out of it says in which step.

Every double here is a loopback server on a thread that is joined when the test ends; every one of them
gives up after SERVER_LIFETIME whatever the client does. Elapsed times are only checked against an upper
bound (the dial must end by its deadline, plus SLACK for a loaded machine), never against a lower one.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge import frontend as frontend_module
from bridge.config import FrontendTunnel, parse_frontend
from bridge.handshake import accept_token
from bridge.secrets import SecretResolver
from bridge.transport import DialError, DialFailure
from tests.helpers import free_port, frontend, started, write_yaml
from tests.pki import Issued, Pki, require_tools

CONNECT_TIMEOUT = 0.5
#: connect_timeout of the dials that must succeed: room for a loaded machine.
GENEROUS_TIMEOUT = 10.0
#: Room past the deadline for a loaded machine: the dial must have ended by connect_timeout + SLACK.
SLACK = 0.5
#: The pace of every trickle: one byte per pause.
TRICKLE_PAUSE = 0.05
#: No double lives longer than this, whatever its client does.
SERVER_LIFETIME = 10.0
#: Largest request head a double reads.
MAX_HEAD = 65536

SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
#: A CONNECT answer that takes ~7 s at the trickle's pace: never complete within the deadline.
SLOW_PROXY_ANSWER = b"HTTP/1.1 200 Connection established\r\nVia: " + b"x" * 100 + b"\r\n\r\n"
#: An answer to the upgrade that takes ~10 s at the trickle's pace.
SLOW_SWITCH = SWITCH + b"X-Filler: " + b"y" * 100 + b"\r\nSec-WebSocket-Accept: x\r\n\r\n"
#: A TLS handshake record header announcing 4096 bytes, then a few of them: an answer that never completes.
PARTIAL_TLS_RECORD = b"\x16\x03\x03\x10\x00" + b"\x02" * 200

Handler = Callable[[socket.socket, threading.Event], None]


class OneConnection:
    """A loopback TCP server running ``handler(conn, stop)`` for its first connection, on a thread close() joins."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(SERVER_LIFETIME)
        self.port = int(self.sock.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, name="dial-deadline-double", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn, contextlib.suppress(OSError, EOFError):  # the dial giving up is the usual end
            conn.settimeout(SERVER_LIFETIME)
            self.handler(conn, self.stop)

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes an accept() still waiting
        self.sock.close()
        self.thread.join(SERVER_LIFETIME + 5)
        assert not self.thread.is_alive(), "a test double did not stop"


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], OneConnection]]:
    servers: list[OneConnection] = []

    def start(handler: Handler) -> OneConnection:
        server = OneConnection(handler)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pki, Issued]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    require_tools("openssl")
    pki = Pki(tmp_path_factory.mktemp("pki"))
    return pki, pki.issue("backend", ips=["127.0.0.1"])


def server_context(cert: Issued) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert, cert.key)
    return context


# ---------------------------------------------------------------------------
# What the doubles do


def read_head(conn: socket.socket) -> bytes:
    """An HTTP request head (CONNECT or the upgrade), bounded in size; EOFError if the client hangs up first."""
    head = b""
    while b"\r\n\r\n" not in head:
        if len(head) > MAX_HEAD:
            raise AssertionError("request head too large")
        data = conn.recv(4096)
        if not data:
            raise EOFError("client hung up")
        head += data
    return head


def switching(request: bytes) -> bytes:
    """A valid 101 for the upgrade ``request``."""
    key = next(line.split(b":", 1)[1].strip().decode() for line in request.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    return SWITCH + f"Sec-WebSocket-Accept: {accept_token(key)}\r\n\r\n".encode()


def trickle(conn: socket.socket, stop: threading.Event, data: bytes) -> None:
    """Send ``data`` one byte per TRICKLE_PAUSE, until all is sent, ``stop``, or the client hangs up (OSError)."""
    give_up = time.monotonic() + SERVER_LIFETIME
    for index in range(len(data)):
        if stop.is_set() or time.monotonic() > give_up:
            return
        conn.sendall(data[index:index + 1])
        stop.wait(TRICKLE_PAUSE)


def wait_for_hang_up(conn: socket.socket, stop: threading.Event) -> None:
    """Hold the connection until the client closes it or the test ends."""
    conn.settimeout(TRICKLE_PAUSE)
    give_up = time.monotonic() + SERVER_LIFETIME
    while not stop.is_set() and time.monotonic() < give_up:
        try:
            if not conn.recv(4096):
                return
        except TimeoutError:
            continue


def trickling_proxy(conn: socket.socket, stop: threading.Event) -> None:
    read_head(conn)
    trickle(conn, stop, SLOW_PROXY_ANSWER)


def trickling_upgrade_answer(conn: socket.socket, stop: threading.Event) -> None:
    read_head(conn)
    trickle(conn, stop, SLOW_SWITCH)


def silent_tls(conn: socket.socket, stop: threading.Event) -> None:
    """Reads the ClientHello and never answers it."""
    wait_for_hang_up(conn, stop)


def partial_tls_record(conn: socket.socket, stop: threading.Event) -> None:
    """Answers the ClientHello with a record that never completes, one byte at a time."""
    conn.recv(4096)
    trickle(conn, stop, PARTIAL_TLS_RECORD)


def trickling_tls(cert: Issued) -> Handler:
    """A real TLS server handshake whose every byte to the client is held back TRICKLE_PAUSE."""
    context = server_context(cert)

    def handle(conn: socket.socket, stop: threading.Event) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=True)
        conn.settimeout(TRICKLE_PAUSE)  # the pace: each turn waits this long for the client
        pending = b""
        give_up = time.monotonic() + SERVER_LIFETIME
        while not stop.is_set() and time.monotonic() < give_up:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                data = None
            if data == b"":
                return
            if data:
                incoming.write(data)
            with contextlib.suppress(ssl.SSLWantReadError):
                tls.do_handshake()
            pending += outgoing.read()
            if pending:
                conn.sendall(pending[:1])
                pending = pending[1:]

    return handle


def tls_websocket(cert: Issued) -> Handler:
    """A TLS websocket server that answers the upgrade with a 101 at once."""
    context = server_context(cert)

    def handle(conn: socket.socket, stop: threading.Event) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(switching(read_head(tls)))
            wait_for_hang_up(tls, stop)

    return handle


def proxy_then_backend(connect_delay: float, upgrade_delay: float) -> Handler:
    """A CONNECT proxy answering 200 after ``connect_delay`` that is then the backend itself, answering the
    upgrade with a valid 101 ``upgrade_delay`` after the request."""
    def handle(conn: socket.socket, stop: threading.Event) -> None:
        read_head(conn)
        if stop.wait(connect_delay):
            return
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        request = read_head(conn)
        if stop.wait(upgrade_delay):
            return
        conn.sendall(switching(request))
        wait_for_hang_up(conn, stop)

    return handle


# ---------------------------------------------------------------------------
# Dialing


def tunnel_to(url: str, **settings: object) -> FrontendTunnel:
    config = parse_frontend({"backend": url, "connect_timeout": CONNECT_TIMEOUT, **settings,
                             "tunnels": [{"name": "t", "listen": "127.0.0.1:1"}]})
    return config.tunnels[0]


def dial_times_out(tunnel: FrontendTunnel, *, channel: bool = False) -> str:
    """Dial ``tunnel`` (:func:`~bridge.frontend.open_endpoint` with ``channel``, else :func:`~bridge.frontend.dial`),
    which must fail by its deadline with a DialError counted as a timeout; return its message."""
    secrets = SecretResolver()
    started_at = time.monotonic()
    try:
        if channel:
            frontend_module.open_endpoint(tunnel, secrets, environ={}).close()
        else:
            frontend_module.dial(tunnel, secrets, environ={}).sock.close()
    except DialError as exc:
        elapsed = time.monotonic() - started_at
        message = str(exc)
        assert elapsed < CONNECT_TIMEOUT + SLACK, f"the dial ended {elapsed:.2f} s after it started: {message}"
        assert exc.reason is DialFailure.TIMEOUT and exc.label == "timeout", message
        return message
    raise AssertionError("the dial succeeded")


def timed_out(step: str) -> str:
    return f"timed out after {CONNECT_TIMEOUT:g} s (connect_timeout) {step}"


def test_a_proxy_trickling_its_connect_answer_is_given_up_at_the_deadline(
        serve: Callable[[Handler], OneConnection]) -> None:
    proxy = serve(trickling_proxy)
    message = dial_times_out(tunnel_to("ws://127.0.0.1:9/", proxy=f"http://127.0.0.1:{proxy.port}"), channel=True)
    assert message == timed_out(f"waiting for proxy http://127.0.0.1:{proxy.port} (from proxy setting) "
                                "to answer CONNECT")


@pytest.mark.parametrize("handler", [silent_tls, partial_tls_record], ids=["silent", "partial-record"])
def test_a_tls_server_that_does_not_finish_the_handshake_is_given_up_at_the_deadline(
        serve: Callable[[Handler], OneConnection], handler: Handler) -> None:
    server = serve(handler)
    message = dial_times_out(tunnel_to(f"wss://127.0.0.1:{server.port}/", tls={"verify": False}))
    assert message == timed_out(f"during the TLS handshake with 127.0.0.1:{server.port}")


def test_a_tls_server_trickling_a_real_handshake_is_given_up_at_the_deadline(
        serve: Callable[[Handler], OneConnection], certificate: tuple[Pki, Issued]) -> None:
    pki, cert = certificate
    server = serve(trickling_tls(cert))
    message = dial_times_out(tunnel_to(f"wss://127.0.0.1:{server.port}/", tls={"ca_file": str(pki.ca_cert)}))
    assert message == timed_out(f"during the TLS handshake with 127.0.0.1:{server.port}")


def test_a_tls_handshake_done_in_time_leaves_a_blocking_socket(
        serve: Callable[[Handler], OneConnection], certificate: tuple[Pki, Issued]) -> None:
    pki, cert = certificate
    server = serve(tls_websocket(cert))
    tunnel = tunnel_to(f"wss://127.0.0.1:{server.port}/", tls={"ca_file": str(pki.ca_cert)},
                       connect_timeout=GENEROUS_TIMEOUT)
    opened = frontend_module.dial(tunnel, SecretResolver(), environ={})
    with opened.sock:
        assert isinstance(opened.sock, ssl.SSLSocket)
        assert opened.sock.gettimeout() is None  # blocking, no timeout: the tunnel's pumps expect that
        assert opened.received == b""


def test_a_backend_trickling_its_101_is_given_up_at_the_deadline(
        serve: Callable[[Handler], OneConnection]) -> None:
    server = serve(trickling_upgrade_answer)
    message = dial_times_out(tunnel_to(f"ws://127.0.0.1:{server.port}/"), channel=True)
    assert message == timed_out("waiting for the backend's answer to the websocket upgrade")


def test_the_steps_share_one_deadline(serve: Callable[[Handler], OneConnection]) -> None:
    # Each step alone is well within connect_timeout (a timeout per step would let this dial succeed);
    # together they are not. The CONNECT answer comes early enough to be in time on a loaded machine,
    # and the 101 comes after the deadline whatever the machine's speed (0.15 + 0.4 > 0.5).
    proxy = serve(proxy_then_backend(0.15, 0.4))
    message = dial_times_out(tunnel_to("ws://127.0.0.1:9/", proxy=f"http://127.0.0.1:{proxy.port}"))
    assert message == timed_out("waiting for the backend's answer to the websocket upgrade "
                                f"via proxy http://127.0.0.1:{proxy.port} (from proxy setting)")


def test_steps_done_in_time_through_a_proxy_open_the_websocket(serve: Callable[[Handler], OneConnection]) -> None:
    proxy = serve(proxy_then_backend(0.0, 0.0))
    tunnel = tunnel_to("ws://127.0.0.1:9/", proxy=f"http://127.0.0.1:{proxy.port}", connect_timeout=GENEROUS_TIMEOUT)
    opened = frontend_module.dial(tunnel, SecretResolver(), environ={})
    with opened.sock:
        assert opened.sock.gettimeout() is None


def test_a_tcp_connect_that_never_completes_is_given_up_at_the_deadline() -> None:
    # A listener whose accept queue is full: the kernel drops new SYNs, so connect() hangs (SYN retried after 1 s).
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        fillers: list[socket.socket] = []
        try:
            for _ in range(8):
                probe = socket.socket()
                probe.settimeout(0.5)
                try:
                    probe.connect(("127.0.0.1", port))
                except TimeoutError:
                    probe.close()
                    break
                fillers.append(probe)
            else:
                pytest.skip("the kernel did not hold back a connect to a full accept queue")
            message = dial_times_out(tunnel_to(f"ws://127.0.0.1:{port}/"))
        finally:
            for filler in fillers:
                filler.close()
    assert message == timed_out(f"connecting to 127.0.0.1:{port}")


def test_the_frontend_logs_which_step_ran_out(tmp_path: Path, serve: Callable[[Handler], OneConnection]) -> None:
    proxy = serve(trickling_proxy)
    listen = free_port()
    config = write_yaml(tmp_path, "frontend.yaml", {
        "backend": "ws://127.0.0.1:9/", "proxy": f"http://127.0.0.1:{proxy.port}", "connect_timeout": CONNECT_TIMEOUT,
        "tunnels": [{"name": "t", "listen": f"127.0.0.1:{listen}"}]})
    with started(frontend(config)) as daemon:
        with socket.create_connection(("127.0.0.1", listen), timeout=CONNECT_TIMEOUT + 5) as client, \
                contextlib.suppress(ConnectionResetError):
            assert client.recv(1) == b""  # reset (or closed) once the dial has failed
        expected = timed_out(f"waiting for proxy http://127.0.0.1:{proxy.port} (from proxy setting) to answer CONNECT")
        assert daemon.wait_for_log(expected, 10), daemon.log
