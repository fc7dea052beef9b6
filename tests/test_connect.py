"""``tcpbridge connect``: stdio over one websocket, run as a real process against a real backend daemon.

Everything is on 127.0.0.1: a ``tcpbridge-backend`` with several routes, TCP
targets in this process, and for the ssh test a real OpenSSH server and client.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import (
    BIN,
    Daemon,
    TcpServer,
    backend,
    echo_handler,
    free_port,
    recv_all,
    sha256,
    wait_until,
    write_yaml,
)
from tests.pki import require_tools

TCPBRIDGE = str(BIN / "tcpbridge")
TOKEN = "s3cret-token"
#: Every subprocess wait is bounded by this (seconds).
TIMEOUT = 60


def answer_after_eof(conn: socket.socket) -> None:
    """Read until EOF, wait a little, then answer with the byte count and digest: needs a half-close."""
    data = recv_all(conn)
    time.sleep(0.3)
    conn.sendall(f"got {len(data)} {sha256(data)}\n".encode())
    conn.shutdown(socket.SHUT_WR)


def reset_after_first_bytes(conn: socket.socket) -> None:
    """Read something, then reset the connection (RST, not FIN)."""
    conn.recv(1024)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()


def say_bye_and_close(conn: socket.socket) -> None:
    conn.sendall(b"bye\n")
    conn.shutdown(socket.SHUT_WR)
    time.sleep(5)  # keep reading side open: the tunnel stays half-closed


@dataclass
class Bridge:
    """A backend daemon: listener ``open`` (no token) and listener ``guarded`` (X-Tcpbridge-Token)."""

    daemon: Daemon
    open_port: int
    guarded_port: int

    @property
    def open_url(self) -> str:
        return f"ws://127.0.0.1:{self.open_port}/"

    @property
    def guarded_url(self) -> str:
        return f"ws://127.0.0.1:{self.guarded_port}/"


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[Bridge]:
    servers = {name: TcpServer(handler) for name, handler in [
        ("echo", echo_handler), ("answer", answer_after_eof), ("reset", reset_after_first_bytes),
        ("bye", say_bye_and_close),
    ]}
    open_port, guarded_port = free_port(), free_port()
    config = write_yaml(tmp_path, "backend.yaml", {"listeners": [
        {"name": "open", "listen": f"127.0.0.1:{open_port}",
         "routes": {name: server.address for name, server in servers.items()}},
        {"name": "guarded", "listen": f"127.0.0.1:{guarded_port}", "token": TOKEN,
         "routes": {"echo": servers["echo"].address}},
    ]})
    daemon = backend(config).wait_ready()
    yield Bridge(daemon, open_port, guarded_port)
    daemon.stop()
    for server in servers.values():
        server.close()


def connect(*args: str, data: bytes = b"", timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    """Run ``tcpbridge connect ARGS`` with ``data`` on stdin (then EOF); bounded by ``timeout``."""
    return subprocess.run([TCPBRIDGE, "connect", *args], input=data, capture_output=True, timeout=timeout,
                          check=False)


def popen_connect(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([TCPBRIDGE, "connect", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], timeout: float = TIMEOUT) -> tuple[int, bytes, bytes]:
    """Wait for ``proc`` without closing its stdin (killing it if it overruns); (status, stdout, stderr).

    For small outputs only: they must fit in the pipes while we wait.
    """
    assert proc.stdout is not None and proc.stderr is not None
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        raise AssertionError(f"tcpbridge connect did not exit in {timeout} s; stderr: {proc.stderr.read()!r}") \
            from None
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
    return proc.returncode, proc.stdout.read(), proc.stderr.read()


# ---------------------------------------------------------------------------
# Data


def test_megabytes_both_ways_through_the_url_form(bridge: Bridge) -> None:
    data = os.urandom(6 << 20)
    result = connect(bridge.open_url, "--route", "echo", data=data)
    assert (result.returncode, result.stderr) == (0, b"")
    assert len(result.stdout) == len(data)
    assert sha256(result.stdout) == sha256(data)
    assert bridge.daemon.wait_for_log("[open/echo] closed (clean)")


def test_log_level_flag_shows_the_tunnel_lines(bridge: Bridge) -> None:
    result = connect(bridge.open_url, "--route", "echo", "--log-level", "info", data=b"hello\n")
    assert (result.returncode, result.stdout) == (0, b"hello\n")
    assert "[connect] closed (clean): stdio sent 6 B, received 6 B" in result.stderr.decode()


def test_stdin_eof_is_a_half_close(bridge: Bridge) -> None:
    """The target sees EOF, and its answer, sent afterwards, still arrives."""
    data = os.urandom(3 << 20)
    result = connect(bridge.open_url, "--route", "answer", data=data)
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout == f"got {len(data)} {sha256(data)}\n".encode()


def test_output_ends_when_the_target_half_closes_while_input_stays_open(bridge: Bridge) -> None:
    """Stdout gets EOF at once; the process lives on until its input ends (half-close)."""
    proc = popen_connect(bridge.open_url, "--route", "bye")
    assert proc.stdout is not None and proc.stdin is not None
    started = time.monotonic()
    assert proc.stdout.read() == b"bye\n"  # EOF: stdout was closed
    assert time.monotonic() - started < 10
    assert proc.poll() is None
    proc.stdin.close()
    status, _, err = finish(proc)
    assert (status, err) == (0, b"")


def test_half_close_timeout_ends_the_process_with_stdin_still_open(bridge: Bridge, tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "frontend.yaml", {
        "backend": bridge.open_url,
        "tunnels": [{"name": "bye", "listen": "127.0.0.1:1", "route": "bye", "half_close_timeout": 1}],
    })
    proc = popen_connect("--config", str(config), "bye")
    status, out, err = finish(proc, timeout=15)  # stdin is never closed
    assert (status, out, err) == (0, b"bye\n", b"")


# ---------------------------------------------------------------------------
# Failures: exit status and one stderr line


def test_refused_upgrade_is_status_1_and_one_line_naming_url_and_status(bridge: Bridge) -> None:
    result = connect(bridge.open_url, "--route", "nope", data=b"hello")
    assert result.returncode == 1
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"tcpbridge connect: cannot open ws://127.0.0.1:{bridge.open_port}/"
                               "tcp-over-websocket-bridge/")
    assert "/nope: backend refused the upgrade: HTTP 404 Not Found" in lines[0]


def test_nothing_listening_is_status_1(bridge: Bridge) -> None:
    result = connect(f"ws://127.0.0.1:{free_port()}/", data=b"hello")
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith(": connection refused")


def test_target_reset_is_status_1_without_waiting_for_stdin(bridge: Bridge) -> None:
    """An abort is visible (status 1, one line) and the process exits though stdin never ends."""
    proc = popen_connect(bridge.open_url, "--route", "reset")
    assert proc.stdin is not None
    proc.stdin.write(b"some bytes\n")
    proc.stdin.flush()
    status, out, err = finish(proc, timeout=15)
    lines = err.decode().splitlines()
    assert (status, out) == (1, b""), lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"tcpbridge connect: ws://127.0.0.1:{bridge.open_port}/")
    assert "abort: peer closed the websocket with 1011" in lines[0]
    assert "reset" in lines[0]


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT], ids=["SIGHUP", "SIGINT"])
def test_a_signal_ends_a_live_connection_quietly(bridge: Bridge, signum: signal.Signals) -> None:
    """SIGINT aborts at once; SIGHUP after a grace period in which the connection did not end."""
    proc = popen_connect(bridge.open_url, "--route", "echo")
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"ping\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == b"ping\n"
    started = time.monotonic()
    proc.send_signal(signum)
    status, _, err = finish(proc, timeout=15)
    assert (status, err) == (128 + signum, b"")
    assert bridge.daemon.wait_for_log(f"interrupted by {signum.name}")
    if signum == signal.SIGINT:
        assert time.monotonic() - started < 1.5


def test_sigint_during_the_grace_after_sigterm_aborts_at_once(bridge: Bridge) -> None:
    """As with the daemons' second signal: SIGINT cuts SIGTERM's grace short, and the status says SIGINT."""
    proc = popen_connect(bridge.open_url, "--route", "echo")
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"ping\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == b"ping\n"
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # only so that SIGTERM comes first (pending signals are delivered lowest number first)
    proc.send_signal(signal.SIGINT)
    status, _, err = finish(proc, timeout=15)
    assert (status, err) == (128 + signal.SIGINT, b"")  # 128 + SIGTERM had the grace run out
    assert bridge.daemon.wait_for_log("interrupted by SIGINT")


def test_sighup_right_after_stdin_eof_still_ends_cleanly(bridge: Bridge) -> None:
    """What ssh does when it is done: close the proxy command's stdin, then SIGHUP it at once."""
    data = os.urandom(1 << 20)
    proc = popen_connect(bridge.open_url, "--route", "answer")
    assert proc.stdin is not None
    proc.stdin.write(data)
    proc.stdin.close()
    proc.send_signal(signal.SIGHUP)
    status, out, err = finish(proc, timeout=15)
    assert (status, out, err) == (0, f"got {len(data)} {sha256(data)}\n".encode(), b"")
    assert bridge.daemon.wait_for_log("[open/answer] closed (clean)")


def test_bad_url_and_route_are_usage_errors_with_the_config_messages() -> None:
    result = connect("http://127.0.0.1:1/")
    assert result.returncode == 2
    assert result.stderr.decode() == ("tcpbridge connect: backend: 'http://127.0.0.1:1/': scheme must be ws:// or "
                                      "wss://, not http\n")
    result = connect("ws://127.0.0.1:1/", "--route", "no such route")
    assert result.returncode == 2
    assert result.stderr.decode().startswith("tcpbridge connect: route: expected a route name")
    result = connect("ws://127.0.0.1:1/", "--header", "no colon")
    assert result.returncode == 2
    assert "expected 'Name: value'" in result.stderr.decode()


def test_unknown_tunnel_name_is_status_2_listing_the_known_names(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "frontend.yaml", {
        "backend": "ws://127.0.0.1:1/",
        "tunnels": [{"name": "ssh", "listen": "127.0.0.1:2222"}, {"name": "db", "listen": "127.0.0.1:5432"}],
    })
    result = connect("--config", str(config), "redis")
    assert result.returncode == 2
    assert result.stderr.decode() == f"{config}: no tunnel named 'redis'; known tunnels: ssh, db\n"
    result = connect("--config", str(config), "ssh", "--route", "x")
    assert result.returncode == 2
    assert "--route cannot be combined with --config" in result.stderr.decode()


# ---------------------------------------------------------------------------
# Headers and tokens


def test_token_reaches_the_backend(bridge: Bridge, tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    missing = connect(bridge.guarded_url, "--route", "echo", data=data)
    assert missing.returncode == 1
    assert "HTTP 401" in missing.stderr.decode()

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    by_file = connect(bridge.guarded_url, "--route", "echo", "--token-file", str(token_file), data=data)
    assert (by_file.returncode, by_file.stderr, sha256(by_file.stdout)) == (0, b"", sha256(data))

    by_header = connect(bridge.guarded_url, "--route", "echo", "--header", f"X-Tcpbridge-Token: {TOKEN}", data=data)
    assert (by_header.returncode, by_header.stderr, sha256(by_header.stdout)) == (0, b"", sha256(data))

    wrong = connect(bridge.guarded_url, "--route", "echo", "--header", "X-Tcpbridge-Token: wrong", data=data)
    assert wrong.returncode == 1
    assert "HTTP 403" in wrong.stderr.decode()
    assert TOKEN not in wrong.stderr.decode() + bridge.daemon.log


def test_config_form_takes_url_route_and_secret_headers_from_the_tunnel(bridge: Bridge, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = write_yaml(tmp_path, "frontend.yaml", {
        "backend": "ws://127.0.0.1:1/",
        "log_level": "debug",  # the daemon's level: connect stays quiet unless --log-level says otherwise
        "tunnels": [
            {"name": "other", "listen": "127.0.0.1:2000"},
            {"name": "echo", "listen": "127.0.0.1:2001", "backend": bridge.guarded_url, "route": "echo",
             "headers": {"X-Tcpbridge-Token": {"file": str(token_file)}}},
        ],
    })
    data = os.urandom(2 << 20)
    result = connect("--config", str(config), "echo", data=data)
    assert (result.returncode, result.stderr) == (0, b"")
    assert sha256(result.stdout) == sha256(data)
    assert bridge.daemon.wait_for_log("[guarded/echo] closed (clean)")


# ---------------------------------------------------------------------------
# A real OpenSSH client and server


SSHD = "/usr/sbin/sshd"
SSH = shutil.which("ssh") or "/usr/bin/ssh"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"


@dataclass
class Sshd:
    port: int
    user_key: Path
    known_hosts: Path
    proc: subprocess.Popen[bytes]


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """A throwaway OpenSSH server on 127.0.0.1 (its own config, host key and authorized key)."""
    require_tools("sshd", "ssh", "ssh-keygen")  # installs openssh-server/-client like nginx and tinyproxy
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privsep chroot
    directory = tmp_path / "ssh"
    directory.mkdir()
    host_key, user_key = directory / "host_key", directory / "user_key"
    for key in (host_key, user_key):
        subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "tcpbridge-test", "-f", str(key)],
                       check=True, timeout=TIMEOUT)
    authorized_keys = directory / "authorized_keys"
    authorized_keys.write_text(Path(f"{user_key}.pub").read_text())
    known_hosts = directory / "known_hosts"
    known_hosts.write_text("tcpbridge-test " + " ".join(Path(f"{host_key}.pub").read_text().split()[:2]) + "\n")
    port = free_port()
    config = directory / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"AuthorizedKeysFile {authorized_keys}",
        "PidFile none", "UsePAM no", "StrictModes no", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "UseDNS no", "",
    ]))
    checked = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, timeout=TIMEOUT, check=False)
    assert checked.returncode == 0, checked.stderr.decode()
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: _accepts(port) or proc.poll() is not None, 10), "sshd did not start listening"
        assert proc.poll() is None, proc.communicate(timeout=5)[1].decode()
        yield Sshd(port, user_key, known_hosts, proc)
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_real_ssh_through_tcpbridge_connect(sshd: Sshd, tmp_path: Path) -> None:
    backend_port = free_port()
    config = write_yaml(tmp_path, "backend.yaml", {"listeners": [
        {"name": "main", "listen": f"127.0.0.1:{backend_port}", "routes": {"ssh": f"127.0.0.1:{sshd.port}"}},
    ]})
    daemon = backend(config).wait_ready()
    proxy = f"{TCPBRIDGE} connect ws://127.0.0.1:{backend_port}/ --route ssh"

    def ssh(command: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([
            SSH, "-F", "/dev/null", "-o", f"ProxyCommand={proxy}", "-o", f"UserKnownHostsFile={sshd.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "HostKeyAlias=tcpbridge-test", "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-i", str(sshd.user_key), "-o", "ConnectTimeout=30", "-o", "LogLevel=ERROR",
            "root@127.0.0.1", command,
        ], input=data, capture_output=True, timeout=TIMEOUT, check=False)

    try:
        started = time.monotonic()
        hello = ssh("echo hello")
        hello_seconds = time.monotonic() - started
        assert (hello.returncode, hello.stdout, hello.stderr) == (0, b"hello\n", b""), hello.stderr.decode()

        upload = os.urandom(8 << 20)
        started = time.monotonic()
        summed = ssh("sha256sum", upload)
        upload_seconds = time.monotonic() - started
        assert (summed.returncode, summed.stderr) == (0, b""), summed.stderr.decode()
        assert summed.stdout.decode().split()[0] == sha256(upload)

        copied = tmp_path / "copied.bin"
        assert ssh(f"cat > {copied}", upload).returncode == 0
        assert sha256(copied.read_bytes()) == sha256(upload)

        download = tmp_path / "download.bin"
        download.write_bytes(os.urandom(8 << 20))
        started = time.monotonic()
        fetched = ssh(f"cat {download}")
        download_seconds = time.monotonic() - started
        assert (fetched.returncode, fetched.stderr) == (0, b""), fetched.stderr.decode()
        assert sha256(fetched.stdout) == sha256(download.read_bytes())

        # ssh closes its proxy command's stdin, then SIGHUPs it: the tunnels still end cleanly.
        assert wait_until(lambda: daemon.log.count("[main/ssh] closed") == 4, 10), daemon.log
        assert daemon.log.count("[main/ssh] closed (clean)") == 4, daemon.log
        print(f"ssh 'echo hello' {hello_seconds:.2f} s; 8 MiB up {8 / upload_seconds:.1f} MiB/s "
              f"({upload_seconds:.2f} s), 8 MiB down {8 / download_seconds:.1f} MiB/s ({download_seconds:.2f} s)")
    finally:
        daemon.stop()
