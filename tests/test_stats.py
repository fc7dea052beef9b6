"""bridge.stats: outcome and failure classes, the histogram, and the registry's snapshots (no sockets)."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from bridge.stats import HANDSHAKE_BUCKETS, Histogram, Stats, dial_failure_reason, human_bytes, outcome_class
from bridge.tunnel import TunnelRegistry


@pytest.mark.parametrize(("outcome", "kind"), [
    ("clean", "clean"),
    ("closed by peer", "closed"),
    ("half-close timeout", "timeout"),
    ("idle timeout (30 s without data)", "timeout"),
    ("abort: websocket peer unresponsive (nothing received or acknowledged for 61 s after a ping)", "timeout"),
    ("bad frame: odd-length hex", "protocol_error"),
    ("abort: client reset (connection reset by peer)", "abort"),
    ("abort: peer closed the websocket with 1011: boom", "abort"),
    ("abort: daemon shutting down", "abort"),
    ("abort: internal error", "abort"),
])
def test_outcome_classes(outcome: str, kind: str) -> None:
    assert outcome_class(outcome) == kind


@pytest.mark.parametrize(("message", "reason"), [
    ("backend refused the upgrade: HTTP 404 Not Found (404 Not Found: no route 'x')", "http_404"),
    ("backend refused the upgrade: HTTP 401 Unauthorized", "http_401"),
    ("TLS certificate verification failed: Hostname mismatch (checked against the system CAs)", "tls"),
    ("TLS handshake failed: wrong version number", "tls"),
    ("cannot use tls ca_file /x.pem: no such file or directory", "tls"),
    ("timed out after 10 s (connect_timeout)", "timeout"),
    ("timed out after 10 s (connect_timeout) via proxy http://10.0.0.3:3128", "timeout"),
    ("cannot resolve host: Name or service not known", "dns"),
    ("connection refused", "connect_refused"),
    ("connection refused via proxy http://p:3128", "connect_refused"),
    ("no route to host", "connect_error"),
    ("cannot read a header value: environment variable X is not set", "secret"),
    ("proxy http://10.0.0.3:3128 refused CONNECT b:443: HTTP 403 Forbidden", "proxy"),
    ("cannot connect to proxy http://10.0.0.3:3128: timed out after 10 s", "proxy"),
    ("cannot resolve proxy http://nowhere:3128: Name or service not known", "proxy"),
    ("websocket handshake failed: Invalid WebSocket Header", "handshake"),
])
def test_dial_failure_reasons(message: str, reason: str) -> None:
    assert dial_failure_reason(message) == reason


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    histogram = Histogram()
    for seconds in (0.0005, 0.001, 0.002, 0.3, 100.0):
        histogram.observe(seconds)
    pairs = dict(histogram.cumulative())
    assert list(pairs)[-1] == "+Inf" and len(pairs) == len(HANDSHAKE_BUCKETS) + 1
    assert pairs["0.001"] == 2  # an observation equal to a bound is in that bucket (le)
    assert pairs["0.0025"] == 3
    assert pairs["0.5"] == 4
    assert pairs["30.0"] == 4
    assert pairs["+Inf"] == histogram.count == 5
    assert histogram.total == pytest.approx(100.3035)


def test_stats_counts_per_label_and_copies() -> None:
    stats = Stats()
    stats.tunnel_opened("a")
    stats.tunnel_ended("a", "clean", 10, 20)
    stats.open_failed("a", "http_404")
    stats.open_failed("a", "http_404")
    stats.handshake("b", 0.01)
    stats.reloaded(ok=True)
    stats.reloaded(ok=False)
    labels = stats.labels()
    assert labels["a"].opened == 1 and labels["a"].closed == {"clean": 1}
    assert (labels["a"].bytes_to_ws, labels["a"].bytes_to_tcp) == (10, 20)
    assert labels["a"].failures == {"http_404": 2}
    assert labels["b"].handshake.count == 1
    assert stats.reload_counts() == {"ok": 1, "failed": 1}
    labels["a"].failures["x"] = 1  # a copy: the daemon's counters are untouched
    assert "x" not in stats.labels()["a"].failures


def fake_tunnel(tunnel_id: str, label: str) -> Any:
    return SimpleNamespace(id=tunnel_id, label=label, peer="127.0.0.1:1", destination="d", started=0.0,
                           bytes_to_ws=0, bytes_to_tcp=0)


def test_snapshot_bytes_never_dip_while_tunnels_end() -> None:
    """A tunnel is either live or counted as ended in every snapshot, so byte totals only grow."""
    registry = TunnelRegistry()
    stop = threading.Event()
    seen: list[int] = []

    def scrape() -> None:
        while not stop.is_set():
            totals = registry.snapshot().totals()
            seen.append(totals["bytes_to_websocket"] + totals["bytes_to_tcp"])

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for index in range(2000):
            tunnel = fake_tunnel(f"{index:06x}", "t")
            registry.add(tunnel)
            tunnel.bytes_to_ws, tunnel.bytes_to_tcp = 3, 4
            registry.remove(tunnel, "clean")
    finally:
        stop.set()
        scraper.join(timeout=10)
    assert seen == sorted(seen)
    snap = registry.snapshot()
    assert snap.totals() == {"opened": 2000, "active": 0, "open_failures": 0,
                             "bytes_to_websocket": 6000, "bytes_to_tcp": 8000}
    assert snap.labels["t"].closed == {"clean": 2000}


def test_snapshot_includes_live_tunnels() -> None:
    registry = TunnelRegistry()
    live = fake_tunnel("abc123", "t")
    live.bytes_to_ws, live.bytes_to_tcp = 5, 7
    registry.add(live)
    snap = registry.snapshot()
    assert [(t.id, t.label, t.bytes_to_ws, t.bytes_to_tcp) for t in snap.live] == [("abc123", "t", 5, 7)]
    assert snap.totals()["bytes_to_websocket"] == 5 and snap.totals()["active"] == 1
    assert snap.live[0].age > 0


@pytest.mark.parametrize(("count", "text"), [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                             (3 * 1024 * 1024 + 200 * 1024, "3.2 MiB"), (5 << 40, "5.0 TiB")])
def test_human_bytes(count: int, text: str) -> None:
    assert human_bytes(count) == text
