"""``tcpbridge status`` and the daemons' control socket: real daemons, real Unix sockets."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.control import CLIENT_TIMEOUT, query, unit_socket_path
from tests.conftest import Pair
from tests.helpers import (
    BIN,
    TcpServer,
    backend,
    free_port,
    frontend,
    recv_exactly,
    wait_until,
    write_yaml,
)

ROOT = Path(__file__).resolve().parent.parent


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "tcpbridge"), "status", *args], capture_output=True, text=True, timeout=30,
                          check=False)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: pytest's tmp_path can exceed a Unix socket path's 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="tb-") as directory:
        yield Path(directory)


class Notifications:
    """A NOTIFY_SOCKET for one daemon: the last STATUS= it sent."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.last_status = ""

    def drain(self) -> str:
        while True:
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                return self.last_status
            for field in message.split("\n"):
                if field.startswith("STATUS="):
                    self.last_status = field.removeprefix("STATUS=")


def test_status_shows_a_live_tunnel_and_matches_sd_notify(short_dir: Path, echo: TcpServer) -> None:
    sockets = {"frontend": str(short_dir / "f.sock"), "backend": str(short_dir / "b.sock")}
    notify = Notifications(short_dir)
    backend_port, frontend_port = free_port(), free_port()
    back = backend(write_yaml(short_dir, "b.yaml", {"control_socket": sockets["backend"], "listeners": [
        {"name": "main", "listen": backend_port, "routes": {"default": echo.address}}]})).wait_ready()
    front = frontend(write_yaml(short_dir, "f.yaml", {
        "control_socket": sockets["frontend"], "backend": f"ws://127.0.0.1:{backend_port}/",
        "tunnels": [{"name": "t", "listen": frontend_port}]}), env={"NOTIFY_SOCKET": notify.path})
    pair = Pair(front, back, frontend_port, backend_port)
    try:
        pair.frontend.wait_ready()
        with socket.create_connection(pair.address(), timeout=10) as client:
            client.sendall(b"x" * 3000)
            assert recv_exactly(client, 3000) == b"x" * 3000
            assert wait_until(lambda: query(sockets["frontend"])["totals"]["bytes_to_tcp"] == 3000, 5)

            shown = status("--socket", sockets["frontend"])
            assert shown.returncode == 0, shown.stderr
            doc = query(sockets["frontend"])
            (tunnel,) = doc["tunnels"]
            assert (tunnel["label"], tunnel["bytes_to_websocket"], tunnel["bytes_to_tcp"]) == ("t", 3000, 3000)
            assert tunnel["peer"] == f"127.0.0.1:{client.getsockname()[1]}"
            assert tunnel["age_seconds"] >= 0
            row = next(line for line in shown.stdout.splitlines() if line.startswith(tunnel["id"]))
            assert re.search(rf"{tunnel['id']}\s+t\s+127\.0\.0\.1:\d+\s+ws://127\.0\.0\.1:{pair.backend_port}/\S*"
                             r"\s+\d+s\s+2\.9 KiB\s+2\.9 KiB\s+on$", row), shown.stdout  # resumable: the default
            assert "1 listeners, 1 active tunnels, 1 served, 5.9 KiB moved" in shown.stdout
            assert re.search(rf"^t\s+127\.0\.0\.1:{pair.frontend_port}\s+ws://", shown.stdout, re.M), shown.stdout
            assert shown.stdout.startswith(f"tcpbridge-frontend {doc['version']}, pid {pair.frontend.pid}, up ")

            # sd_notify's STATUS= says what `tcpbridge status` says.
            assert wait_until(lambda: notify.drain() == query(sockets["frontend"])["summary"], 5), \
                (notify.last_status, query(sockets["frontend"])["summary"])

            back = json.loads(status("--socket", sockets["backend"], "--json").stdout)
            assert back["daemon"] == "tcpbridge-backend"
            assert [t["label"] for t in back["tunnels"]] == ["main/default"]
            assert back["listeners"] == [{"name": "main", "listen": f"127.0.0.1:{pair.backend_port}",
                                          "to": f"default -> {echo.address}", "labels": ["main/default"]}]
            client.shutdown(socket.SHUT_WR)
            assert client.recv(1) == b""
        assert wait_until(lambda: query(sockets["frontend"])["tunnels"] == [], 5)
        ended = query(sockets["frontend"])
        assert ended["totals"]["closed"] == {"clean": 1}
        assert ended["summary"] == "1 listeners, 0 active tunnels, 1 served, 5.9 KiB moved"
        assert "no active tunnels" in status("--socket", sockets["frontend"]).stdout
    finally:
        pair.frontend.stop(), pair.backend.stop()
        notify.sock.close()
    assert not os.path.exists(sockets["frontend"]) and not os.path.exists(sockets["backend"])  # removed on stop


def test_default_socket_in_runtime_directory(short_dir: Path) -> None:
    daemon = backend(write_yaml(short_dir, "b.yaml", {
        "listeners": [{"name": "main", "listen": free_port(), "routes": {"default": "127.0.0.1:9"}}]}),
        env={"RUNTIME_DIRECTORY": str(short_dir)}).wait_ready()
    path = short_dir / "control.sock"
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert query(str(path))["pid"] == daemon.pid
    finally:
        daemon.stop()
    assert not path.exists()


def test_unknown_request_gets_an_error(short_dir: Path) -> None:
    path = short_dir / "c.sock"
    daemon = backend(write_yaml(short_dir, "b.yaml", {"control_socket": str(path), "listeners": [
        {"name": "main", "listen": free_port(), "routes": {"default": "127.0.0.1:9"}}]})).wait_ready()
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(b"bogus\n")
            answer = json.loads(sock.makefile().read())
        assert answer == {"error": "unknown request 'bogus'; the only one is 'status'"}
    finally:
        daemon.stop()


def test_no_daemon_exit_1_names_the_path(short_dir: Path) -> None:
    missing = str(short_dir / "nothing.sock")
    result = status("--socket", missing)
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"no daemon answers at {missing}: no such socket" in result.stderr

    dead = short_dir / "dead.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(dead))  # left behind: nothing listens
    result = status("--socket", str(dead))
    assert result.returncode == 1
    assert f"no daemon answers at {dead}: connection refused" in result.stderr

    named = status("frontend@east")
    assert named.returncode == 1 and "/run/tcpbridge-frontend-east/control.sock" in named.stderr
    both = status()
    assert both.returncode == 1
    assert "/run/tcpbridge-frontend/control.sock" in both.stderr
    assert "/run/tcpbridge-backend/control.sock" in both.stderr
    assert status("middle").returncode == 2


def test_stale_socket_file_does_not_prevent_start(short_dir: Path) -> None:
    path = short_dir / "c.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))  # what a SIGKILLed daemon leaves
    daemon = backend(write_yaml(short_dir, "b.yaml", {"control_socket": str(path), "listeners": [
        {"name": "main", "listen": free_port(), "routes": {"default": "127.0.0.1:9"}}]})).wait_ready()
    try:
        assert query(str(path))["daemon"] == "tcpbridge-backend"
        assert f"control socket: removed {path}, left behind by a daemon that is gone" in daemon.log
    finally:
        daemon.stop()


@pytest.mark.parametrize("occupant", ["file", "live socket"])
def test_occupied_path_exits_1(short_dir: Path, occupant: str) -> None:
    path = short_dir / "c.sock"
    holder = socket.socket(socket.AF_UNIX)
    if occupant == "file":
        path.write_text("not a socket")
        expected = f"control socket {path}: the file exists and is not a socket"
    else:
        holder.bind(str(path))
        holder.listen(1)
        expected = f"control socket {path}: another process is listening there"
    try:
        daemon = backend(write_yaml(short_dir, "b.yaml", {"control_socket": str(path), "listeners": [
            {"name": "main", "listen": free_port(), "routes": {"default": "127.0.0.1:9"}}]}))
        assert daemon.proc.wait(10) == 1
        daemon.stop()
        assert expected in daemon.log
        assert path.exists()  # someone else's: left alone
    finally:
        holder.close()


def test_a_stuck_client_does_not_block_the_socket(short_dir: Path) -> None:
    path = short_dir / "c.sock"
    daemon = backend(write_yaml(short_dir, "b.yaml", {"control_socket": str(path), "listeners": [
        {"name": "main", "listen": free_port(), "routes": {"default": "127.0.0.1:9"}}]})).wait_ready()
    stuck = socket.socket(socket.AF_UNIX)
    try:
        stuck.connect(str(path))
        stuck.sendall(b"sta")  # and never the rest of the line
        started = time.monotonic()
        assert query(str(path), timeout=CLIENT_TIMEOUT + 5)["daemon"] == "tcpbridge-backend"
        assert time.monotonic() - started < CLIENT_TIMEOUT + 1
        stuck.settimeout(5)
        assert stuck.recv(100) == b""  # the stuck client was cut off without an answer
    finally:
        stuck.close()
        daemon.stop()


def test_units_runtime_directory_is_where_status_looks() -> None:
    for unit, daemon in (("tcpbridge-frontend.service", "frontend"), ("tcpbridge-backend.service", "backend"),
                         ("tcpbridge-frontend@.service", "frontend@%i"), ("tcpbridge-backend@.service", "backend@%i")):
        text = (ROOT / "systemd" / unit).read_text()
        (directory,) = re.findall(r"^RuntimeDirectory=(\S+)$", text, re.M)
        assert unit_socket_path(daemon) == f"/run/{directory}/control.sock"
