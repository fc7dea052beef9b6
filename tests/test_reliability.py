"""Resume through real daemons: a frontend and a backend process joined through a relay that cuts the
websocket's connection (tests/cutter.py), on loopback.

What a user of a resumable tunnel relies on: a cut costs a pause, never a byte (none lost, none
repeated, sha256-checked); the end keeps its meaning; a tunnel that cannot be resumed (the backend
forgot it, or the time ran out) ends as the abort it is, with the client reset; and a re-attaching
request gets no more than any other: it needs the listener's token, and a session it names that is
not live gets the same refusal whatever the reason (in band, so that it crosses the inverting proxy's
shim, which turns any other answer into a 500).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge import control, resume
from bridge.protocol import CloseCode
from bridge.tunnel import reset_now
from tests.cutter import CuttingRelay
from tests.gopeer import go_frontend_request, read_http_head
from tests.helpers import (
    BIN,
    Daemon,
    TcpServer,
    backend,
    echo_handler,
    free_port,
    frontend,
    recv_all,
    recv_exactly,
    wait_until,
    write_yaml,
)
from tests.pki import NginxSite, Pki, nginx, require_tools, stopping
from tests.shim import ShimAgent, ShimProxy
from tests.test_frames import close_code, dial_backend, next_data_frame

TOKEN = "resume-test-token"


@dataclass
class Pair:
    """A resumable frontend+backend pair whose websockets pass through ``relay``; ``port`` is the
    frontend tunnel's local port, the target an echo server."""

    frontend: Daemon
    backend: Daemon
    backend_port: int
    relay: CuttingRelay
    port: int


@contextlib.contextmanager
def resumable_pair(tmp_path: Path, *, resume_timeout: float = 30.0, control: bool = False,
                   **backend_settings: object) -> Iterator[Pair]:
    echo = TcpServer(echo_handler)
    backend_port, port = free_port(), free_port()
    options = {"resume": True, "resume_timeout": resume_timeout}
    sockets = {name: {"control_socket": str(tmp_path / f"{name}.sock")} if control else {}
               for name in ("frontend", "backend")}
    back = backend(write_yaml(tmp_path, "backend.yaml", {"drain_timeout": 1, **backend_settings, **sockets["backend"],
                                                          "listeners": [
        {"name": "main", "listen": f"127.0.0.1:{backend_port}", "routes": {"default": echo.address},
         "token": TOKEN, **options}]}))
    relay = CuttingRelay(backend_port)
    front = frontend(write_yaml(tmp_path, "frontend.yaml", {"drain_timeout": 1, **sockets["frontend"], "tunnels": [
        {"name": "t", "listen": f"127.0.0.1:{port}", "backend": relay.url,
         "headers": {"X-Tcpbridge-Token": TOKEN}, **options}]}))
    try:
        back.wait_ready(), front.wait_ready()
        yield Pair(front, back, backend_port, relay, port)
    finally:
        front.stop(), back.stop()
        relay.close(), echo.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


@contextlib.contextmanager
def restarted_after_sigkill(daemon: Daemon) -> Iterator[Daemon]:
    """SIGKILL ``daemon`` (a backend: its sessions are lost) and start it again from its config; the new
    one is stopped on leaving."""
    daemon.stop(signal.SIGKILL)
    restarted = backend(Path(daemon.args[daemon.args.index("--config") + 1]))
    try:
        restarted.wait_ready()
        yield restarted
    finally:
        restarted.stop()


def assert_reset_soon(client: socket.socket) -> None:
    """The client is reset within 15 s: the tunnel ended as an abort, not after resume_timeout (60 s)."""
    started = time.monotonic()
    with pytest.raises(ConnectionResetError):
        recv_all(client, timeout=30)
    assert time.monotonic() - started < 15


def consented(pair: Pair, count: int = 1) -> bool:
    """Whether ``count`` websockets are up through the relay and their consent had time to arrive."""
    return wait_until(lambda: pair.relay.live() == count, timeout=10)


def test_64_mib_each_way_arrive_whole_through_five_cuts(tmp_path: Path) -> None:
    with resumable_pair(tmp_path) as pair, connect(pair.port) as client:
        total, block = 64 << 20, os.urandom(1 << 20)
        sent, got = hashlib.sha256(), hashlib.sha256()
        received = [0]

        def read() -> None:
            client.settimeout(60)
            while data := client.recv(1 << 20):
                got.update(data)
                received[0] += len(data)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert consented(pair)
        cuts = 0
        for index in range(total // len(block)):
            client.sendall(block)
            sent.update(block)
            if index and index % 10 == 0 and cuts < 5:
                assert pair.relay.cut("reset" if cuts % 2 else "close") == 1
                cuts += 1
                assert wait_until(lambda n=cuts: pair.backend.log.count("resumed after") == n,  # type: ignore[misc]
                                  timeout=30), "the tunnel did not resume"
        client.shutdown(socket.SHUT_WR)
        reader.join(90)
        assert received[0] == total and got.hexdigest() == sent.hexdigest()
        assert pair.frontend.wait_for_log("closed (clean)") and pair.backend.wait_for_log("closed (clean)")
    assert cuts == 5
    assert pair.frontend.log.count("websocket dropped, resuming") >= 5
    assert pair.backend.log.count("resumed after") == 5


def test_with_workers_a_re_attach_reaches_the_worker_that_holds_its_session(tmp_path: Path) -> None:
    """Two backend workers: a redial lands on either (the kernel picks), so about half the re-attaches
    of 4 tunnels cut 5 times are handed to the other worker; all of them resume, every byte arrives."""
    with resumable_pair(tmp_path, workers=2, log_level="debug") as pair:
        clients = [connect(pair.port) for _ in range(4)]
        try:
            assert wait_until(lambda: pair.relay.live() == 4, timeout=10)
            for cut in range(5):
                for number, client in enumerate(clients):
                    line = f"client {number} before cut {cut}\n".encode()
                    client.sendall(line)
                    assert recv_exactly(client, len(line), timeout=20) == line
                pair.relay.cut("reset" if cut % 2 else "close")
                assert wait_until(lambda: pair.relay.live() == 4, timeout=20), "not every tunnel dialled again"
            for client in clients:
                client.sendall(b"the end")
                client.shutdown(socket.SHUT_WR)
                assert recv_all(client) == b"the end"
        finally:
            for client in clients:
                client.close()
        assert pair.backend.wait_for_log("handed over")
        assert wait_until(lambda: pair.backend.log.count("resumed after") == 20, timeout=10)
    assert "refused" not in pair.backend.log and "refused" not in pair.frontend.log


def test_behind_nginx_a_re_attach_reaches_the_backend_that_holds_its_session(tmp_path: Path) -> None:
    """Two backends behind nginx, which hashes on X-Tcpbridge-Affinity (docs/configuration.md, *Several backends*):
    16 tunnels spread over both, the path to nginx cut 3 times, every re-attach lands where its
    session lives."""
    require_tools("openssl", "nginx")
    ca = Pki(tmp_path / "ca")
    cert = ca.issue("server", dns=["localhost"])
    echo = TcpServer(echo_handler)
    backends, ports = [], [free_port(), free_port()]
    for index, backend_port in enumerate(ports):
        backends.append(backend(write_yaml(tmp_path, f"backend{index}.yaml", {"drain_timeout": 1, "listeners": [
            {"name": "main", "listen": f"127.0.0.1:{backend_port}", "routes": {"default": echo.address},
             "resume": True}]})))
    nginx_port, port = free_port(), free_port()
    relay: CuttingRelay | None = None
    front: Daemon | None = None
    clients: list[socket.socket] = []
    try:
        for daemon in backends:
            daemon.wait_ready()
        with stopping(nginx(tmp_path / "nginx", ports, cert, [NginxSite(nginx_port)],
                            hash_key="$http_x_tcpbridge_affinity")):
            relay = CuttingRelay(nginx_port)
            front = frontend(write_yaml(tmp_path, "frontend.yaml", {"drain_timeout": 1, "tunnels": [
                {"name": "t", "listen": f"127.0.0.1:{port}", "backend": f"wss://localhost:{relay.port}/",
                 "tls": {"ca_file": str(ca.ca_cert)}, "resume": True}]})).wait_ready()
            clients = [connect(port) for _ in range(16)]
            for cut in range(4):
                assert wait_until(lambda: relay is not None and relay.live() == 16, timeout=20)
                for number, client in enumerate(clients):
                    line = f"client {number} before cut {cut}\n".encode()
                    client.sendall(line)
                    assert recv_exactly(client, len(line), timeout=20) == line
                if cut < 3:
                    relay.cut("reset" if cut % 2 else "close")
            for client in clients:
                client.shutdown(socket.SHUT_WR)
                assert recv_all(client) == b""
            resumed = [daemon.log.count("resumed after") for daemon in backends]
            assert sum(resumed) == 48, resumed
            assert all(" open: " in daemon.log for daemon in backends)  # both took tunnels (P(not) = 2**-15)
            assert not any("refused" in daemon.log for daemon in [*backends, front])
    finally:
        for client in clients:
            client.close()
        for daemon in [*backends, *([front] if front else [])]:
            daemon.stop()
        if relay is not None:
            relay.close()
        echo.close()


@dataclass
class ShimPath:
    """frontend -> relay -> ShimProxy --HTTP--> ShimAgent -> backend: the inverting proxy's shim (tests/shim.py)."""

    agent: ShimAgent
    relay: CuttingRelay
    frontend: Daemon
    backend: Daemon
    port: int

    def kill_backend_legs(self) -> int:
        """Reset the agent's websockets to the backend (an agent restart): the shim closes the frontend's
        websockets with a bare 1000 in turn."""
        sessions = list(self.agent._sessions.values())
        for session in sessions:
            reset_now(session.ws.sock)
        return len(sessions)


@contextlib.contextmanager
def through_the_shim(tmp_path: Path) -> Iterator[ShimPath]:
    echo = TcpServer(echo_handler)
    backend_port, port = free_port(), free_port()
    back = backend(write_yaml(tmp_path, "backend.yaml", {"drain_timeout": 1, "resume": True, "listeners": [
        {"name": "main", "listen": f"127.0.0.1:{backend_port}", "routes": {"default": echo.address}}]}))
    agent = ShimAgent(f"127.0.0.1:{backend_port}", "websocket-shim", shim_timeout=2.0).start()
    proxy = ShimProxy.for_agent(agent).start()
    relay = CuttingRelay(proxy.port)
    front = frontend(write_yaml(tmp_path, "frontend.yaml", {"drain_timeout": 1, "resume": True, "tunnels": [
        {"name": "t", "listen": f"127.0.0.1:{port}", "backend": relay.url}]}))
    try:
        back.wait_ready(), front.wait_ready()
        yield ShimPath(agent, relay, front, back, port)
    finally:
        front.stop(), back.stop()
        relay.close(), proxy.close(), agent.close(), echo.close()


@pytest.mark.parametrize("leg", ["frontend to proxy", "agent to backend"])
def test_through_the_shim_a_dropped_leg_is_resumed_over_a_new_shim_session(tmp_path: Path, leg: str) -> None:
    """The shim turns a drop on either leg into a bare close 1000 on the other; the tunnel tells it from
    the peer's own close (announced in band) and resumes over a new shim session: text only, the
    session header passed by the agent, the backend's old websocket replaced or re-attached."""
    with through_the_shim(tmp_path) as path, connect(path.port) as client:
        assert wait_until(lambda: path.relay.live() == 1, timeout=10)
        data = os.urandom(256 * 1024)
        for cut in range(3):
            client.sendall(data)
            assert recv_exactly(client, len(data), timeout=30) == data
            if leg == "frontend to proxy":
                assert path.relay.cut("reset" if cut % 2 else "close") == 1
            else:
                assert path.kill_backend_legs() >= 1
            assert wait_until(lambda n=cut + 1: path.backend.log.count("resumed after") == n, timeout=30), \
                path.frontend.log
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == data
        assert path.frontend.wait_for_log("closed (clean)"), path.frontend.log
    assert "refused" not in path.backend.log


def test_through_the_shim_a_backend_that_restarted_refuses_and_the_client_is_reset_at_once(tmp_path: Path) -> None:
    """The agent answers a backend's 404 with a 500 that says nothing, which a frontend must retry: the
    backend refuses a re-attach in band instead (an announced close crosses the shim), so a backend
    killed and started again ends its old tunnels at once here too, not after resume_timeout (60 s)."""
    with through_the_shim(tmp_path) as path, connect(path.port) as client:
        assert wait_until(lambda: path.relay.live() == 1, timeout=10)
        client.sendall(b"hello")
        assert recv_exactly(client, 5) == b"hello"
        with restarted_after_sigkill(path.backend) as restarted:
            assert_reset_soon(client)
            assert path.frontend.wait_for_log("resuming was refused"), path.frontend.log
            assert restarted.wait_for_log("refused"), restarted.log


def test_an_interactive_session_cut_every_2_s_for_20_s_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """Like an ssh session: a line out, its echo back, ten times a second, while the path is cut
    every 2 s. Every answer is the line sent, in order."""
    with resumable_pair(tmp_path) as pair, connect(pair.port) as client:
        assert consented(pair)
        started, next_cut, number, cuts = time.monotonic(), time.monotonic() + 2, 0, 0
        while time.monotonic() - started < 20:
            line = f"line {number:06d}\n".encode()
            client.sendall(line)
            assert recv_exactly(client, len(line), timeout=20) == line
            number += 1
            if time.monotonic() >= next_cut:
                pair.relay.cut("reset" if cuts % 2 else "close")
                cuts, next_cut = cuts + 1, time.monotonic() + 2
            time.sleep(0.1)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
    assert cuts >= 9 and number >= 100
    assert pair.backend.log.count("resumed after") == cuts


def test_a_cut_after_the_client_half_closed_keeps_the_half_close(tmp_path: Path) -> None:
    with resumable_pair(tmp_path) as pair, connect(pair.port) as client:
        assert consented(pair)
        data = os.urandom(1 << 20)
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        assert recv_exactly(client, 1 << 19) == data[:1 << 19]
        pair.relay.cut("reset")
        assert recv_all(client) == data[1 << 19:]  # the rest, then the echo server's end
    assert pair.frontend.wait_for_log("closed (clean)")


def test_status_shows_resumable_and_detached_tunnels_and_counts_resumes_by_result(tmp_path: Path) -> None:
    with resumable_pair(tmp_path, resume_timeout=2, control=True) as pair, connect(pair.port) as client:
        assert consented(pair)
        for cut in range(2):
            pair.relay.cut("reset")
            # The next cut only after this re-attach is done: a cut during the exchange is retried, not counted.
            assert wait_until(lambda n=cut + 1: pair.frontend.log.count("resumed after") == n  # type: ignore[misc]
                              and pair.backend.log.count("resumed after") == n, timeout=20)
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        for name in ("frontend", "backend"):
            doc = control.query(str(tmp_path / f"{name}.sock"))
            assert [(t["resume"], t["resumes"]) for t in doc["tunnels"]] == [("resumable", 2)], doc
            assert "on, 2 resumes" in control.format_status(doc)
        pair.relay.refusing = True
        pair.relay.cut("close")
        assert wait_until(lambda: [t["resume"] for t in control.query(str(tmp_path / "backend.sock"))["tunnels"]]
                          == ["detached"], timeout=10)
        with pytest.raises(ConnectionResetError):
            recv_all(client, timeout=30)
        for name in ("frontend", "backend"):
            sock = str(tmp_path / f"{name}.sock")
            assert wait_until(lambda s=sock: control.query(s)["totals"]["resumes"]  # type: ignore[misc]
                              == {"resumed": 2, "refused": 0, "timeout": 1, "lost": 0}, timeout=10), name
            assert "resumes: resumed 2, timeout 1" in control.format_status(control.query(sock))


def read_output(proc: subprocess.Popen[bytes], count: int, timeout: float = 20.0) -> bytes:
    """``count`` bytes from ``proc``'s stdout, within ``timeout``."""
    assert proc.stdout is not None
    got, deadline = b"", time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            chunk = os.read(proc.stdout.fileno(), count - len(got))
            if not chunk:
                break
            got += chunk
    return got


def test_tcpbridge_connect_resumes_like_the_frontend(tmp_path: Path) -> None:
    with resumable_pair(tmp_path) as pair:
        config = write_yaml(tmp_path, "connect.yaml", {"tunnels": [
            {"name": "c", "listen": "127.0.0.1:1", "backend": pair.relay.url, "resume": True,
             "headers": {"X-Tcpbridge-Token": TOKEN}}]})
        proc = subprocess.Popen([str(BIN / "tcpbridge"), "connect", "--config", str(config), "c"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stderr is not None
        try:
            for cut in range(3):
                line = f"line {cut}\n".encode()
                proc.stdin.write(line)
                proc.stdin.flush()
                assert read_output(proc, len(line)) == line
                assert pair.relay.cut("reset" if cut % 2 else "close") == 1
                assert pair.backend.wait_for_log("resumed after", timeout=20)
                assert wait_until(lambda n=cut + 1: pair.backend.log.count("resumed after") == n, timeout=20)
            proc.stdin.write(b"the end")
            proc.stdin.close()
            assert read_output(proc, 7) == b"the end"
            assert proc.wait(20) == 0, proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def test_a_backend_that_restarted_refuses_and_the_client_is_reset_at_once(tmp_path: Path) -> None:
    """The backend was killed and started again, its sessions lost: its refusal of the redial is final,
    not retried until resume_timeout. (A backend that stops gracefully closes its tunnels with 1001: an
    end, not a drop.)"""
    with resumable_pair(tmp_path, resume_timeout=60) as pair, connect(pair.port) as client:
        assert consented(pair)
        client.sendall(b"hello")
        assert recv_exactly(client, 5) == b"hello"
        with restarted_after_sigkill(pair.backend):
            assert_reset_soon(client)
            assert pair.frontend.wait_for_log("resuming was refused")


def test_a_tunnel_not_resumed_within_resume_timeout_resets_the_client(tmp_path: Path) -> None:
    with resumable_pair(tmp_path, resume_timeout=2) as pair, connect(pair.port) as client:
        assert consented(pair)
        pair.relay.refusing = True  # the path stays down
        pair.relay.cut("reset")
        with pytest.raises(ConnectionResetError):
            recv_all(client, timeout=30)
        assert pair.frontend.wait_for_log("not resumed within 2 s")
        assert pair.backend.wait_for_log("not resumed within 2 s")


# ---------------------------------------------------------------------------
# Re-attaching requests as the backend sees them


def upgrade_status(port: int, *headers: str) -> int:
    """The status of a raw upgrade request with ``headers`` on our backend."""
    request = go_frontend_request(f"127.0.0.1:{port}", "dGhlIHNhbXBsZSBub25jZQ==")
    request = request[:-2] + "".join(f"{line}\r\n" for line in headers).encode() + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        head = read_http_head(sock, bytearray())
    return int(head.status)


def refused_in_band(port: int, *headers: str) -> bool:
    """Whether our backend upgrades a raw re-attaching request with ``headers`` only to refuse it: the
    announcement of a close NO_SUCH_SESSION, then that close."""
    ws = dial_backend(port, *headers)
    try:
        announced = resume.decode(next_data_frame(ws).payload.decode())
        code = close_code(next_data_frame(ws))
    finally:
        ws.drop()
    return announced == resume.Closing(CloseCode.NO_SUCH_SESSION) and code == CloseCode.NO_SUCH_SESSION


def raw_session(port: int) -> tuple[object, str]:
    """A raw resumable tunnel on our backend: its websocket and the session id of the consent."""
    ws = dial_backend(port, f"X-Tcpbridge-Token: {TOKEN}", f"{resume.RESUME_HEADER}: {64 * 1024}")
    consent = resume.decode(next_data_frame(ws).payload.decode())
    assert isinstance(consent, resume.Consent)
    return ws, consent.session


def test_resume_is_refused_for_an_unknown_id_a_wrong_token_and_after_resume_timeout(tmp_path: Path) -> None:
    with resumable_pair(tmp_path, resume_timeout=2) as pair:
        port = pair.backend_port
        ws, session = raw_session(port)
        with_token = f"X-Tcpbridge-Token: {TOKEN}"
        assert refused_in_band(port, with_token, f"{resume.SESSION_HEADER}: {resume.new_session_id()}")
        assert upgrade_status(port, with_token, f"{resume.SESSION_HEADER}: not-an-id") == 404  # no frontend's
        assert upgrade_status(port, f"{resume.SESSION_HEADER}: {session}") == 401  # the token comes first
        assert upgrade_status(port, "X-Tcpbridge-Token: wrong", f"{resume.SESSION_HEADER}: {session}") in (401, 403)
        ws.drop()
        assert pair.backend.wait_for_log("not resumed within 2 s", timeout=10)
        assert refused_in_band(port, with_token, f"{resume.SESSION_HEADER}: {session}")
    assert session not in pair.backend.log  # the id is never logged


def test_with_workers_either_worker_refuses_an_unknown_session_in_band(tmp_path: Path) -> None:
    """Ids that each of two workers would own, tried in turns: the kernel picks the worker that accepts,
    which refuses an id of its own itself and hands another's to its owner, which refuses it."""
    with resumable_pair(tmp_path, workers=2, log_level="debug") as pair:
        with_token = f"X-Tcpbridge-Token: {TOKEN}"
        for attempt in range(6):
            for owner in (0, 1) if attempt % 2 else (1, 0):
                assert refused_in_band(pair.backend_port, with_token, f"{resume.SESSION_HEADER}: {owner:032x}")
        assert pair.backend.wait_for_log("handed over")
        assert wait_until(lambda: pair.backend.log.count(": refused ") == 12, timeout=10), pair.backend.log


def test_a_raw_peer_re_attaches_and_is_told_what_the_backend_took(tmp_path: Path) -> None:
    with resumable_pair(tmp_path) as pair:
        port = pair.backend_port
        ws, session = raw_session(port)
        ws.write(b"echo me")  # hex: the raw client never switched to binary
        frame = next_data_frame(ws)
        assert bytes.fromhex(frame.payload.decode()) == b"echo me"
        ws.drop()
        again = dial_backend(port, f"X-Tcpbridge-Token: {TOKEN}", f"{resume.SESSION_HEADER}: {session}")
        again.send_frame(0x1, resume.encode(resume.Resumed(0)).encode())  # "I lost your echo"
        assert resume.decode(next_data_frame(again).payload.decode()) == resume.Resumed(7)
        assert bytes.fromhex(next_data_frame(again).payload.decode()) == b"echo me"  # replayed
        again.drop()
