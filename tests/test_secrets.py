"""Secrets for upgrade-request headers: :class:`bridge.secrets.SecretResolver` directly, then a real
frontend whose header comes from a file that is rotated, seen by a raw websocket server of ours."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge import secrets as secrets_module
from bridge.config import BasicAuth, Secret
from bridge.secrets import SecretError, SecretResolver
from tests.helpers import Daemon, free_port, frontend, recv_all, wait_until, write_yaml

TOKEN = "tok-5f3a9c1e7b2d"


def script(tmp_path: Path, name: str, body: str) -> str:
    """An executable shell script; returns its path (what error messages name)."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


# ---------------------------------------------------------------------------
# SecretResolver


def test_literal_with_and_without_prefix() -> None:
    resolver = SecretResolver()
    assert resolver.resolve(Secret.literal("abc")) == "abc"
    assert resolver.resolve(Secret(value="abc", prefix="Bearer ")) == "Bearer abc"


def test_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    resolver = SecretResolver()
    monkeypatch.setenv("TCPBRIDGE_TEST_TOKEN", f"  {TOKEN}\n")
    assert resolver.resolve(Secret(env="TCPBRIDGE_TEST_TOKEN")) == TOKEN
    monkeypatch.setenv("TCPBRIDGE_TEST_TOKEN", "rotated")
    assert resolver.resolve(Secret(env="TCPBRIDGE_TEST_TOKEN")) == "rotated"
    monkeypatch.setenv("TCPBRIDGE_TEST_TOKEN", " ")
    with pytest.raises(SecretError, match=r"^environment variable TCPBRIDGE_TEST_TOKEN is empty$"):
        resolver.resolve(Secret(env="TCPBRIDGE_TEST_TOKEN"))
    monkeypatch.delenv("TCPBRIDGE_TEST_TOKEN")
    with pytest.raises(SecretError, match=r"^environment variable TCPBRIDGE_TEST_TOKEN is not set$"):
        resolver.resolve(Secret(env="TCPBRIDGE_TEST_TOKEN"))


def test_a_file_is_re_read_on_every_call(tmp_path: Path) -> None:
    resolver = SecretResolver()
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    secret = Secret(file=str(path), prefix="Bearer ")
    assert resolver.resolve(secret) == f"Bearer {TOKEN}"
    replacement = tmp_path / "token.new"
    replacement.write_text("second\n")
    replacement.rename(path)  # rotation as tools do it: write aside, rename over
    assert resolver.resolve(secret) == "Bearer second"
    path.write_text("third")  # or in place
    assert resolver.resolve(secret) == "Bearer third"


def test_file_errors_name_the_file_never_the_value(tmp_path: Path) -> None:
    resolver = SecretResolver()
    missing = tmp_path / "missing"
    with pytest.raises(SecretError, match=f"^cannot read file {missing}: No such file or directory$"):
        resolver.resolve(Secret(file=str(missing)))
    path = tmp_path / "token"
    for content, problem in [("", "is empty"), ("\n \n", "is empty"), (f"{TOKEN}\nsecond-line\n", "more than one line"),
                             (f"{TOKEN}\r\nx", "more than one line"), (f"{TOKEN}\0x", "more than one line")]:
        path.write_text(content)
        with pytest.raises(SecretError) as info:
            resolver.resolve(Secret(file=str(path)))
        assert str(info.value) == f"file {path} {'holds ' if 'line' in problem else ''}{problem}"
        assert TOKEN not in str(info.value)
    path.write_bytes(b"x" * (secrets_module.MAX_SECRET_BYTES + 1))
    with pytest.raises(SecretError, match="is larger than"):
        resolver.resolve(Secret(file=str(path)))


def test_a_command_is_cached_for_cache_seconds_then_re_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    command = script(tmp_path, "token.sh", f'echo run >> "{runs}"; echo "{TOKEN}-$(wc -l < "{runs}")"\n')
    resolver = SecretResolver()
    secret = Secret(command=(command,), cache_seconds=1.0, prefix="Bearer ")
    assert resolver.resolve(secret) == f"Bearer {TOKEN}-1"
    assert resolver.resolve(secret) == f"Bearer {TOKEN}-1"  # cached
    assert runs.read_text().count("run") == 1
    time.sleep(1.2)
    assert resolver.resolve(secret) == f"Bearer {TOKEN}-2"  # expired: run again
    uncached = Secret(command=(command,), cache_seconds=0)
    assert resolver.resolve(uncached) == f"{TOKEN}-3"
    assert resolver.resolve(uncached) == f"{TOKEN}-4"


def test_concurrent_callers_run_the_command_once(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    command = script(tmp_path, "slow.sh", f'echo run >> "{runs}"; sleep 0.5; echo "{TOKEN}"\n')
    resolver = SecretResolver()
    secret = Secret(command=(command,), cache_seconds=60)
    results: list[str] = []
    barrier = threading.Barrier(8)

    def call() -> None:
        barrier.wait(5)
        results.append(resolver.resolve(secret))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == [TOKEN] * 8
    assert runs.read_text().count("run") == 1


def test_a_failing_command_names_itself_and_its_last_error_line_never_the_value(tmp_path: Path) -> None:
    command = script(tmp_path, "fails.sh", f'echo "{TOKEN}"; echo "starting" >&2; echo "login required" >&2; exit 3\n')
    with pytest.raises(SecretError) as info:
        SecretResolver().resolve(Secret(command=(command, "--flag")))
    assert str(info.value) == f"command {command} exited with status 3: login required"


def test_a_missing_command(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match=f"^command {tmp_path}/nope not found$"):
        SecretResolver().resolve(Secret(command=(f"{tmp_path}/nope",)))
    not_executable = tmp_path / "plain"
    not_executable.write_text("echo x\n")
    with pytest.raises(SecretError, match=f"^cannot run command {not_executable}: Permission denied$"):
        SecretResolver().resolve(Secret(command=(str(not_executable),)))


def test_a_command_that_hangs_is_killed_with_its_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets_module, "COMMAND_TIMEOUT", 0.5)
    pids = tmp_path / "pids"
    # The background sleep keeps the output pipe open after the shell is killed.
    command = script(tmp_path, "hangs.sh", f'echo "{TOKEN}"; sleep 30 & echo $! > "{pids}"; wait\n')
    started = time.monotonic()
    with pytest.raises(SecretError) as info:
        SecretResolver().resolve(Secret(command=(command,)))
    assert time.monotonic() - started < 5
    assert str(info.value) == f"command {command} did not finish in 0.5 s"
    child = int(pids.read_text())
    assert wait_until(lambda: not _alive(child), 5), "the command's child was left running"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_empty_and_multi_line_command_output_is_refused(tmp_path: Path) -> None:
    empty = script(tmp_path, "empty.sh", "echo\n")
    with pytest.raises(SecretError, match=f"^command {empty} is empty$"):
        SecretResolver().resolve(Secret(command=(empty,)))
    two = script(tmp_path, "two.sh", f'echo "{TOKEN}"; echo "{TOKEN}"\n')
    with pytest.raises(SecretError, match=f"^command {two} holds more than one line$"):
        SecretResolver().resolve(Secret(command=(two,)))


def test_a_failed_run_is_not_cached(tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    command = script(tmp_path, "flaky.sh", f'[ -e "{flag}" ] || exit 1; echo "{TOKEN}"\n')
    resolver = SecretResolver()
    secret = Secret(command=(command,), cache_seconds=60)
    with pytest.raises(SecretError, match="exited with status 1"):
        resolver.resolve(secret)
    flag.touch()
    assert resolver.resolve(secret) == TOKEN


def test_basic_auth_encoding(tmp_path: Path) -> None:
    resolver = SecretResolver()
    header = resolver.basic_auth(BasicAuth("user", Secret.literal("pa:ss wörd")))
    assert header == "Basic " + base64.b64encode("user:pa:ss wörd".encode()).decode()
    path = tmp_path / "password"
    path.write_text("from-file\n")
    assert resolver.basic_auth(BasicAuth("u", Secret(file=str(path)))) == "Basic " + \
        base64.b64encode(b"u:from-file").decode()


# ---------------------------------------------------------------------------
# End to end: a frontend's header from a rotated file


class RecordingBackend:
    """A raw websocket server: records each upgrade request's headers, answers 101, then closes 1000."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.requests: list[dict[str, str]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(4096)
                if not data:
                    return
                head += data
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
            pairs = (line.partition(":") for line in lines)
            headers = {name.strip().lower(): value.strip() for name, _, value in pairs}
            self.requests.append(headers)
            accept = base64.b64encode(hashlib.sha1(
                (headers["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
            conn.sendall(f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode() + b"\x88\x02\x03\xe8")
            while conn.recv(4096):
                pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.fixture
def recording() -> Iterator[RecordingBackend]:
    server = RecordingBackend()
    yield server
    server.close()


def connect_and_finish(port: int) -> None:
    """One client connection through the frontend, ended by the backend's close.

    The frontend resets a client whose websocket was refused; on loopback that reset can
    arrive while ``create_connection`` still waits for its (non-blocking) connect to
    complete, so a reset at connect is the same ending as a reset while reading.
    """
    with contextlib.suppress(ConnectionResetError), \
            socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        recv_all(client, timeout=10)


def test_a_rotated_token_file_reaches_the_next_connection_and_is_never_logged(
    tmp_path: Path, recording: RecordingBackend
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    password_file = tmp_path / "password"
    password_file.write_text("pw-7c1d0e\n")
    listen = free_port()
    config = write_yaml(tmp_path, "frontend.yaml", {
        "backend": f"ws://127.0.0.1:{recording.port}/", "log_level": "debug",
        "headers": {"X-Tcpbridge-Token": {"file": str(token_file), "prefix": "Bearer "}},
        "tunnels": [{"name": "t", "listen": f"127.0.0.1:{listen}",
                     "basic_auth": {"username": "me", "password": {"file": str(password_file)}}}]})
    daemon: Daemon = frontend(config, "--log-level", "debug").wait_ready()
    try:
        connect_and_finish(listen)
        assert wait_until(lambda: len(recording.requests) == 1)
        assert recording.requests[0]["x-tcpbridge-token"] == f"Bearer {TOKEN}"
        assert recording.requests[0]["authorization"] == "Basic " + base64.b64encode(b"me:pw-7c1d0e").decode()

        rotated = tmp_path / "token.new"
        rotated.write_text("tok-rotated-81e4\n")
        os.replace(rotated, token_file)
        connect_and_finish(listen)
        assert wait_until(lambda: len(recording.requests) == 2)
        assert recording.requests[1]["x-tcpbridge-token"] == "Bearer tok-rotated-81e4"

        token_file.unlink()  # unreadable now: the connection is refused, the log says why
        connect_and_finish(listen)
        assert daemon.wait_for_log(f"cannot read a header value: cannot read file {token_file}: "
                                   "No such file or directory"), daemon.log
        assert len(recording.requests) == 2
        assert daemon.wait_for_log("closed (")
    finally:
        daemon.stop()
    log = daemon.log
    for value in (TOKEN, "tok-rotated-81e4", "pw-7c1d0e", base64.b64encode(b"me:pw-7c1d0e").decode()):
        assert value not in log
