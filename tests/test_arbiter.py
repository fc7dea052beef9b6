"""bridge.arbiter: daemons with ``workers: 2`` as real processes: forked, pinned, supervised, summed, stopped.

Every test runs real frontend/backend processes on 127.0.0.1 and real signals; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge import control
from bridge.config import worker_cpus
from bridge.stats import LabelStats, LiveTunnel, Snapshot, merge, retire
from tests.conftest import Pair, start_pair
from tests.helpers import TcpServer, backend, free_port, recv_exactly, wait_until, write_yaml
from tests.test_service import Notifications

WAIT = 15.0  # any wait in this file gives up after this long


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def allowed_cpus(pid: int) -> set[int]:
    return os.sched_getaffinity(pid)


def alive(pid: int) -> bool:
    """Whether any thread of process ``pid`` still runs. Its leader turns zombie as soon as that thread
    exits, while the other threads may still be exiting and holding the process's files (its sockets)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # that thread is gone
        if state not in ("Z", "X"):
            return True
    return False


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path for control sockets (a Unix socket path must fit in 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="tb-") as directory:
        yield Path(directory)


def workers_pair(directory: Path, target: str, **extra: Any) -> Pair:
    """A frontend and a backend with two workers each; the frontend's status at ``directory/f.sock``."""
    return start_pair(directory, target,
                      frontend_extra={"workers": 2, "control_socket": str(directory / "f.sock"), **extra},
                      backend_extra={"workers": 2, "control_socket": str(directory / "b.sock"), **extra})


def opened(pair: Pair, count: int) -> list[socket.socket]:
    clients = []
    for i in range(count):
        client = socket.create_connection(pair.address(), timeout=10)
        message = b"hello %d" % i
        client.sendall(message)
        assert recv_exactly(client, len(message)) == message
        clients.append(client)
    return clients


def flows(client: socket.socket, data: bytes = b"still there") -> None:
    client.sendall(data)
    assert recv_exactly(client, len(data)) == data


def status(directory: Path, daemon: str = "f") -> dict[str, Any]:
    return control.query(str(directory / f"{daemon}.sock"))


@pytest.fixture
def pair(short_dir: Path, echo: TcpServer) -> Iterator[Pair]:
    started = workers_pair(short_dir, echo.address)
    yield started
    started.frontend.stop()
    started.backend.stop()


def test_one_worker_is_one_process(tmp_path: Path, echo: TcpServer) -> None:
    single = start_pair(tmp_path, echo.address)
    try:
        assert children(single.frontend.pid) == [] and children(single.backend.pid) == []
    finally:
        single.frontend.stop()
        single.backend.stop()


def test_two_workers_are_two_pinned_processes_sharing_the_port(pair: Pair, short_dir: Path) -> None:
    for daemon, name in ((pair.frontend, "f"), (pair.backend, "b")):
        workers = status(short_dir, name)["workers"]
        assert sorted(w["pid"] for w in workers) == sorted(children(daemon.pid)), daemon.log
        expected = worker_cpus("auto", 2, sorted(os.sched_getaffinity(daemon.pid)))
        assert [w["cpu"] for w in workers] == expected
        assert [allowed_cpus(w["pid"]) for w in workers] == [{cpu} for cpu in expected]
        assert " ready: 1 listeners, 2 of 2 workers" in daemon.log
    clients = opened(pair, 40)
    try:
        doc = status(short_dir)
        assert doc["totals"]["active"] == 40
        assert len(doc["tunnels"]) == 40
        assert [w["state"] for w in doc["workers"]] == ["serving", "serving"]
        # The kernel spreads connections by a hash: both workers get some of 40 (all in one: 2**-39).
        assert all(w["active"] > 0 for w in doc["workers"]), doc["workers"]
        assert sum(w["active"] for w in doc["workers"]) == 40
        assert doc["summary"].startswith("1 listeners, 2 of 2 workers, 40 active tunnels, 40 served")
        assert "2 workers: pid " in control.format_status(doc).splitlines()[2]
    finally:
        for client in clients:
            client.close()
    assert wait_until(lambda: status(short_dir)["totals"]["active"] == 0, WAIT)
    assert status(short_dir)["totals"]["opened"] == 40


def test_a_killed_worker_is_replaced_and_the_other_keeps_its_tunnels(pair: Pair, short_dir: Path) -> None:
    clients = opened(pair, 20)
    try:
        before = status(short_dir)
        victim, survivor = before["workers"][0], before["workers"][1]
        os.kill(victim["pid"], signal.SIGKILL)
        assert pair.frontend.wait_for_log(f"worker 0 (pid {victim['pid']}) was killed by SIGKILL", WAIT)
        assert wait_until(lambda: len(children(pair.frontend.pid)) == 2
                          and victim["pid"] not in children(pair.frontend.pid), WAIT), pair.frontend.log
        assert pair.frontend.wait_for_log("worker 0 restarted as pid", WAIT)
        survivors = 0
        for client in clients:  # the survivor's tunnels flow; the victim's were reset with it
            try:
                flows(client)
                survivors += 1
            except (OSError, EOFError):  # the kernel closed the victim's sockets: FIN or reset
                pass
        assert survivors == survivor["active"], (survivors, before["workers"])
        # New connections are served by both workers again.
        for client in opened(pair, 20):
            client.close()
        after = status(short_dir)
        assert after["workers"][0]["restarts"] == 1 and after["workers"][0]["pid"] != victim["pid"]
        # Totals never go down: the dead worker's tunnels count as ended, aborted.
        assert after["totals"]["opened"] == before["totals"]["opened"] + 20
        assert after["totals"]["closed"].get("abort", 0) >= victim["active"]
    finally:
        for client in clients:
            client.close()


def test_killing_main_takes_the_workers_with_it(pair: Pair) -> None:
    workers = children(pair.frontend.pid)
    assert len(workers) == 2
    pair.frontend.proc.kill()
    pair.frontend.proc.wait(WAIT)
    assert wait_until(lambda: not any(alive(pid) for pid in workers), WAIT)
    # Nothing listens there any more (SO_REUSEADDR, as the daemons: only a listener makes this fail).
    socket.create_server(("127.0.0.1", pair.frontend_port)).close()


def test_sigterm_drains_every_worker_and_a_second_ends_it(pair: Pair) -> None:
    clients = opened(pair, 10)
    try:
        pair.frontend.proc.send_signal(signal.SIGTERM)
        assert pair.frontend.wait_for_log("SIGTERM received; passing it on to 2 workers", WAIT)
        assert wait_until(lambda: _refused(pair.frontend_port), WAIT)
        for client in clients:  # live tunnels on both workers carry on while they drain
            flows(client)
        assert pair.frontend.proc.poll() is None
        pair.frontend.proc.send_signal(signal.SIGTERM)
        assert pair.frontend.proc.wait(WAIT) == 0
        assert "second SIGTERM during the drain" in pair.frontend.log
    finally:
        for client in clients:
            client.close()


def test_sigterm_with_nothing_live_exits_at_once(pair: Pair) -> None:
    pair.frontend.proc.send_signal(signal.SIGTERM)
    assert pair.frontend.proc.wait(WAIT) == 0
    assert "stopped after" in pair.frontend.log


def _frontend_yaml(directory: Path, pair: Pair, tunnels: list[dict[str, Any]]) -> None:
    write_yaml(directory, "frontend.yaml", {"backend": f"ws://127.0.0.1:{pair.backend_port}/", "workers": 2,
                                             "control_socket": str(directory / "f.sock"), "tunnels": tunnels})


def _reload(pair: Pair, done: str) -> None:
    seen = pair.frontend.log.count(done)
    pair.frontend.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: pair.frontend.log.count(done) > seen, WAIT), pair.frontend.log


def test_reload_adds_and_removes_ports_in_every_worker(pair: Pair, short_dir: Path) -> None:
    held = opened(pair, 6)
    try:
        second = free_port()
        _frontend_yaml(short_dir, pair, [{"name": "t", "listen": f"127.0.0.1:{pair.frontend_port}"},
                                         {"name": "u", "listen": f"127.0.0.1:{second}"}])
        _reload(pair, "done in 2 workers: tunnel u: added")
        for i in range(20):  # spread over both workers: each of them listens on the new port
            with socket.create_connection(("127.0.0.1", second), timeout=10) as client:
                flows(client, b"new port %d" % i)
        assert status(short_dir)["reloads"] == {"ok": 1, "failed": 0}
        assert sorted(item["name"] for item in status(short_dir)["listeners"]) == ["t", "u"]
        _frontend_yaml(short_dir, pair, [{"name": "u", "listen": f"127.0.0.1:{second}"}])
        _reload(pair, "done in 2 workers: tunnel t: removed")
        assert wait_until(lambda: _refused(pair.frontend_port), WAIT)
        for client in held:  # tunnels of a removed listener carry on, in both workers
            flows(client)
        with socket.create_connection(("127.0.0.1", second), timeout=10) as client:
            flows(client)
        assert all(w["restarts"] == 0 for w in status(short_dir)["workers"])
    finally:
        for client in held:
            client.close()


def test_a_rejected_reload_changes_nothing_in_any_worker(pair: Pair, short_dir: Path) -> None:
    (short_dir / "frontend.yaml").write_text("tunnels: [oops\n")
    _reload(pair, "reload rejected, still running the previous configuration")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        _frontend_yaml(short_dir, pair, [{"name": "t", "listen": f"127.0.0.1:{pair.frontend_port}"},
                                         {"name": "u", "listen": f"127.0.0.1:{port}"}])
        _reload(pair, f"tunnel 'u': cannot listen on 127.0.0.1:{port}: address already in use")
    assert status(short_dir)["reloads"] == {"ok": 0, "failed": 2}
    assert [item["name"] for item in status(short_dir)["listeners"]] == ["t"]
    for client in opened(pair, 10):
        client.close()
    assert "w0 " not in pair.frontend.log.split("reload rejected", 1)[1].split("\n", 1)[0]


def test_main_alone_speaks_to_systemd(short_dir: Path, echo: TcpServer) -> None:
    notify = Notifications(short_dir)
    notify.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    port = free_port()
    config = write_yaml(short_dir, "b.yaml", {"workers": 2, "control_socket": str(short_dir / "b.sock"),
                                              "listeners": [{"name": "main", "listen": f"127.0.0.1:{port}",
                                                             "routes": {"default": echo.address}}]})
    daemon = backend(config, env={"NOTIFY_SOCKET": notify.path})
    try:
        senders = set()
        notify.sock.settimeout(WAIT)
        while True:
            data, ancillary, _, _ = notify.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            senders |= {int.from_bytes(item[2][:4], "little") for item in ancillary}
            if b"READY=1" in data:
                break
        assert "STATUS=1 listeners, 2 of 2 workers, 0 active tunnels" in data.decode()
        daemon.wait_ready()
        assert senders == {daemon.pid}
        assert status(short_dir, "b")["summary"] == data.decode().split("STATUS=", 1)[1]
    finally:
        daemon.stop()
        notify.sock.close()


def test_a_port_in_use_fails_the_start_as_with_one_process(short_dir: Path, echo: TcpServer) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = write_yaml(short_dir, "b.yaml", {"workers": 2, "listeners": [
            {"name": "main", "listen": f"127.0.0.1:{port}", "routes": {"default": echo.address}}]})
        daemon = backend(config)
        assert daemon.proc.wait(WAIT) == 1
        assert f"listener 'main': cannot listen on 127.0.0.1:{port}: address already in use" in daemon.log


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# -- summing snapshots (no processes) ----------------------------------------------------------


def _snapshot(label: str, opened: int, live: int) -> Snapshot:
    stats = LabelStats(opened=opened, closed={"clean": opened - live}, bytes_to_ws=100, bytes_to_tcp=10)
    tunnels = tuple(LiveTunnel(f"id{i}", label, "peer", "dest", 1.0, 5, 7) for i in range(live))
    return Snapshot(tunnels, {label: stats}, {"ok": 0, "failed": 0}, 3.0)


def test_merge_sums_workers_and_keeps_retired_counters() -> None:
    retired: dict[str, LabelStats] = {}
    retire(retired, _snapshot("t", opened=3, live=2))
    merged = merge([_snapshot("t", opened=4, live=1), _snapshot("u", opened=1, live=0)], retired,
                   {"ok": 1, "failed": 0}, 9.0)
    totals = merged.totals()
    assert totals["opened"] == 8 and totals["active"] == 1
    assert merged.labels["t"].closed == {"clean": 1 + 3, "abort": 2}
    assert totals["bytes_to_websocket"] == 100 + 2 * 5 + 100 + 100 + 5
    assert merged.reloads == {"ok": 1, "failed": 0} and merged.uptime == 9.0


def test_a_stuck_worker_is_replaced_when_systemd_watches(short_dir: Path, echo: TcpServer) -> None:
    notify = Notifications(short_dir)
    port = free_port()
    config = write_yaml(short_dir, "b.yaml", {"workers": 2, "control_socket": str(short_dir / "b.sock"),
                                              "listeners": [{"name": "main", "listen": f"127.0.0.1:{port}",
                                                             "routes": {"default": echo.address}}]})
    daemon = backend(config, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000"})
    try:
        daemon.wait_ready()
        stuck = status(short_dir, "b")["workers"][1]["pid"]
        os.kill(stuck, signal.SIGSTOP)
        assert daemon.wait_for_log(f"worker 1 (pid {stuck}) stuck: no progress for", WAIT), daemon.log
        assert daemon.wait_for_log("worker 1 restarted as pid", WAIT), daemon.log
        assert stuck not in children(daemon.pid) and len(children(daemon.pid)) == 2
        pings = 0
        while pings < 3:  # main kept pinging the watchdog all along
            if "WATCHDOG=1" in notify.next(WAIT):
                pings += 1
    finally:
        daemon.stop()
        notify.sock.close()


def test_metrics_sum_the_workers_and_never_go_down(short_dir: Path, echo: TcpServer) -> None:
    pytest.importorskip("prometheus_client")
    from tests.test_metrics import scrape, value

    metrics = free_port()
    started = start_pair(short_dir, echo.address,
                         frontend_extra={"workers": 2, "control_socket": str(short_dir / "f.sock"),
                                         "metrics": f"127.0.0.1:{metrics}"})
    try:
        for client in opened(started, 20):
            client.close()
        assert wait_until(lambda: value(scrape(metrics), "tcpbridge_tunnels_active", tunnel="t") == 0, WAIT)
        before = scrape(metrics)
        assert value(before, "tcpbridge_tunnels_opened_total", tunnel="t") == 20
        assert value(before, "tcpbridge_tunnels_closed_total", tunnel="t", outcome="clean") == 20
        workers = [w["pid"] for w in status(short_dir)["workers"]]
        fds = sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in [started.frontend.pid, *workers])
        assert abs(value(before, "process_open_fds") - fds) <= 6  # the three processes' descriptors together
        os.kill(workers[0], signal.SIGKILL)
        assert started.frontend.wait_for_log("worker 0 restarted as pid", WAIT)
        after = scrape(metrics)
        assert value(after, "tcpbridge_tunnels_opened_total", tunnel="t") == 20
        assert value(after, "process_cpu_seconds_total") >= value(before, "process_cpu_seconds_total")
    finally:
        started.frontend.stop()
        started.backend.stop()


def test_auto_is_one_worker_per_cpu_the_daemon_may_use(short_dir: Path, echo: TcpServer) -> None:
    port = free_port()
    config = write_yaml(short_dir, "b.yaml", {"workers": "auto", "listeners": [
        {"name": "main", "listen": f"127.0.0.1:{port}", "routes": {"default": echo.address}}]})
    daemon = backend(config).wait_ready()
    try:
        cpus = len(os.sched_getaffinity(0))
        assert len(children(daemon.pid)) == (cpus if cpus > 1 else 0), daemon.log
    finally:
        daemon.stop()


def test_caps_are_the_daemons_not_each_workers(short_dir: Path, echo: TcpServer) -> None:
    pair = workers_pair(short_dir, echo.address)
    clients: list[socket.socket] = []
    try:
        back = write_yaml(short_dir, "backend.yaml", {
            "workers": 2, "control_socket": str(short_dir / "b.sock"),
            "listeners": [{"name": "main", "listen": f"127.0.0.1:{pair.backend_port}",
                           "routes": {"default": echo.address}, "max_tunnels": 3}]})
        assert back.exists()
        pair.backend.proc.send_signal(signal.SIGHUP)
        assert pair.backend.wait_for_log("reload of", WAIT)
        clients = opened(pair, 3)  # spread over both backend workers
        # The frontend resets the refused client, sometimes before connect() has even returned.
        with pytest.raises((EOFError, OSError)), socket.create_connection(pair.address(), timeout=10) as refused:
            refused.sendall(b"no room")
            recv_exactly(refused, 7, timeout=10)
        assert pair.backend.wait_for_log("listener is full: max_tunnels 3", WAIT)
        clients.pop().close()
        assert wait_until(lambda: status(short_dir, "b")["totals"]["active"] == 2, WAIT)
        clients += opened(pair, 1)  # room for one again
    finally:
        for client in clients:
            client.close()
        pair.frontend.stop()
        pair.backend.stop()
