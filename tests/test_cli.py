"""The installed command lines, run as real processes: versions, check-config, exit statuses, Go flags."""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge import __version__, cli
from tests.helpers import (
    BIN,
    Daemon,
    TcpServer,
    backend,
    free_port,
    frontend,
    recv_all,
    send_then_shutdown,
    write_yaml,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("tcpbridge", "tcpbridge-frontend", "tcpbridge-backend")
EXIT_TIMEOUT = 15.0


def run(script: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / script), *map(str, args)], capture_output=True, text=True,
                          timeout=EXIT_TIMEOUT, stdin=subprocess.DEVNULL)


def exited(daemon: Daemon) -> int:
    """Wait (bounded) for a daemon that should exit on its own; return its status."""
    try:
        code = daemon.proc.wait(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        daemon.stop()
        raise AssertionError(f"daemon still running after {EXIT_TIMEOUT} s:\n{daemon.log}") from None
    daemon.stop()  # joins the stderr reader
    return code


@contextlib.contextmanager
def serving(daemon: Daemon) -> Iterator[Daemon]:
    """Wait until ready; on the way out SIGTERM it and require exit status 0."""
    try:
        daemon.wait_ready()
    except BaseException:
        daemon.stop()
        raise
    try:
        yield daemon
    finally:
        code = daemon.stop()
    assert code == 0, f"exit status {code} after SIGTERM:\n{daemon.log}"


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def connects(port: int, host: str = "127.0.0.1") -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect((host, port))
        except OSError:
            return False
    return True


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as in /proc/net/tcp{,6}) with a LISTEN socket on ``port``."""
    found = set()
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, _, port_hex = fields[1].partition(":")
            if fields[3] == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def occupied(host: str = "127.0.0.1") -> Iterator[int]:
    """A port held by a listening socket of ours for the duration."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen()
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def frontend_yaml(tmp_path: Path, *tunnels: dict[str, object], name: str = "frontend.yaml") -> Path:
    return write_yaml(tmp_path, name, {"backend": f"ws://127.0.0.1:{free_port()}/", "tunnels": list(tunnels)})


def backend_yaml(tmp_path: Path, *listeners: dict[str, object], name: str = "backend.yaml") -> Path:
    return write_yaml(tmp_path, name, {"listeners": list(listeners)})


def problem_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# --version


@pytest.mark.parametrize("script", SCRIPTS)
def test_version(script: str) -> None:
    result = run(script, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{script} {__version__}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script: str) -> None:
    result = run(script, "--help")
    assert result.returncode == 0
    assert "usage:" in result.stdout


# ---------------------------------------------------------------------------
# check-config


def test_check_config_shipped_files() -> None:
    result = run("tcpbridge", "check-config", ROOT / "conf" / "frontend.yaml", ROOT / "conf" / "backend.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert "frontend.yaml: OK" in lines[0]
    assert "frontend" in lines[0].split("OK", 1)[1]
    assert "backend.yaml: OK" in lines[1]
    assert "backend" in lines[1].split("OK", 1)[1]


def test_check_config_bad_file_lists_each_problem(tmp_path: Path) -> None:
    path = frontend_yaml(
        tmp_path,
        {"name": "web", "listen": "127.0.0.1:0"},
        {"name": "ssh", "listen": free_port(), "connect_timeout": -1, "headers": {"Host": "x"}},
        {"name": "typo", "listen": free_port(), "rout": "x"},
    )
    result = run("tcpbridge", "check-config", path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = problem_lines(result.stderr)
    assert len(lines) == 4, result.stderr
    assert all(line.startswith(f"{path}: ") for line in lines), result.stderr
    assert any("tunnels[0] 'web'" in line and "listen" in line for line in lines)
    assert any("tunnels[1] 'ssh'" in line and "connect_timeout" in line for line in lines)
    assert any("tunnels[1] 'ssh'" in line and "headers" in line and "Host" in line for line in lines)
    assert any("tunnels[2] 'typo'" in line and "'rout'" in line and "did you mean 'route'" in line
               for line in lines)


def test_check_config_bad_backend_file(tmp_path: Path) -> None:
    path = backend_yaml(tmp_path, {"name": "main", "listen": free_port(), "routes": {"ssh": "::1:22"}})
    result = run("tcpbridge", "check-config", path)
    assert result.returncode == 2
    (line,) = problem_lines(result.stderr)
    assert line.startswith(f"{path}: listeners[0] 'main': routes")
    assert "'ssh'" in line


def test_check_config_several_files(tmp_path: Path) -> None:
    good_front = frontend_yaml(tmp_path, {"name": "a", "listen": free_port()}, name="good-front.yaml")
    good_back = backend_yaml(tmp_path, {"name": "m", "listen": free_port(), "routes": {"default": 22}},
                             name="good-back.yaml")
    bad_front = frontend_yaml(tmp_path, {"name": "a", "listen": 70000}, name="bad-front.yaml")
    bad_back = backend_yaml(tmp_path, {"name": "m", "listen": free_port(), "routes": {}}, name="bad-back.yaml")
    neither = tmp_path / "neither.yaml"
    neither.write_text("log_level: info\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("tunnels:\n  - name: a: b\n")

    result = run("tcpbridge", "check-config", good_front, bad_front, good_back, bad_back, neither, broken)
    assert result.returncode == 2
    out = result.stdout.splitlines()
    assert [line.split(": OK")[0] for line in out] == [str(good_front), str(good_back)]
    err = problem_lines(result.stderr)
    assert any(line.startswith(f"{bad_front}: tunnels[0] 'a': listen") for line in err), result.stderr
    assert any(line.startswith(f"{bad_back}: listeners[0] 'm': routes") for line in err), result.stderr
    assert any(line.startswith(f"{neither}: ") for line in err), result.stderr
    assert any(line.startswith(f"{broken}:2:") for line in err), result.stderr
    assert not any(str(good_front) in line or str(good_back) in line for line in err)

    only_good = run("tcpbridge", "check-config", good_front, good_back)
    assert only_good.returncode == 0, only_good.stderr


def test_check_config_missing_file(tmp_path: Path) -> None:
    result = run("tcpbridge", "check-config", tmp_path / "nope.yaml")
    assert result.returncode == 2
    assert str(tmp_path / "nope.yaml") in result.stderr


@pytest.mark.parametrize("args", [(), ("check-config",), ("no-such-command",), ("--bogus",)])
def test_tcpbridge_usage_errors(args: tuple[str, ...]) -> None:
    result = run("tcpbridge", *args)
    assert result.returncode == 2
    assert "usage:" in result.stderr


# ---------------------------------------------------------------------------
# Daemons: invalid configuration


def test_frontend_invalid_config_exits_2_without_listening(tmp_path: Path) -> None:
    good_port = free_port()
    path = frontend_yaml(
        tmp_path,
        {"name": "good", "listen": f"127.0.0.1:{good_port}"},
        {"name": "bad", "listen": free_port(), "half_close": "yes"},
    )
    expected = problem_lines(run("tcpbridge", "check-config", path).stderr)
    assert len(expected) == 1
    daemon = frontend(path)
    assert exited(daemon) == 2
    for problem in expected:
        assert problem in daemon.log
    assert "tunnels[1] 'bad'" in daemon.log
    assert "half_close" in daemon.log
    assert "listening" not in daemon.log
    assert " ready: " not in daemon.log
    assert port_is_free(good_port)


def test_backend_invalid_config_exits_2_without_listening(tmp_path: Path) -> None:
    good_port = free_port()
    path = backend_yaml(
        tmp_path,
        {"name": "good", "listen": good_port, "routes": {"default": 22}},
        {"name": "bad", "listen": free_port(), "routes": {"x": 22}, "max_message_bytes": 100},
    )
    expected = problem_lines(run("tcpbridge", "check-config", path).stderr)
    assert len(expected) == 1
    daemon = backend(path)
    assert exited(daemon) == 2
    assert expected[0] in daemon.log
    assert "listeners[1] 'bad'" in daemon.log
    assert "max_message_bytes" in daemon.log
    assert "listening" not in daemon.log
    assert port_is_free(good_port)


@pytest.mark.parametrize("start", [frontend, backend])
def test_daemon_missing_config_file_exits_2(tmp_path: Path, start: object) -> None:
    daemon = start(tmp_path / "absent.yaml")  # type: ignore[operator]
    assert exited(daemon) == 2
    assert str(tmp_path / "absent.yaml") in daemon.log


@pytest.mark.parametrize("start", [frontend, backend])
def test_daemon_given_the_other_daemons_file_exits_2(tmp_path: Path, start: object) -> None:
    front_file = frontend_yaml(tmp_path, {"name": "a", "listen": free_port()})
    back_file = backend_yaml(tmp_path, {"name": "m", "listen": free_port(), "routes": {"default": 22}})
    wrong = back_file if start is frontend else front_file
    daemon = start(wrong)  # type: ignore[operator]
    assert exited(daemon) == 2
    assert str(wrong) in daemon.log


# ---------------------------------------------------------------------------
# Daemons: a port already in use


@pytest.mark.parametrize("taken_first", [False, True])
def test_frontend_port_in_use_exits_1(tmp_path: Path, taken_first: bool) -> None:
    other_port = free_port()
    with occupied() as taken:
        tunnels = [{"name": "other", "listen": f"127.0.0.1:{other_port}"},
                   {"name": "busy", "listen": f"127.0.0.1:{taken}"}]
        if taken_first:
            tunnels.reverse()
        daemon = frontend(frontend_yaml(tmp_path, *tunnels))
        assert exited(daemon) == 1
        log = daemon.log
        assert "tunnel 'busy'" in log
        assert f"127.0.0.1:{taken}" in log
        assert "address already in use" in log.lower()
        assert " ready: " not in log
        assert port_is_free(other_port)


@pytest.mark.parametrize("taken_first", [False, True])
def test_backend_port_in_use_exits_1(tmp_path: Path, taken_first: bool) -> None:
    other_port = free_port()
    with occupied() as taken:
        listeners = [{"name": "other", "listen": f"127.0.0.1:{other_port}", "routes": {"default": 22}},
                     {"name": "busy", "listen": f"127.0.0.1:{taken}", "routes": {"default": 22}}]
        if taken_first:
            listeners.reverse()
        daemon = backend(backend_yaml(tmp_path, *listeners))
        assert exited(daemon) == 1
        log = daemon.log
        assert "listener 'busy'" in log
        assert f"127.0.0.1:{taken}" in log
        assert "address already in use" in log.lower()
        assert " ready: " not in log
        assert port_is_free(other_port)


def test_go_mode_port_in_use_exits_1() -> None:
    with occupied() as taken:
        result = run("tcpbridge-frontend", "-frontend-port", str(taken), "-backend", "ws://127.0.0.1:9/")
        assert result.returncode == 1
        assert f"127.0.0.1:{taken}" in result.stderr
        assert "address already in use" in result.stderr.lower()
        result = run("tcpbridge-backend", "-frontend-port", str(taken), "-backend-port", "22")
        assert result.returncode == 1
        assert f"127.0.0.1:{taken}" in result.stderr
        assert "address already in use" in result.stderr.lower()


# ---------------------------------------------------------------------------
# Daemons: configured from a file, stopped with SIGTERM


def test_frontend_and_backend_from_config_exit_0_on_sigterm(tmp_path: Path) -> None:
    back_port, front_port = free_port(), free_port()
    back_file = backend_yaml(tmp_path, {"name": "main", "listen": back_port, "routes": {"default": 22}})
    front_file = write_yaml(tmp_path, "frontend.yaml", {
        "backend": f"ws://127.0.0.1:{back_port}/", "tunnels": [{"name": "t", "listen": front_port}],
    })
    with serving(backend(back_file)) as back, serving(frontend(front_file)) as front:
        assert connects(back_port)
        assert f"127.0.0.1:{back_port}" in back.log
        assert f"127.0.0.1:{front_port}" in front.log
        assert listening_addresses(front_port) <= {"0100007F"}
    assert port_is_free(back_port)
    assert port_is_free(front_port)


# ---------------------------------------------------------------------------
# Go-compatible flags


@pytest.mark.parametrize("spelling", ["--", "-"])
def test_go_flags_end_to_end(spelling: str, echo: TcpServer) -> None:
    """Go-style flags, both spellings: data goes frontend -> backend -> echo target and back."""
    back_port, front_port = free_port(), free_port()
    back = backend(None, f"{spelling}frontend-port", str(back_port), f"{spelling}backend-port", str(echo.port))
    front = frontend(None, f"{spelling}frontend-port", str(front_port), f"{spelling}backend",
                     f"ws://127.0.0.1:{back_port}")
    with serving(back), serving(front):
        assert f"127.0.0.1:{back_port}" in back.log
        assert f"127.0.0.1:{front_port}" in front.log
        with socket.create_connection(("127.0.0.1", front_port), timeout=10) as sock:
            send_then_shutdown(sock, b"hello over go flags")
            assert recv_all(sock, timeout=10) == b"hello over go flags"


def test_go_flags_with_equals_sign(echo: TcpServer) -> None:
    back_port, front_port = free_port(), free_port()
    back = backend(None, f"-frontend-port={back_port}", f"-backend-port={echo.port}")
    front = frontend(None, f"--frontend-port={front_port}", f"-backend=ws://127.0.0.1:{back_port}/")
    with serving(back), serving(front), socket.create_connection(("127.0.0.1", front_port), timeout=10) as sock:
        send_then_shutdown(sock, b"x" * 1000)
        assert recv_all(sock, timeout=10) == b"x" * 1000


def test_bind_defaults_to_loopback() -> None:
    front_port, back_port = free_port(), free_port()
    front = frontend(None, "-frontend-port", str(front_port), "-backend", "ws://127.0.0.1:9/")
    back = backend(None, "-frontend-port", str(back_port), "-backend-port", "22")
    with serving(front), serving(back):
        for daemon, port in ((front, front_port), (back, back_port)):
            assert f"listening on 127.0.0.1:{port}" in daemon.log
            assert connects(port)
            # only 127.0.0.1 (0100007F), never 0.0.0.0 or ::
            assert listening_addresses(port) == {"0100007F"}, daemon.log
            assert not connects(port, "127.0.0.2")


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.parametrize("bind", ["::1", "[::1]"])
def test_bind_ipv6_loopback(bind: str) -> None:
    front_port, back_port = free_port("::1"), free_port("::1")
    front = frontend(None, "--bind", bind, "-frontend-port", str(front_port), "-backend", "ws://[::1]:9/")
    back = backend(None, "--bind", bind, "-frontend-port", str(back_port), "-backend-port", "22")
    with serving(front), serving(back):
        for daemon, port in ((front, front_port), (back, back_port)):
            assert f"[::1]:{port}" in daemon.log
            assert connects(port, "::1")
            assert not connects(port, "127.0.0.1")


def test_bind_explicit_ipv4() -> None:
    port = free_port()
    back = backend(None, "--bind", "127.0.0.1", "--frontend-port", str(port), "--backend-port", "22")
    with serving(back):
        assert connects(port)


@pytest.mark.parametrize("bind", ["", "zz::zz", "[::g]"])
def test_bind_bad_address_is_a_usage_error(bind: str) -> None:
    result = run("tcpbridge-frontend", "--bind", bind, "-frontend-port", str(free_port()),
                 "-backend", "ws://127.0.0.1:9/")
    assert result.returncode == 2, result.stderr
    assert "command line" in result.stderr
    assert "listen" in result.stderr


@pytest.mark.parametrize("args", [
    ("--config", "{config}", "--frontend-port", "{port}", "--backend", "ws://127.0.0.1:9/"),
    ("--config", "{config}", "-frontend-port", "{port}"),
    ("--config", "{config}", "-backend", "ws://127.0.0.1:9/"),
    ("--frontend-port", "{port}"),
    ("-frontend-port", "{port}"),
    ("--backend", "ws://127.0.0.1:9/"),
    ("-backend", "ws://127.0.0.1:9/"),
    ("--frontend-port", "0", "--backend", "ws://127.0.0.1:9/"),
    ("--frontend-port", "70000", "--backend", "ws://127.0.0.1:9/"),
    ("--frontend-port", "http", "--backend", "ws://127.0.0.1:9/"),
    ("--frontend-port", "{port}", "--backend", "http://127.0.0.1:9/"),
    ("--frontend-port", "{port}", "--backend-port", "22"),   # a backend flag
    ("--no-such-flag",),
    ("--log-level", "loud", "--config", "{config}"),
])
def test_frontend_usage_errors(tmp_path: Path, args: tuple[str, ...]) -> None:
    port = free_port()
    config = frontend_yaml(tmp_path, {"name": "a", "listen": port})
    argv = [arg.format(config=config, port=port) for arg in args]
    result = run("tcpbridge-frontend", *argv)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip()
    assert "listening" not in result.stderr
    assert port_is_free(port)


@pytest.mark.parametrize("args", [
    ("--config", "{config}", "--frontend-port", "{port}", "--backend-port", "22"),
    ("--config", "{config}", "-frontend-port", "{port}"),
    ("--config", "{config}", "-backend-port", "22"),
    ("--frontend-port", "{port}"),
    ("-frontend-port", "{port}"),
    ("--backend-port", "22"),
    ("-backend-port", "22"),
    ("--frontend-port", "{port}", "--backend-port", "0"),
    ("--frontend-port", "{port}", "--backend-port", "65536"),
    ("--frontend-port", "{port}", "--backend", "ws://127.0.0.1:9/"),   # a frontend flag
    ("--no-such-flag",),
])
def test_backend_usage_errors(tmp_path: Path, args: tuple[str, ...]) -> None:
    port = free_port()
    config = backend_yaml(tmp_path, {"name": "m", "listen": port, "routes": {"default": 22}})
    argv = [arg.format(config=config, port=port) for arg in args]
    result = run("tcpbridge-backend", *argv)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip()
    assert "listening" not in result.stderr
    assert port_is_free(port)


def test_combining_config_and_go_flags_says_why() -> None:
    result = run("tcpbridge-frontend", "--config", "x.yaml", "--frontend-port", "1234", "--backend", "ws://h/")
    assert result.returncode == 2
    assert "--config" in result.stderr
    result = run("tcpbridge-backend", "--frontend-port", "1234")
    assert result.returncode == 2
    assert "--backend-port" in result.stderr


def test_log_level_flag_overrides_config(tmp_path: Path) -> None:
    port = free_port()
    path = write_yaml(tmp_path, "frontend.yaml", {
        "backend": "ws://127.0.0.1:9/", "log_level": "error", "tunnels": [{"name": "t", "listen": port}],
    })
    # the INFO "ready" line that serving() waits for would not be logged at level error
    with serving(frontend(path, "--log-level", "info")) as daemon:
        assert " INFO " in daemon.log
        assert connects(port)


# ---------------------------------------------------------------------------
# workers and cpu_affinity: check-config, and --workers overriding the YAML


def test_check_config_accepts_workers_and_cpu_affinity(tmp_path: Path) -> None:
    front = write_yaml(tmp_path, "front.yaml", {
        "backend": "ws://127.0.0.1:9/", "workers": "auto", "cpu_affinity": [1, 0],
        "tunnels": [{"name": "a", "listen": free_port()}]})
    back = write_yaml(tmp_path, "back.yaml", {
        "workers": 4, "cpu_affinity": False,
        "listeners": [{"name": "m", "listen": free_port(), "routes": {"default": 22}}]})
    result = run("tcpbridge", "check-config", front, back)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert [line.split(": OK")[0] for line in result.stdout.splitlines()] == [str(front), str(back)]


def test_check_config_reports_bad_workers_and_cpu_affinity(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "front.yaml", {
        "backend": "ws://127.0.0.1:9/", "workers": True, "cpu_affinity": [0, 0],
        "tunnels": [{"name": "a", "listen": free_port()}]})
    result = run("tcpbridge", "check-config", path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert problem_lines(result.stderr) == [
        f"{path}: workers: expected a whole number from 1 to 256, or auto (one worker per CPU this daemon may "
        "run on), got bool True",
        f"{path}: cpu_affinity: CPU 0 is listed twice; list each CPU once (worker i is pinned to the i-th CPU "
        "of the list, in turn)",
    ]


def loaded_config(monkeypatch: pytest.MonkeyPatch, main: Callable[[list[str]], int], *argv: str | Path) -> Any:
    """The configuration ``main(argv)`` would run a daemon from, and load again on a reload: each must be equal."""
    loaded: list[object] = []

    def run_daemon(_name: str, args: argparse.Namespace, load: Callable[[argparse.Namespace], object],
                   _daemon_class: object) -> int:
        loaded.extend((load(args), load(args)))  # at start, and what a reload loads
        return 0

    monkeypatch.setattr(cli, "_run_daemon", run_daemon)
    assert main([str(arg) for arg in argv]) == 0
    first, again = loaded
    assert first == again
    return first


DAEMON_MAINS = [pytest.param(cli.frontend_main, id="frontend"), pytest.param(cli.backend_main, id="backend")]


def yaml_for(main: object, tmp_path: Path, **top: object) -> Path:
    if main is cli.frontend_main:
        return write_yaml(tmp_path, "front.yaml", {"backend": "ws://127.0.0.1:9/", **top,
                                                   "tunnels": [{"name": "a", "listen": free_port()}]})
    return write_yaml(tmp_path, "back.yaml", {**top, "listeners": [
        {"name": "m", "listen": free_port(), "routes": {"default": 22}}]})


@pytest.mark.parametrize("main", DAEMON_MAINS)
@pytest.mark.parametrize(("yaml_workers", "flag", "expected"), [
    (None, None, "auto"),
    (3, None, 3),
    ("auto", None, "auto"),
    (None, "2", 2),
    (3, "1", 1),
    (3, "auto", "auto"),
    ("auto", "256", 256),
    (2, "AUTO", "auto"),
])
def test_workers_flag_overrides_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, main: Callable[[list[str]], int],
                                     yaml_workers: object, flag: str | None, expected: object) -> None:
    top = {} if yaml_workers is None else {"workers": yaml_workers}
    path = yaml_for(main, tmp_path, cpu_affinity=[1], **top)
    cfg = loaded_config(monkeypatch, main, "--config", path, *(["--workers", flag] if flag else []))
    assert cfg.workers == expected
    assert cfg.cpu_affinity == (1,)  # the rest of the file is untouched


@pytest.mark.parametrize(("main", "go_flags"), [
    pytest.param(cli.frontend_main, ("--frontend-port", "{port}", "--backend", "ws://127.0.0.1:9/"), id="frontend"),
    pytest.param(cli.backend_main, ("-frontend-port", "{port}", "-backend-port", "22"), id="backend"),
])
@pytest.mark.parametrize(("flags", "expected"), [((), "auto"), (("--workers", "4"), 4), (("--workers=auto",), "auto")])
def test_workers_flag_in_go_compatible_mode(monkeypatch: pytest.MonkeyPatch, main: Callable[[list[str]], int],
                                            go_flags: tuple[str, ...], flags: tuple[str, ...],
                                            expected: object) -> None:
    argv = [arg.format(port=free_port()) for arg in go_flags]
    cfg = loaded_config(monkeypatch, main, *flags, *argv)
    assert cfg.workers == expected
    assert cfg.cpu_affinity == "auto"


@pytest.mark.parametrize("script", ["tcpbridge-frontend", "tcpbridge-backend"])
@pytest.mark.parametrize("value", ["0", "257", "-1", "1.5", "true", "", "many", "٣"])
def test_bad_workers_flag_exits_2_saying_what_is_accepted(tmp_path: Path, script: str, value: str) -> None:
    port = free_port()
    if script == "tcpbridge-frontend":
        path = frontend_yaml(tmp_path, {"name": "a", "listen": port})
    else:
        path = backend_yaml(tmp_path, {"name": "m", "listen": port, "routes": {"default": 22}})
    result = run(script, "--config", path, f"--workers={value}")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"{script}: error: argument --workers: {value!r} is not a number of workers: expected a whole number "
        "from 1 to 256, or auto (one worker per CPU this daemon may run on)")
    assert port_is_free(port)


def test_bad_workers_flag_in_go_compatible_mode_exits_2() -> None:
    port = free_port()
    result = run("tcpbridge-backend", "--frontend-port", str(port), "--backend-port", "22", "--workers", "0")
    assert result.returncode == 2, result.stderr
    assert "argument --workers: '0' is not a number of workers" in result.stderr
    assert port_is_free(port)
