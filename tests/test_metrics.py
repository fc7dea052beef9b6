"""The Prometheus endpoint (``metrics:``): real daemons scraped over HTTP, and its configuration errors."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bridge import __version__, cli, config
from bridge.config import ConfigError
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

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def start_metrics_pair(tmp_path: Path, target: str) -> tuple[Pair, int, int, int]:
    """Backend (route default -> target) and frontend (tunnel t, plus tunnel bad to an unknown route), both
    with a metrics endpoint."""
    backend_port, frontend_port, bad_port = free_port(), free_port(), free_port()
    backend_metrics, frontend_metrics = free_port(), free_port()
    backend_cfg = write_yaml(tmp_path, "backend.yaml", {
        "metrics": f"127.0.0.1:{backend_metrics}",
        "listeners": [{"name": "main", "listen": f"127.0.0.1:{backend_port}", "routes": {"default": target}}],
    })
    frontend_cfg = write_yaml(tmp_path, "frontend.yaml", {
        "metrics": f"127.0.0.1:{frontend_metrics}",
        "backend": f"ws://127.0.0.1:{backend_port}/",
        "tunnels": [{"name": "t", "listen": f"127.0.0.1:{frontend_port}"},
                    {"name": "bad", "listen": f"127.0.0.1:{bad_port}", "route": "nope"}],
    })
    back = backend(backend_cfg).wait_ready()
    try:
        front = frontend(frontend_cfg).wait_ready()
    except BaseException:
        back.stop()
        raise
    return Pair(front, back, frontend_port, backend_port), bad_port, frontend_metrics, backend_metrics


def test_metrics_follow_a_tunnel_a_refusal_and_reloads(tmp_path: Path, echo: TcpServer) -> None:
    pair, bad_port, front_port, back_port = start_metrics_pair(tmp_path, echo.address)
    try:
        before = scrape(front_port)
        assert value(before, "tcpbridge_info", daemon="tcpbridge-frontend", version=__version__) == 1
        assert value(before, "tcpbridge_tunnels_active", tunnel="t") == 0
        assert ("tcpbridge_tunnels_opened_total", (("tunnel", "t"),)) in before  # known before any traffic
        assert ("tcpbridge_tunnels_opened_total", (("tunnel", "main/default"),)) in scrape(back_port)

        # A live tunnel: active, opened and its bytes so far.
        with socket.create_connection(pair.address(), timeout=10) as client:
            client.sendall(b"a" * 1000)
            assert recv_exactly(client, 1000) == b"a" * 1000
            for port, label in ((front_port, "t"), (back_port, "main/default")):
                assert wait_until(lambda p=port, lb=label: value(scrape(p), "tcpbridge_bytes_total", tunnel=lb,
                                                                 direction="to_tcp") == 1000, 5)
                live = scrape(port)
                assert value(live, "tcpbridge_tunnels_active", tunnel=label) == 1
                assert value(live, "tcpbridge_tunnels_opened_total", tunnel=label) == 1
                assert value(live, "tcpbridge_bytes_total", tunnel=label, direction="to_websocket") == 1000
                assert value(live, "tcpbridge_handshake_seconds_count", tunnel=label) == 1
                assert value(live, "tcpbridge_handshake_seconds_bucket", tunnel=label, le="+Inf") == 1
                assert 0 < value(live, "tcpbridge_handshake_seconds_sum", tunnel=label) < 5
            client.sendall(b"b" * 500)
            assert recv_exactly(client, 500) == b"b" * 500
            client.shutdown(socket.SHUT_WR)
            assert client.recv(1) == b""

        # Ended: not active, counted as clean, and its bytes stay in the totals.
        assert wait_until(lambda: value(scrape(front_port), "tcpbridge_tunnels_active", tunnel="t") == 0, 5)
        assert wait_until(lambda: value(scrape(back_port), "tcpbridge_tunnels_active", tunnel="main/default") == 0, 5)
        for port, label in ((front_port, "t"), (back_port, "main/default")):
            ended = scrape(port)
            assert value(ended, "tcpbridge_tunnels_closed_total", tunnel=label, outcome="clean") == 1
            assert value(ended, "tcpbridge_tunnels_closed_total", tunnel=label, outcome="abort") == 0
            assert value(ended, "tcpbridge_bytes_total", tunnel=label, direction="to_websocket") == 1500
            assert value(ended, "tcpbridge_bytes_total", tunnel=label, direction="to_tcp") == 1500

        # A route the backend does not have: a 404 on both sides, counted with its reason.
        with pytest.raises(ConnectionResetError), \
                socket.create_connection(("127.0.0.1", bad_port), timeout=10) as client:  # reset may beat connect()
            client.recv(1)
        assert wait_until(lambda: value(scrape(front_port), "tcpbridge_open_failures_total", tunnel="bad",
                                        reason="http_404") == 1, 5)
        refused = scrape(back_port)
        assert value(refused, "tcpbridge_open_failures_total", tunnel="main/-", reason="http_404") == 1
        assert value(refused, "tcpbridge_tunnels_opened_total", tunnel="main/default") == 1
        assert value(scrape(front_port), "tcpbridge_tunnels_opened_total", tunnel="bad") == 0

        # Reloads: one that works, one rejected.
        pair.frontend.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: value(scrape(front_port), "tcpbridge_reloads_total", result="ok") == 1, 5)
        frontend_cfg = tmp_path / "frontend.yaml"
        frontend_cfg.write_text(frontend_cfg.read_text() + "bogus: 1\n")
        pair.frontend.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: value(scrape(front_port), "tcpbridge_reloads_total", result="failed") == 1, 5)
        assert value(scrape(front_port), "tcpbridge_reloads_total", result="ok") == 1

        # The process collector rides along.
        assert value(scrape(back_port), "process_open_fds") > 0
    finally:
        pair.frontend.stop(), pair.backend.stop()


def test_other_paths_are_404(tmp_path: Path) -> None:
    metrics_port = free_port()
    daemon = backend(write_yaml(tmp_path, "b.yaml", {
        "metrics": metrics_port,  # a bare port: 127.0.0.1
        "listeners": [{"name": "main", "listen": free_port(), "routes": {"default": "127.0.0.1:9"}}],
    })).wait_ready()
    try:
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/", timeout=5)
        assert error.value.code == 404
        assert "metrics: serving Prometheus metrics on http://127.0.0.1:" in daemon.log
    finally:
        daemon.stop()


def test_metrics_port_in_use_exits_1(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        daemon = frontend(write_yaml(tmp_path, "f.yaml", {
            "metrics": f"127.0.0.1:{port}", "backend": "ws://127.0.0.1:9/",
            "tunnels": [{"name": "t", "listen": free_port()}]}))
        assert daemon.proc.wait(10) == 1
        daemon.stop()
    assert f"metrics: cannot listen on 127.0.0.1:{port}: address already in use" in daemon.log


# --- configuration ------------------------------------------------------------------------------------------

FRONTEND = {"backend": "ws://127.0.0.1:9/", "tunnels": [{"name": "t", "listen": 17001}]}
BACKEND = {"listeners": [{"name": "main", "listen": 18081, "routes": {"default": 22}}]}


def test_metrics_and_control_socket_parse() -> None:
    front = config.parse_frontend({**FRONTEND, "metrics": "[::1]:9108", "control_socket": "/run/x/c.sock"}, "f")
    assert (str(front.metrics), front.control_socket) == ("[::1]:9108", "/run/x/c.sock")
    back = config.parse_backend({**BACKEND, "metrics": 9108}, "b")
    assert (str(back.metrics), back.control_socket) == ("127.0.0.1:9108", None)
    assert config.parse_backend(BACKEND, "b").metrics is None  # off by default


@pytest.mark.parametrize(("extra", "problem"), [
    ({"metrics": "localhost:http"}, "b.yaml: metrics: 'localhost:http': port must be a number from 1 to 65535"),
    ({"metrics": True}, "b.yaml: metrics: expected host:port or a port number, got bool True"),
    ({"metrics": 18081}, "b.yaml: listeners[0] 'main': listen: 127.0.0.1:18081 is already used by metrics"),
    ({"control_socket": "run/c.sock"}, "b.yaml: control_socket: expected an absolute path for a Unix socket, "
                                       "got str 'run/c.sock'"),
    ({"control_socket": "/" + "x" * 200}, "longer than 107 bytes"),
    ({"metric": 9108}, "b.yaml: unknown key 'metric'; did you mean 'metrics'?"),
])
def test_config_errors(extra: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        config.parse_backend({**BACKEND, **extra}, "b.yaml")
    assert any(problem in line for line in error.value.problems), error.value.problems


MISSING = "metrics: 127.0.0.1:9108 needs the prometheus-client package: pip install 'tcpbridge[metrics]'"


def test_metrics_without_prometheus_client_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails as if not installed
    with pytest.raises(ConfigError) as error:
        config.parse_frontend({**FRONTEND, "metrics": "127.0.0.1:9108"}, "f.yaml")
    assert error.value.problems == [f"f.yaml: {MISSING}"]
    path = write_yaml(tmp_path, "f.yaml", {**FRONTEND, "metrics": 9108})
    assert cli.check_config([str(path)]) == 2
    assert f"{path}: {MISSING}" in capsys.readouterr().err
    config.parse_frontend(FRONTEND, "f.yaml")  # without metrics, nothing needs it


def test_daemon_without_prometheus_client_exits_2(tmp_path: Path) -> None:
    """A real daemon whose prometheus_client cannot be imported refuses the file, naming the extra."""
    shadow = tmp_path / "shadow" / "prometheus_client"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named prometheus_client')\n")
    path = write_yaml(tmp_path, "b.yaml", {**BACKEND, "metrics": "127.0.0.1:9108"})
    result = subprocess.run([str(BIN / "tcpbridge-backend"), "--config", str(path)],
                            env={"PYTHONPATH": str(tmp_path / "shadow"), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2, result.stderr
    assert f"invalid configuration: {path}: {MISSING}" in result.stderr


# --- cost ---------------------------------------------------------------------------------------------------

def test_scrape_with_1000_live_tunnels_is_fast() -> None:
    """The collector reads live tunnels at scrape time: 1000 of them over 10 labels."""
    from bridge.metrics import BridgeCollector, build_registry
    from bridge.registry import TunnelRegistry

    registry = TunnelRegistry()
    for index in range(1000):
        label = f"t{index % 10}"
        registry.add(SimpleNamespace(id=f"{index:06x}", label=label, peer="127.0.0.1:1", destination="d",  # type: ignore[arg-type]
                                     started=time.monotonic(), bytes_to_ws=index, bytes_to_tcp=2 * index,
                                     session_id=None, resume_state="", resumes=0, resume_failure=None))
        registry.stats.handshake(label, 0.002)
    metrics = build_registry(BridgeCollector("tcpbridge-frontend", registry.snapshot, lambda: []))
    prometheus_client.generate_latest(metrics)
    rounds = 20
    started = time.perf_counter()
    for _ in range(rounds):
        text = prometheus_client.generate_latest(metrics).decode()
    took = (time.perf_counter() - started) / rounds
    print(f"scrape with 1000 live tunnels: {took * 1000:.2f} ms")
    assert 'tcpbridge_tunnels_active{tunnel="t3"} 100.0' in text
    assert took < 0.5


def test_resumes_and_detached_tunnels_are_exported() -> None:
    from bridge.metrics import BridgeCollector, build_registry
    from bridge.outcome import CLEAN, Kind, Outcome
    from bridge.stats import LiveTunnel, Snapshot, Stats

    stats = Stats()
    stats.tunnel_ended("t", CLEAN, 0, 0, resumed=2)
    stats.tunnel_ended("t", Outcome(Kind.WEBSOCKET_DROPPED, "abort"), 0, 0, resume_failure="refused")
    live = (LiveTunnel("a", "t", "p", "d", 1.0, 0, 0, "detached", 1), LiveTunnel("b", "t", "p", "d", 1.0, 0, 0,
                                                                                 "resumable", 0))
    metrics = build_registry(BridgeCollector("tcpbridge-backend", lambda: Snapshot(live, stats.labels(), {}, 1.0),
                                             lambda: []))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(prometheus_client.generate_latest(metrics).decode())
               for s in family.samples}
    assert samples[("tcpbridge_resumes_total", (("result", "resumed"), ("tunnel", "t")))] == 3
    assert samples[("tcpbridge_resumes_total", (("result", "refused"), ("tunnel", "t")))] == 1
    assert samples[("tcpbridge_resumes_total", (("result", "timeout"), ("tunnel", "t")))] == 0
    assert samples[("tcpbridge_tunnels_detached", (("tunnel", "t"),))] == 1
