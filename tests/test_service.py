"""The daemons as services: sd_notify messages, SIGHUP reload, journald-style logging."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import (
    BIN,
    Daemon,
    TcpServer,
    backend,
    free_port,
    frontend,
    recv_all,
    recv_exactly,
    send_then_shutdown,
    wait_until,
    write_yaml,
)


class Notifications:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.received: list[tuple[float, list[str]]] = []

    def next(self, timeout: float = 10.0) -> list[str]:
        self.sock.settimeout(timeout)
        message = self.sock.recv(4096).decode().split("\n")
        self.received.append((time.monotonic(), message))
        return message

    def wait_for(self, field: str, timeout: float = 10.0) -> list[str]:
        """Read messages until one holds ``field`` (e.g. ``READY=1``); return that message."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.01, deadline - time.monotonic()))
            if field in message:
                return message


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[Notifications]:
    notifications = Notifications(tmp_path)
    yield notifications
    notifications.sock.close()


def round_trip(port: int, payload: bytes = b"ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        send_then_shutdown(client, payload)
        return recv_all(client)


def backend_config(tmp_path: Path, port: int, routes: dict[str, str], name: str = "backend.yaml") -> Path:
    return write_yaml(tmp_path, name, {"listeners": [{"name": "main", "listen": f"127.0.0.1:{port}",
                                                      "routes": routes}]})


def test_notify_ready_after_bind_status_watchdog_reload_stopping(tmp_path: Path, notify: Notifications,
                                                                  echo: TcpServer) -> None:
    port = free_port()
    config = backend_config(tmp_path, port, {"default": echo.address})
    daemon = backend(config, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
    try:
        ready = notify.wait_for("READY=1")
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # READY=1 came only once the listener was bound
        assert any(field.startswith("STATUS=1 listeners, 0 active tunnels") for field in ready), ready

        # watchdog pings at half the requested interval, from a daemon that is making progress
        started = time.monotonic()
        pings = 0
        while time.monotonic() - started < 2.0:
            if "WATCHDOG=1" in notify.next(timeout=2):
                pings += 1
        assert 3 <= pings <= 6, f"{pings} pings in 2 s with WATCHDOG_USEC=1 s"

        daemon.proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING=1")
        usec = next(int(f.split("=", 1)[1]) for f in reloading if f.startswith("MONOTONIC_USEC="))
        assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 10
        notify.wait_for("READY=1")

        daemon.proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert daemon.stop() == 0
    finally:
        daemon.stop()


def test_status_counts_active_tunnels(tmp_path: Path, notify: Notifications, echo: TcpServer) -> None:
    backend_port, frontend_port = free_port(), free_port()
    back = backend(backend_config(tmp_path, backend_port, {"default": echo.address})).wait_ready()
    front = frontend(write_yaml(tmp_path, "f.yaml", {"backend": f"ws://127.0.0.1:{backend_port}", "tunnels": [
        {"name": "t", "listen": frontend_port}]}), env={"NOTIFY_SOCKET": notify.path})
    try:
        notify.wait_for("READY=1")
        with socket.create_connection(("127.0.0.1", frontend_port), timeout=10) as client:
            client.sendall(b"x")
            assert recv_exactly(client, 1) == b"x"
            message = notify.wait_for("STATUS=1 listeners, 1 active tunnels, 1 served, 2 B moved", timeout=5)
            assert message
    finally:
        front.stop(), back.stop()


def test_frontend_reload_adds_removes_moves_and_updates_tunnels(tmp_path: Path, echo: TcpServer) -> None:
    backend_port = free_port()
    back = backend(backend_config(tmp_path, backend_port, {"default": echo.address, "other": echo.address}))
    back.wait_ready()
    keep, drop, move_from, move_to, add = (free_port() for _ in range(5))

    def config(tunnels: list[dict[str, object]]) -> Path:
        return write_yaml(tmp_path, "frontend.yaml", {"backend": f"ws://127.0.0.1:{backend_port}",
                                                      "tunnels": tunnels})

    path = config([{"name": "keep", "listen": keep}, {"name": "drop", "listen": drop},
                   {"name": "move", "listen": move_from}])
    front = frontend(path).wait_ready()
    try:
        live = socket.create_connection(("127.0.0.1", drop), timeout=10)
        live.sendall(b"before")
        assert recv_exactly(live, 6) == b"before"

        config([{"name": "keep", "listen": keep, "route": "other", "headers": {"X-Secret": "hunter2"}},
                {"name": "move", "listen": move_to}, {"name": "add", "listen": add}])
        front.proc.send_signal(signal.SIGHUP)
        assert front.wait_for_log("reload of")
        log = front.log
        assert "tunnel drop: removed" in log
        assert f"tunnel move: moved from 127.0.0.1:{move_from} to 127.0.0.1:{move_to}" in log
        assert "tunnel add: added" in log
        assert "tunnel keep: route, headers changed for new connections" in log
        assert "hunter2" not in log

        live.sendall(b"after")  # a live tunnel of a removed listener finishes normally
        assert recv_exactly(live, 5) == b"after"
        live.close()
        for port in (keep, move_to, add):
            assert round_trip(port) == b"ping"
        for port in (drop, move_from):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=2)
        assert back.wait_for_log("[main/other] open")
    finally:
        front.stop(), back.stop()


def test_a_bad_reload_keeps_the_running_configuration(tmp_path: Path, echo: TcpServer) -> None:
    backend_port, port = free_port(), free_port()
    back = backend(backend_config(tmp_path, backend_port, {"default": echo.address})).wait_ready()
    path = write_yaml(tmp_path, "frontend.yaml", {"backend": f"ws://127.0.0.1:{backend_port}",
                                                  "tunnels": [{"name": "t", "listen": port}]})
    front = frontend(path).wait_ready()
    blocker = socket.create_server(("127.0.0.1", 0))
    try:
        path.write_text("tunnels: [ {name: t, listen: 70000} ]\n")
        front.proc.send_signal(signal.SIGHUP)
        assert front.wait_for_log("reload rejected")
        assert "port 70000 is out of range" in front.log

        taken = blocker.getsockname()[1]
        write_yaml(tmp_path, "frontend.yaml", {"backend": f"ws://127.0.0.1:{backend_port}", "tunnels": [
            {"name": "t", "listen": port}, {"name": "u", "listen": taken}]})
        front.proc.send_signal(signal.SIGHUP)
        assert front.wait_for_log("address already in use")
        assert "tunnel u: added" not in front.log
        assert round_trip(port) == b"ping"
        assert front.proc.poll() is None
    finally:
        blocker.close()
        front.stop(), back.stop()


def test_backend_reload_changes_targets_for_new_tunnels_only(tmp_path: Path) -> None:
    first = TcpServer(lambda conn: (conn.sendall(b"first"), conn.recv(1)))
    second = TcpServer(lambda conn: (conn.sendall(b"second"), conn.recv(1)))
    backend_port, port = free_port(), free_port()
    path = backend_config(tmp_path, backend_port, {"default": first.address})
    back = backend(path).wait_ready()
    front = frontend(write_yaml(tmp_path, "f.yaml", {"backend": f"ws://127.0.0.1:{backend_port}",
                                                     "tunnels": [{"name": "t", "listen": port}]})).wait_ready()
    try:
        live = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert recv_exactly(live, 5) == b"first"
        backend_config(tmp_path, backend_port, {"default": second.address})
        back.proc.send_signal(signal.SIGHUP)
        assert back.wait_for_log("listener main: routes changed for new connections")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert recv_exactly(client, 6) == b"second"
        live.sendall(b"!")  # the live tunnel still reaches the first target
        live.shutdown(socket.SHUT_WR)
        assert recv_all(live) == b""
        assert back.wait_for_log("target sent 5 B, received 1 B")
    finally:
        front.stop(), back.stop(), first.close(), second.close()


def test_logs_carry_syslog_priorities_when_stderr_is_the_journal(tmp_path: Path) -> None:
    """log_target: stderr under journald: ``<N>`` prefixes (auto would use the native protocol, whose
    fields tests/test_systemd.py checks in a real journal)."""
    read_end, write_end = os.pipe()
    stat = os.fstat(write_end)
    port = free_port()
    config = write_yaml(tmp_path, "b.yaml", {"log_target": "stderr", "listeners": [
        {"name": "main", "listen": port, "routes": {"default": f"127.0.0.1:{free_port()}"}}]})
    process = subprocess.Popen([str(BIN / "tcpbridge-backend"), "--config", str(config)], stderr=write_end,
                               env={**os.environ, "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"})
    os.close(write_end)
    try:
        reader = os.fdopen(read_end)
        lines = []
        while not any(" ready: " in line for line in lines):
            lines.append(reader.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # refused upgrade: a warning
            sock.sendall(b"GET /tcp-over-websocket-bridge/35218cb7-1201-4940-89e8-48d8f03fed96 HTTP/1.1\r\n"
                         b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            assert recv_exactly(sock, 12) == b"HTTP/1.1 502"
        lines.append(reader.readline())
        assert all(line.startswith("<6>") for line in lines[:-1]), lines
        assert re.match(r"<4>(w\d+ )?tunnel ", lines[-1]), lines[-1]  # a worker's tag follows the priority
        assert not any(line[3:7].isdigit() for line in lines), "no timestamps: journald adds its own"
    finally:
        process.terminate()
        process.wait(10)


def test_plain_logs_are_timestamped(tmp_path: Path, echo: TcpServer) -> None:
    daemon = backend(backend_config(tmp_path, free_port(), {"default": echo.address})).wait_ready()
    try:
        first = daemon.log.splitlines()[0]
        assert first[:4].isdigit() and " INFO " in first, first
    finally:
        daemon.stop()


def test_log_level_flag_overrides_yaml_and_survives_reload(tmp_path: Path, echo: TcpServer) -> None:
    port = free_port()
    path = write_yaml(tmp_path, "b.yaml", {"log_level": "error", "listeners": [
        {"name": "main", "listen": port, "routes": {"default": echo.address}}]})
    daemon: Daemon = backend(path, "--log-level", "debug")
    try:
        assert daemon.wait_for_log("ready:")
        daemon.proc.send_signal(signal.SIGHUP)
        assert daemon.wait_for_log("reload of")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            recv_all(sock)
        assert wait_until(lambda: "not a tcpbridge upgrade" in daemon.log)  # a DEBUG line
    finally:
        daemon.stop()


def test_config_keys_documented_in_conf_examples() -> None:
    """Every key the loader accepts appears in the shipped, commented examples."""
    from bridge import config as cfg

    root = Path(__file__).resolve().parent.parent
    for name, keys in (("frontend.yaml", cfg._FRONTEND_KEYS + cfg._TUNNEL_KEYS),
                       ("backend.yaml", cfg._BACKEND_KEYS + cfg._LISTENER_KEYS)):
        text = (root / "conf" / name).read_text()
        yaml.safe_load(text)
        missing = [key for key in keys if f"{key}:" not in text]
        assert not missing, f"conf/{name} does not mention {missing}"
