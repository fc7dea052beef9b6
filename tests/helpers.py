"""Real processes, real sockets on loopback: the pieces every test builds on.

Every wait here is bounded in time; nothing targets anything but 127.0.0.1 or ::1.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

BIN = Path(sys.executable).parent
READY_TIMEOUT = 10.0


#: Every port :func:`free_port` handed out in this process.
_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to now, and never one handed out before in this process: the kernel may
    offer a port again as soon as it is closed, so a test asking for two could get the same one twice."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no port that was not handed out before, in 100 tries")


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def pattern(n: int) -> bytes:
    """Every byte value, repeating: ``bytes(i % 256 for i in range(n))``, built fast."""
    block = bytes(range(256))
    return (block * (n // 256 + 1))[:n]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def recv_all(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """Read until EOF; raise on timeout or reset."""
    sock.settimeout(timeout)
    chunks: list[bytes] = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def recv_exactly(sock: socket.socket, n: int, timeout: float = 30.0) -> bytes:
    sock.settimeout(timeout)
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def send_then_shutdown(sock: socket.socket, data: bytes) -> threading.Thread:
    """Send ``data`` then FIN from a thread, so the caller can read the reply meanwhile."""
    def run() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class Daemon:
    """A tcpbridge daemon run as a real process; its stderr is collected as it goes."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})}, text=True,
        )
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self._lines.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        with self._lock:
            return "\n".join(self._lines)

    def wait_for_log(self, text: str, timeout: float = 10.0) -> bool:
        return wait_until(lambda: text in self.log, timeout)

    def wait_ready(self) -> Daemon:
        if not wait_until(lambda: " ready: " in self.log or self.proc.poll() is not None, READY_TIMEOUT):
            raise AssertionError(f"daemon not ready in {READY_TIMEOUT} s:\n{self.log}")
        if self.proc.poll() is not None:
            self._reader.join(timeout=5)
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log}")
        return self

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def threads(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        raise AssertionError("no Threads line")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        self._reader.join(timeout=5)
        return code


def write_yaml(directory: Path, name: str, data: dict[str, Any]) -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def one_process(config: Path | None, args: tuple[str, ...]) -> list[str]:
    """``--workers 1`` unless the test asks for workers itself (``workers`` in its YAML, or ``--workers``).

    A daemon's default is a worker per CPU; most tests look inside one daemon process (its fds,
    threads, log), and what a worker does is what one process does. tests/test_arbiter.py and
    tests/test_systemd.py run the processes of the default.
    """
    if "--workers" in args:
        return []
    if config is not None:
        try:
            data = yaml.safe_load(config.read_text())
        except (OSError, yaml.YAMLError):
            data = None
        if isinstance(data, dict) and "workers" in data:
            return []
    return ["--workers", "1"]


def frontend(config: Path | None = None, *args: str, env: dict[str, str] | None = None) -> Daemon:
    argv = [str(BIN / "tcpbridge-frontend"), *(["--config", str(config)] if config else []),
            *one_process(config, args), *args]
    return Daemon(argv, env)


def backend(config: Path | None = None, *args: str, env: dict[str, str] | None = None) -> Daemon:
    argv = [str(BIN / "tcpbridge-backend"), *(["--config", str(config)] if config else []),
            *one_process(config, args), *args]
    return Daemon(argv, env)


class TcpServer:
    """A threaded TCP server on loopback running ``handler(conn)`` per connection."""

    def __init__(self, handler: Callable[[socket.socket], None], host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, 0), family=family, backlog=1024)
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        self.handler = handler
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handler(conn)
        with contextlib.suppress(OSError):
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def echo_handler(conn: socket.socket) -> None:
    """Echo until EOF, then half-close: an echo service that honours half-close."""
    while True:
        data = conn.recv(1 << 18)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def running(*daemons: Daemon) -> Iterator[None]:
    try:
        yield
    finally:
        for daemon in daemons:
            daemon.stop()


@contextlib.contextmanager
def started(daemon: Daemon) -> Iterator[Daemon]:
    """Wait until ``daemon`` is ready, yield it, and stop it on the way out."""
    try:
        yield daemon.wait_ready()
    finally:
        daemon.stop()
