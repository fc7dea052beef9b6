"""A tunnel wedged both ways at once: the client and the target both write and neither reads.

Then every writer is stuck in ``sendall``. A daemon's reading thread that had to
write a pong (or the backend's switch marker) used to wait for the send lock,
held by its writer, and so stopped reading: the other daemon's writer then
stayed stuck too, and the tunnel deadlocked across the two daemons even after
one end started reading again. Here: the two daemons run as real processes on
127.0.0.1 with keepalive pings every 0.3 s; the client and the target are
threads of this test. Every wait is bounded; every socket is closed and every
thread joined.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.tunnel import reset_now
from tests.conftest import Pair, start_pair
from tests.helpers import wait_until

MIB = 1024 * 1024
#: Bytes each end writes: several times what the sockets along the path can hold, so the tunnel wedges.
SIZE = 64 * MIB
#: Socket buffers of the client and the target (the daemons' own sockets are left to the kernel).
END_BUFFER = 128 * 1024
#: Pings every 0.3 s while wedged; a ping timeout far shorter than the wedge.
KEEPALIVE = {"ping_interval": 0.3, "ping_timeout": 1}
#: How long nothing may move before a direction counts as stalled.
QUIET = 1.5
#: Bound on any single wait here.
BOUND = 60.0


def payload(seed: int) -> bytes:
    """SIZE bytes that are not periodic in any power of two (a lost or repeated chunk changes the hash)."""
    block = hashlib.sha256(str(seed).encode()).digest() * 31_251  # 1,000,032 bytes
    return (block * (SIZE // len(block) + 1))[:SIZE]


def small_buffers(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, END_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, END_BUFFER)


class Flood(threading.Thread):
    """Writes ``data`` to ``sock`` and then half-closes, counting what the kernel took (:attr:`sent`).

    ``pace``: seconds to sleep after each 1 MiB (a target that produces its bytes over time).
    Ends when everything is written or the connection fails (:attr:`error`).
    """

    def __init__(self, sock: socket.socket, data: bytes, *, pace: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.sock, self.data, self.pace = sock, data, pace
        self.sent = 0
        self.error: OSError | None = None
        self.ended_at: float | None = None
        self.start()

    def run(self) -> None:
        view = memoryview(self.data)
        paced_at = MIB
        try:
            while self.sent < len(view):
                self.sent += self.sock.send(view[self.sent:self.sent + 256 * 1024])
                if self.pace and self.sent >= paced_at:
                    paced_at += MIB
                    time.sleep(self.pace)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    @property
    def finished(self) -> bool:
        return self.ended_at is not None and self.error is None


class Drain(threading.Thread):
    """Reads nothing until :attr:`go` is set, then reads to EOF, hashing what arrives."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.go = threading.Event()
        self.cancelled = False
        self.digest = hashlib.sha256()
        self.received = 0
        self.eof = False
        self.error: OSError | None = None
        self.start()

    def run(self) -> None:
        if not self.go.wait(BOUND) or self.cancelled:
            return
        try:
            while data := self.sock.recv(MIB):
                self.digest.update(data)
                self.received += len(data)
            self.eof = True
        except OSError as exc:
            self.error = exc

    def stop(self) -> None:
        self.cancelled = True
        self.go.set()


class Target:
    """A target that floods the client with ``data`` and reads only once :attr:`drain` is told to."""

    def __init__(self, data: bytes, *, pace: float) -> None:
        self.data, self.pace = data, pace
        self.listener = socket.socket()
        small_buffers(self.listener)  # inherited by the accepted socket, before the window is set
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.listener.settimeout(BOUND)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.conn: socket.socket | None = None
        self.flood: Flood | None = None
        self.drain: Drain | None = None
        self.accepted = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            self.conn, _ = self.listener.accept()
            self.conn.settimeout(BOUND)
            self.drain = Drain(self.conn)
            self.flood = Flood(self.conn, self.data, pace=self.pace)
            self.accepted.set()

    def close(self) -> None:
        self.listener.close()
        self._acceptor.join(BOUND)
        if self.drain:
            self.drain.stop()
        if self.conn:
            reset_now(self.conn)
        for thread in (self.flood, self.drain):
            if thread:
                thread.join(BOUND)
        if self.conn:
            self.conn.close()


class Wedge:
    """A client and a target, each writing :data:`SIZE` bytes through ``pair`` and reading nothing yet."""

    def __init__(self, pair: Pair, target: Target, up: bytes) -> None:
        self.pair, self.target, self.up = pair, target, up
        self.client = socket.socket()
        small_buffers(self.client)
        self.client.settimeout(BOUND)
        self.client.connect(pair.address())
        self.drain = Drain(self.client)
        self.flood = Flood(self.client, up)
        assert target.accepted.wait(10), "the target was never connected"
        assert target.flood is not None and target.drain is not None
        self.target_flood, self.target_drain = target.flood, target.drain

    def wait_stalled(self) -> None:
        """Wait until neither end's writes moved for QUIET seconds; both must be stuck short of the end."""
        floods = (self.flood, self.target_flood)
        last = [-1, -1]
        still_since = time.monotonic()
        deadline = still_since + BOUND
        while time.monotonic() < deadline:
            now = [flood.sent for flood in floods]
            if now != last:
                last, still_since = now, time.monotonic()
            elif time.monotonic() - still_since >= QUIET:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the tunnel never stalled: {last}")
        assert not any(flood.ended_at for flood in floods), [(f.sent, f.error) for f in floods]
        assert all(0 < flood.sent < SIZE for flood in floods), last

    def close(self) -> None:
        self.drain.stop()
        reset_now(self.client)
        for thread in (self.flood, self.drain):
            thread.join(BOUND)
        self.client.close()
        assert not self.flood.is_alive() and not self.drain.is_alive()


@contextlib.contextmanager
def wedged(tmp_path: Path, *, options: dict[str, float], target_pace: float = 0.0) -> Iterator[Wedge]:
    """A frontend+backend pair with ``options`` on both daemons, and a tunnel through it wedged both ways."""
    target = Target(payload(2), pace=target_pace)
    try:
        pair = start_pair(tmp_path, target.address, frontend_extra=options, backend_extra=options)
        try:
            wedge = Wedge(pair, target, payload(1))
            try:
                wedge.wait_stalled()
                yield wedge
            finally:
                wedge.close()
        finally:
            pair.frontend.stop(), pair.backend.stop()
    finally:
        target.close()


def logs(pair: Pair) -> str:
    return pair.frontend.log + "\n" + pair.backend.log


def rss(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


# ---------------------------------------------------------------------------


def test_a_wedged_tunnel_unwedges_one_direction_at_a_time(tmp_path: Path) -> None:
    """Wedged both ways while pings fly; then the client alone reads: it must get every byte the target
    sent although the target still reads nothing (before the fix, the frontend's reader sat on a pong
    behind its stuck writer). Then the target reads: everything arrives, and the tunnel ends clean."""
    # The target produces its bytes over time, so the backend pings while the frontend still reads.
    with wedged(tmp_path, options=KEEPALIVE, target_pace=0.02) as wedge:
        pair = wedge.pair
        time.sleep(2)  # several ping intervals and ping timeouts, wedged
        assert " closed (" not in logs(pair)

        wedge.drain.go.set()
        assert wait_until(lambda: wedge.drain.eof or wedge.drain.error is not None, timeout=BOUND, interval=0.1), \
            f"the client got {wedge.drain.received} of {SIZE} B while the target was not reading"
        assert wedge.drain.error is None
        assert wedge.drain.received == SIZE
        assert wedge.drain.digest.hexdigest() == hashlib.sha256(wedge.target.data).hexdigest()
        assert not wedge.target_drain.go.is_set()  # all of it while the target still read nothing
        assert wedge.target_flood.finished
        assert not wedge.flood.ended_at  # and the upload is still stuck on the target

        wedge.target_drain.go.set()
        wedge.flood.join(BOUND)
        wedge.target_drain.join(BOUND)
        assert wedge.flood.finished
        assert wedge.target_drain.error is None and wedge.target_drain.eof
        assert wedge.target_drain.received == SIZE
        assert wedge.target_drain.digest.hexdigest() == hashlib.sha256(wedge.up).hexdigest()

        assert pair.frontend.wait_for_log(f"closed (clean): client sent {SIZE} B, received {SIZE} B")
        assert pair.backend.wait_for_log(f"closed (clean): target sent {SIZE} B, received {SIZE} B")
        assert "unresponsive" not in logs(pair)
        assert "abort" not in logs(pair)


def test_memory_stays_bounded_while_wedged(tmp_path: Path) -> None:
    """64 MiB stuck each way: the daemons hold at most a frame or two of it, never the stream."""
    target = Target(payload(2), pace=0.0)
    pair = start_pair(tmp_path, target.address, frontend_extra=KEEPALIVE, backend_extra=KEEPALIVE)
    try:
        before = {daemon.pid: rss(daemon.pid) for daemon in (pair.frontend, pair.backend)}
        wedge = Wedge(pair, target, payload(1))
        try:
            wedge.wait_stalled()
            time.sleep(1)  # pings keep going while wedged
            grown = {pid: rss(pid) - start for pid, start in before.items()}
            assert all(growth < 64 * MIB for growth in grown.values()), grown
            assert " closed (" not in logs(pair)
        finally:
            wedge.close()
    finally:
        pair.frontend.stop(), pair.backend.stop()
        target.close()


@pytest.mark.parametrize("where", ["frontend", "backend"])
def test_idle_timeout_reclaims_a_wedged_tunnel(tmp_path: Path, where: str) -> None:
    """Nobody ever reads: no byte moves, so the tunnel is idle although both its writers are blocked.

    The idle clock of one daemon can start while bytes still move at the far end: a resumable tunnel's
    sender waits for the peer's acknowledgements until its own reader has been stuck for
    TCP_WRITE_STALL (1 s), then goes on and moves more. So ``idle`` leaves room for that pause on
    top of QUIET, or the timeout could fire before the test saw the tunnel stall."""
    idle = 4.0
    options = {**KEEPALIVE, **({"idle_timeout": idle} if where == "frontend" else {})}
    backend_options = {**KEEPALIVE, **({"idle_timeout": idle} if where == "backend" else {})}
    target = Target(payload(2), pace=0.0)
    pair = start_pair(tmp_path, target.address, frontend_extra=options, backend_extra=backend_options)
    try:
        wedge = Wedge(pair, target, payload(1))
        try:
            wedge.wait_stalled()
            stalled_at = time.monotonic()
            # Both ends' writes fail: the tunnel was reset on both sides.
            wedge.flood.join(idle + 8)
            wedge.target_flood.join(idle + 8)
            assert wedge.flood.error is not None and wedge.target_flood.error is not None
            ended = max(wedge.flood.ended_at or 0, wedge.target_flood.ended_at or 0)
            assert ended - stalled_at < idle + 5
            daemon = pair.frontend if where == "frontend" else pair.backend
            assert daemon.wait_for_log("closed (idle timeout (4 s without data))")
            assert "unresponsive" not in logs(pair)
        finally:
            wedge.close()
    finally:
        pair.frontend.stop(), pair.backend.stop()
        target.close()


def test_resetting_the_client_ends_a_wedged_tunnel_on_both_daemons(tmp_path: Path) -> None:
    with wedged(tmp_path, options=KEEPALIVE) as wedge:
        reset_at = time.monotonic()
        reset_now(wedge.client)
        wedge.target_flood.join(10)
        assert wedge.target_flood.error is not None, "the target never saw the reset"
        assert (wedge.target_flood.ended_at or 0) - reset_at < 10
        assert wedge.pair.frontend.wait_for_log(" closed (abort")
        assert wedge.pair.backend.wait_for_log(" closed (abort")
        assert "unresponsive" not in logs(wedge.pair)
