"""The shipped unit files under a real systemd (PID 1 in private namespaces, see systemd_harness).

Root only; skipped with the reason when the machine cannot boot here. The machine shares the host's
network namespace, so the tests talk to the daemons on 127.0.0.1 directly. Inside it:

* ``systemd/tcpbridge-{frontend,backend}.service`` are copied, unchanged, to /etc/systemd/system;
* /usr/local/bin/tcpbridge{,-frontend,-backend} are wrappers running the repository's code (bound
  read-only at its own path) with the venv's site-packages. The units say ``ProtectHome=yes``, so an
  interpreter living under /root or /home (pyenv) is replaced by the system's python of the same
  version;
* an echo service (DynamicUser too) is the target of every backend route.

The tests share one machine and one frontend/backend pair and run in file order; each starts from
a known state (:func:`reset`), so any of them can run alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import free_port, recv_all, recv_exactly
from tests.systemd_harness import MachineUnavailable, SystemdMachine, message, unavailable_reason

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
FRONTEND, BACKEND, ECHO = "tcpbridge-frontend.service", "tcpbridge-backend.service", "tcpbridge-test-echo.service"
PROTECTED = (Path("/root"), Path("/home"), Path("/run/user"))
RAW_PRIORITY = re.compile(r"<\d>")

_reason = unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"systemd machine unavailable: {_reason}")

ECHO_SERVER = """\
import socket, sys, threading

def serve(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)

server = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=128)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# Where the repository and the venv's site-packages appear in the machine: fixed paths outside
# /tmp, /root and /home, which the units' PrivateTmp= and ProtectHome= hide from the services
# (CI may clone the repository under /tmp).
MACHINE_REPO = "/opt/tcpbridge-test/repo"
MACHINE_SITE = "/opt/tcpbridge-test/site-packages"

WRAPPER = """\
#!/bin/sh
exec {python} -I -c 'import site, sys; sys.path.insert(0, "{repo}"); site.addsitedir("{site}"); \
from bridge.cli import {entry}; sys.argv[0] = "{name}"; sys.exit({entry}())' "$@"
"""


def _is_protected(path: Path) -> bool:
    return any(path == p or p in path.parents for p in PROTECTED)


def service_python() -> tuple[str, str] | str:
    """(interpreter, site-packages) the dynamic users can reach, or why there is none."""
    site = sysconfig.get_paths()["purelib"]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = []
    if not _is_protected(Path(sys.base_prefix).resolve()):
        candidates.append(str(Path(sys.base_prefix) / "bin" / f"python{version}"))
    candidates.append(f"/usr/bin/python{version}")
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate, site
    return f"no python{version} outside /root and /home (apt-get install python{version})"


@dataclass
class Bridge:
    """The ports of the pair running in the machine, and how to write its configuration."""

    machine: SystemdMachine
    echo_port: int = field(default_factory=free_port)
    backend_port: int = field(default_factory=free_port)
    echo_tunnel: int = field(default_factory=free_port)
    ghost_tunnel: int = field(default_factory=free_port)
    second_tunnel: int = field(default_factory=free_port)

    def backend_yaml(self) -> dict[str, Any]:
        target = f"127.0.0.1:{self.echo_port}"
        return {"drain_timeout": 5, "listeners": [
            {"name": "main", "listen": f"127.0.0.1:{self.backend_port}",
             "routes": {"default": target, "echo2": target}},
        ]}

    def frontend_yaml(self, *, second: bool = False, drain_timeout: float = 8) -> dict[str, Any]:
        tunnels: list[dict[str, Any]] = [
            {"name": "echo", "listen": f"127.0.0.1:{self.echo_tunnel}"},
            # A route the backend does not have: every connection gets a "cannot open" warning.
            {"name": "ghost", "listen": f"127.0.0.1:{self.ghost_tunnel}", "route": "nosuch"},
        ]
        if second:
            tunnels.append({"name": "second", "listen": f"127.0.0.1:{self.second_tunnel}", "route": "echo2"})
        return {"backend": f"ws://127.0.0.1:{self.backend_port}/", "drain_timeout": drain_timeout,
                "tunnels": tunnels}

    def write_frontend(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        self.machine.write("/etc/tcpbridge/frontend.yaml", text)


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def round_trip(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    assert recv_exactly(sock, len(data), timeout=5) == data


def echo_once(port: int, data: bytes = b"ping through systemd\n") -> None:
    """A whole tunnel: connect, round trip, half-close, expect a clean EOF."""
    with connect(port) as sock:
        round_trip(sock, data)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock, timeout=5) == b""


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def main_pid(machine: SystemdMachine, unit: str) -> int:
    return int(machine.show(unit, "MainPID")["MainPID"])


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def machine() -> Iterator[SystemdMachine]:
    box = SystemdMachine(binds=[(str(REPO), MACHINE_REPO),
                                (sysconfig.get_paths()["purelib"], MACHINE_SITE)])
    try:
        box.boot()
    except MachineUnavailable as exc:
        print(f"systemd machine did not boot: {exc}", file=sys.stderr)
        pytest.skip(f"systemd machine did not boot here: {exc}")
    print(f"\nsystemd booted in {box.boot_seconds:.2f} s (host pid {box.pid})", file=sys.stderr)
    try:
        yield box
    finally:
        box.close()


@pytest.fixture(scope="module")
def bridge(machine: SystemdMachine) -> Bridge:
    """Install the units, wrappers, configuration and the echo target; start all three services."""
    units = [UNITS / FRONTEND, UNITS / BACKEND]
    missing = [str(u) for u in units if not u.exists()]
    assert not missing, f"unit files missing: {missing}"
    found = service_python()
    if isinstance(found, str):
        pytest.skip(found)
    python, _site = found
    for unit in units:
        machine.write(f"/etc/systemd/system/{unit.name}", unit.read_text())
    for name, entry in (("tcpbridge", "main"), ("tcpbridge-frontend", "frontend_main"),
                        ("tcpbridge-backend", "backend_main")):
        machine.write(f"/usr/local/bin/{name}", WRAPPER.format(python=python, repo=MACHINE_REPO, site=MACHINE_SITE,
                                                                   entry=entry, name=name),
                      mode=0o755)
    b = Bridge(machine)
    machine.write("/usr/local/lib/tcpbridge-test/echo.py", ECHO_SERVER)
    machine.write(f"/etc/systemd/system/{ECHO}", (
        "[Unit]\nDescription=echo target for the tcpbridge tests\n[Service]\nDynamicUser=yes\n"
        f"ExecStart={python} -I /usr/local/lib/tcpbridge-test/echo.py {b.echo_port}\n"))
    machine.write("/etc/tcpbridge/backend.yaml", yaml.safe_dump(b.backend_yaml(), sort_keys=False))
    b.write_frontend(b.frontend_yaml())
    machine.systemctl("daemon-reload")
    machine.systemctl("start", ECHO)
    assert machine.wait_for(lambda: accepts(b.echo_port), 10), machine.journal_text(ECHO)
    return b


def reset(bridge: Bridge) -> None:
    """Base configuration, no drop-ins, the backend active and a freshly (re)started frontend."""
    machine = bridge.machine
    dropins = machine.path(f"/etc/systemd/system/{FRONTEND}.d")
    if dropins.exists():
        for conf in dropins.iterdir():
            conf.unlink()
        dropins.rmdir()
        machine.systemctl("daemon-reload")
    bridge.write_frontend(bridge.frontend_yaml())
    machine.systemctl("reset-failed", BACKEND, FRONTEND, check=False)
    if machine.show(BACKEND, "ActiveState")["ActiveState"] != "active":
        start(machine, BACKEND)
    start(machine, FRONTEND, "restart")


def start(machine: SystemdMachine, unit: str, verb: str = "start") -> None:
    result = machine.systemctl(verb, unit, check=False)
    assert result.returncode == 0, f"systemctl {verb} {unit}: {result.stderr}\n{machine.journal_text(unit)}"


# -- step 1: the machine itself ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_simple_unit_logs_to_the_journal(machine: SystemdMachine) -> None:
    assert machine.boot_seconds < 15
    machine.write("/etc/systemd/system/hello.service",
                  "[Service]\nType=simple\nExecStart=/bin/echo hello from a unit\n")
    machine.systemctl("daemon-reload")
    machine.systemctl("start", "hello.service")
    entry = machine.wait_for_journal("hello.service", lambda e: message(e) == "hello from a unit")
    assert entry["_SYSTEMD_UNIT"] == "hello.service"
    assert entry["PRIORITY"] == "6"
    machine.wait_for_state("hello.service", "inactive")
    assert machine.show("hello.service", "Result")["Result"] == "success"


# -- step 2: tcpbridge under systemd -------------------------------------------------------------


@pytest.mark.timeout(40)
def test_start_notify_and_carry_bytes(bridge: Bridge) -> None:
    """(a) Type=notify: start returns once READY=1 came, after binding, so the port accepts at once."""
    machine = bridge.machine
    for unit in (FRONTEND, BACKEND):
        machine.systemctl("stop", unit, check=False)
        machine.systemctl("reset-failed", unit, check=False)
    reset(bridge)
    for unit in (BACKEND, FRONTEND):
        props = machine.show(unit, "ActiveState", "SubState", "Type", "UID", "StatusText")
        assert (props["ActiveState"], props["SubState"], props["Type"]) == ("active", "running", "notify"), props
        assert props["UID"] not in ("0", "[not set]"), f"{unit} is not running as a dynamic user: {props}"
    # No retry: if READY=1 came before bind, this could be refused.
    with connect(bridge.echo_tunnel) as sock:
        data = os.urandom(300_000)
        sock.sendall(data)
        assert recv_exactly(sock, len(data), timeout=10) == data
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock, timeout=5) == b""
    echo_once(bridge.echo_tunnel)


@pytest.mark.timeout(40)
def test_reload_adds_a_tunnel_and_keeps_open_ones(bridge: Bridge) -> None:
    """(b) systemctl reload: the new tunnel works, a tunnel opened before keeps flowing."""
    machine = bridge.machine
    reset(bridge)
    pid = main_pid(machine, FRONTEND)
    assert not accepts(bridge.second_tunnel)
    since = time.monotonic()
    with connect(bridge.echo_tunnel) as held:
        round_trip(held, b"before the reload")
        bridge.write_frontend(bridge.frontend_yaml(second=True))
        machine.systemctl("reload", FRONTEND)
        # systemd 252 may return before the daemon finished: poll for the result.
        machine.wait_for_journal(FRONTEND, lambda e: "reload of" in message(e) and "done" in message(e),
                                 timeout=10, since=since)
        assert machine.wait_for(lambda: accepts(bridge.second_tunnel), 10), machine.journal_text(FRONTEND)
        echo_once(bridge.second_tunnel, b"through the tunnel added by the reload")
        round_trip(held, b"after the reload, same tunnel")
        held.shutdown(socket.SHUT_WR)
        assert recv_all(held, timeout=5) == b""
    props = machine.wait_for_state(FRONTEND, "active", sub_state="running")
    assert int(props["MainPID"]) == pid, "reload must not restart the daemon"
    echo_once(bridge.echo_tunnel)


@pytest.mark.timeout(40)
def test_invalid_yaml_makes_reload_fail_and_the_daemon_keeps_serving(bridge: Bridge) -> None:
    """(c) A bad edit: reload exits non-zero, the daemon is not signalled, stays active and serves."""
    machine = bridge.machine
    reset(bridge)
    pid = main_pid(machine, FRONTEND)
    since = time.monotonic()
    with connect(bridge.echo_tunnel) as held:
        round_trip(held, b"before the bad edit")
        bridge.write_frontend("tunnels: [\n  - name: broken\n    listen: 127.0.0.1:1\n")
        result = machine.systemctl("reload", FRONTEND, check=False)
        assert result.returncode != 0, result
        entry = machine.wait_for_journal(FRONTEND, lambda e: "not reloading process" in message(e),
                                         timeout=10, since=since)
        assert str(entry.get("_SYSTEMD_UNIT", FRONTEND)) == FRONTEND
        round_trip(held, b"after the failed reload")
    props = machine.show(FRONTEND, "ActiveState", "SubState", "MainPID")
    assert (props["ActiveState"], props["SubState"], int(props["MainPID"])) == ("active", "running", pid), props
    echo_once(bridge.echo_tunnel)
    messages = [message(e) for e in machine.journal(FRONTEND, since=since)]
    assert not any("reload of" in m for m in messages), "the daemon must not have been signalled"
    bridge.write_frontend(bridge.frontend_yaml())
    machine.systemctl("reload", FRONTEND)


@pytest.mark.timeout(40)
def test_journal_has_priorities_not_raw_prefixes(bridge: Bridge) -> None:
    """(d) <N> prefixes parsed by journald: tunnel lines at info (6), a refused route at warning (4)."""
    machine = bridge.machine
    reset(bridge)
    since = time.monotonic()
    echo_once(bridge.echo_tunnel, b"for the journal")
    # The backend has no route "nosuch": the frontend warns and resets the client.
    with connect(bridge.ghost_tunnel) as sock, contextlib.suppress(OSError):
        sock.sendall(b"x")
        recv_all(sock, timeout=5)

    def entry(text: str, *more: str) -> dict[str, Any]:
        return machine.wait_for_journal(
            FRONTEND, lambda e: text in message(e) and all(m in message(e) for m in more),
            timeout=10, since=since)

    opened = entry("[echo] open: ")
    closed = entry("[echo] closed")
    refused = entry("[ghost]", "cannot open")
    assert (opened["PRIORITY"], closed["PRIORITY"], refused["PRIORITY"]) == ("6", "6", "4"), (opened, closed, refused)
    for e in (opened, closed, refused):
        assert e["_SYSTEMD_UNIT"] == FRONTEND
        assert not message(e).startswith("<")
    raw = [message(e) for e in machine.journal(FRONTEND) if RAW_PRIORITY.search(message(e))]
    assert not raw, f"raw <N> prefixes reached the journal: {raw}"


@pytest.mark.timeout(40)
def test_stop_drains_open_tunnels(bridge: Bridge) -> None:
    """(e) systemctl stop: no new connections, an open tunnel keeps flowing, then inactive (not failed)."""
    machine = bridge.machine
    reset(bridge)
    since = time.monotonic()
    with connect(bridge.echo_tunnel) as held:
        round_trip(held, b"before the stop")
        machine.systemctl("stop", "--no-block", FRONTEND)
        machine.wait_for_journal(FRONTEND, lambda e: "draining 1 tunnels" in message(e), timeout=10,
                                 since=since)
        assert machine.show(FRONTEND, "ActiveState")["ActiveState"] == "deactivating"
        assert machine.wait_for(lambda: not accepts(bridge.echo_tunnel), 5), "still accepting while draining"
        for i in range(3):
            time.sleep(0.3)
            round_trip(held, f"while draining {i}".encode())
        held.shutdown(socket.SHUT_WR)
        assert recv_all(held, timeout=5) == b""
    props = machine.wait_for_state(FRONTEND, "inactive", timeout=10)
    assert props["Result"] == "success", props
    stopped = machine.wait_for_journal(FRONTEND, lambda e: "stopped after" in message(e), since=since)
    assert stopped["PRIORITY"] == "6"
    messages = [message(e) for e in machine.journal(FRONTEND, since=since)]
    assert not any("drain timeout" in m for m in messages), messages


@pytest.mark.timeout(45)
def test_watchdog_restarts_a_stuck_daemon(bridge: Bridge) -> None:
    """(f) WatchdogSec=2: pings keep it alive; a SIGSTOPped daemon is killed and restarted."""
    machine = bridge.machine
    reset(bridge)
    machine.write(f"/etc/systemd/system/{FRONTEND}.d/50-test-watchdog.conf",
                  "[Service]\nWatchdogSec=2\nRestart=on-failure\nRestartSec=1\n")
    try:
        machine.systemctl("daemon-reload")
        start(machine, FRONTEND, "restart")
        pid = main_pid(machine, FRONTEND)
        assert machine.show(FRONTEND, "WatchdogUSec")["WatchdogUSec"] == "2s"
        time.sleep(3.5)  # longer than WatchdogSec: only WATCHDOG=1 pings keep it alive
        props = machine.show(FRONTEND, "ActiveState", "MainPID", "NRestarts")
        assert (props["ActiveState"], int(props["MainPID"])) == ("active", pid), \
            f"no watchdog pings? {props}\n{machine.journal_text(FRONTEND)}"
        echo_once(bridge.echo_tunnel)
        restarts = int(props["NRestarts"])
        since = time.monotonic()
        stopped_at = time.monotonic()
        machine.run("sh", "-c", 'kill -STOP "$1"', "sh", str(pid), check=True)

        def restarted() -> bool:
            now = machine.show(FRONTEND, "ActiveState", "SubState", "MainPID", "NRestarts")
            return (now["ActiveState"], now["SubState"]) == ("active", "running") \
                and int(now["MainPID"]) not in (0, pid) and int(now["NRestarts"]) > restarts

        assert machine.wait_for(restarted, 12, interval=0.2), machine.journal_text(FRONTEND)
        took = time.monotonic() - stopped_at
        assert took < 10, f"restart took {took:.1f} s"
        machine.wait_for_journal(FRONTEND, lambda e: "watchdog timeout" in message(e).lower(), since=since)
        echo_once(bridge.echo_tunnel)
    finally:
        machine.path(f"/etc/systemd/system/{FRONTEND}.d/50-test-watchdog.conf").unlink(missing_ok=True)
        machine.systemctl("daemon-reload")


@pytest.mark.timeout(45)
def test_workers_under_the_unit_are_pinned_and_stop_with_a_drain(bridge: Bridge) -> None:
    """(g) workers: 2 under the shipped unit: main is MainPID and alone signals systemd; the workers
    are pinned (the unit's SystemCallFilter allows it), log with their tag, and stop with main."""
    machine = bridge.machine
    reset(bridge)
    bridge.write_frontend({**bridge.frontend_yaml(), "workers": 2})
    since = time.monotonic()
    try:
        start(machine, FRONTEND, "restart")
        pid = main_pid(machine, FRONTEND)
        children = [int(c) for c in machine.path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        assert len(children) == 2, machine.journal_text(FRONTEND)
        available = sorted(os.sched_getaffinity(0))
        pinned = [machine.path(f"/proc/{child}/status").read_text().split("Cpus_allowed_list:")[1].split()[0]
                  for child in children]
        if len(available) > 1:
            assert pinned == [str(available[0]), str(available[1])], pinned
        echo_once(bridge.echo_tunnel)
        ready = machine.wait_for_journal(FRONTEND, lambda e: "ready: 2 listeners, 2 of 2 workers" in message(e),
                                         since=since)
        assert int(ready["_PID"]) == pid
        machine.wait_for_journal(FRONTEND, lambda e: message(e).startswith("w1 tunnel echo: listening"),
                                 since=since)
        messages = [message(e) for e in machine.journal(FRONTEND, since=since)]
        assert not any("cannot pin" in m for m in messages), messages
        with connect(bridge.echo_tunnel) as held:
            round_trip(held, b"before the stop")
            machine.systemctl("stop", "--no-block", FRONTEND)
            machine.wait_for_journal(FRONTEND, lambda e: "passing it on to 2 workers" in message(e), since=since)
            round_trip(held, b"while draining")
            held.shutdown(socket.SHUT_WR)
            assert recv_all(held, timeout=5) == b""
        props = machine.wait_for_state(FRONTEND, "inactive", timeout=15)
        assert props["Result"] == "success", props
        assert not any(machine.path(f"/proc/{child}").exists() for child in children)
    finally:
        bridge.write_frontend(bridge.frontend_yaml())


def journal_query(machine: SystemdMachine, unit: str, *matches: str, since: float) -> list[dict[str, Any]]:
    """``journalctl -u UNIT FIELD=value... -o json``: journald's own filtering on our fields."""
    out = machine.run("journalctl", "--no-pager", "-u", unit, *matches, "-o", "json", check=True).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [e for e in entries if int(e["__MONOTONIC_TIMESTAMP"]) >= since * 1e6]


@pytest.mark.timeout(45)
def test_tunnel_lines_carry_journal_fields_a_user_can_filter_on(bridge: Bridge) -> None:
    """(h) journalctl -u UNIT TCPBRIDGE_OUTCOME=clean -o json returns the tunnel the test opened, with
    its byte counts, from both daemons; open failures carry their reason; MESSAGE and PRIORITY as before."""
    machine = bridge.machine
    reset(bridge)
    since = time.monotonic()
    up = os.urandom(70_000)
    with connect(bridge.echo_tunnel) as sock:
        host, port = sock.getsockname()[:2]
        sock.sendall(up)
        down = recv_exactly(sock, len(up), timeout=10)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock, timeout=5) == b""
    assert down == up
    with connect(bridge.ghost_tunnel) as sock, contextlib.suppress(OSError):
        sock.sendall(b"x")
        recv_all(sock, timeout=5)

    def closed_in(unit: str, tunnel: str) -> list[dict[str, Any]]:
        return journal_query(machine, unit, "TCPBRIDGE_OUTCOME=clean", f"TCPBRIDGE_TUNNEL={tunnel}", since=since)

    found: dict[str, list[dict[str, Any]]] = {}

    def both_closed() -> bool:
        found[FRONTEND], found[BACKEND] = closed_in(FRONTEND, "echo"), closed_in(BACKEND, "main/default")
        return bool(found[FRONTEND] and found[BACKEND])

    assert machine.wait_for(both_closed, 10), machine.journal_text(FRONTEND) + machine.journal_text(BACKEND)
    front, back = found[FRONTEND][0], found[BACKEND][0]
    assert front["TCPBRIDGE_PEER"] == f"{host}:{port}"
    assert front["MESSAGE_ID"] == back["MESSAGE_ID"] == "ba665e01949948f086ef673b46e5abf4"
    for entry in (front, back):
        assert (entry["TCPBRIDGE_BYTES_UP"], entry["TCPBRIDGE_BYTES_DOWN"]) == (str(len(up)), str(len(up))), entry
        assert float(entry["TCPBRIDGE_DURATION_S"]) >= 0 and entry["PRIORITY"] == "6"
        assert entry["TCPBRIDGE_TUNNEL_ID"] in message(entry) and "closed (clean)" in message(entry)
        assert entry["SYSLOG_IDENTIFIER"] == entry["_SYSTEMD_UNIT"].removesuffix(".service")
    opened = journal_query(machine, FRONTEND, "MESSAGE_ID=e33acb59f1de438990917bdfdf5a5177",
                           f"TCPBRIDGE_TUNNEL_ID={front['TCPBRIDGE_TUNNEL_ID']}", since=since)
    assert len(opened) == 1 and opened[0]["TCPBRIDGE_DESTINATION"].startswith("ws://127.0.0.1:"), opened
    failed = machine.wait_for_journal(FRONTEND, lambda e: e.get("MESSAGE_ID") == "dfa895b00b7d4f6f9245eefc5cd1d5b6"
                                      and e.get("TCPBRIDGE_TUNNEL") == "ghost", since=since)
    assert (failed["TCPBRIDGE_REASON"], failed["PRIORITY"]) == ("http_404", "4"), failed
    refused = machine.wait_for_journal(BACKEND, lambda e: e.get("TCPBRIDGE_REASON") == "http_404", since=since)
    assert refused["TCPBRIDGE_TUNNEL"] == "main/-" and refused["MESSAGE_ID"] == failed["MESSAGE_ID"], refused
