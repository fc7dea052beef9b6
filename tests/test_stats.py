"""bridge.stats and bridge.outcome: outcome classes, failure labels, the histogram and the registry's
snapshots (no sockets)."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from bridge.outcome import CLASSES, CLEAN, Kind, Outcome
from bridge.registry import TunnelRegistry
from bridge.stats import (
    HANDSHAKE_BUCKETS,
    Histogram,
    LabelStats,
    LiveTunnel,
    Snapshot,
    Stats,
    human_bytes,
    merge,
    retire,
)
from bridge.transport import DialError, DialFailure


@pytest.mark.parametrize(("kind", "metric_class"), [
    (Kind.CLEAN, "clean"),
    (Kind.CLOSED_BY_PEER, "closed"),
    (Kind.HALF_CLOSE_TIMEOUT, "timeout"),
    (Kind.IDLE_TIMEOUT, "timeout"),
    (Kind.PEER_UNRESPONSIVE, "timeout"),
    (Kind.BAD_FRAME, "protocol_error"),
    (Kind.ABORTED_BY_CLIENT, "abort"),
    (Kind.ABORTED_BY_TARGET, "abort"),
    (Kind.ABORTED_BY_PEER, "abort"),
    (Kind.WEBSOCKET_DROPPED, "abort"),
    (Kind.SHUTDOWN, "abort"),
    (Kind.INTERNAL_ERROR, "abort"),
])
def test_every_outcome_kind_is_counted_under_its_class(kind: Kind, metric_class: str) -> None:
    assert kind.metric_class == metric_class


def test_the_class_table_covers_every_kind() -> None:
    assert {kind.metric_class for kind in Kind} == set(CLASSES)
    assert len(Kind) == 12  # a new kind gets a row in the table above


def test_a_peers_words_reach_only_the_detail() -> None:
    """The peer chooses its close reason: counting reads the kind, so it cannot pick our label."""
    stats = Stats()
    stats.tunnel_ended("t", Outcome(Kind.ABORTED_BY_PEER, "abort: peer closed the websocket with 1011: timeout"), 0, 0)
    stats.tunnel_ended("t", Outcome(Kind.ABORTED_BY_PEER, "abort: peer closed the websocket with 4000: clean"), 0, 0)
    assert stats.labels()["t"].closed == {"abort": 2}


@pytest.mark.parametrize(("error", "label"), [
    (DialError("backend refused the upgrade: HTTP 404 Not Found", DialFailure.REFUSED, 404), "http_404"),
    (DialError("timed out after 10 s (connect_timeout)", DialFailure.TIMEOUT), "timeout"),
    (DialError("connection refused", DialFailure.CONNECT_REFUSED), "connect_refused"),
    (DialError("cannot read a header value: environment variable X is not set", DialFailure.SECRET), "secret"),
])
def test_dial_failure_labels(error: DialError, label: str) -> None:
    assert error.label == label


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
    stats.tunnel_ended("a", CLEAN, 10, 20)
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
                           bytes_to_ws=0, bytes_to_tcp=0, session_id=None, resume_state="", resumes=0,
                           resume_failure=None)


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
            registry.remove(tunnel, CLEAN)
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


def test_resumes_are_counted_by_result_for_ended_live_and_retired_tunnels() -> None:
    stats = Stats()
    dropped = Outcome(Kind.WEBSOCKET_DROPPED, "abort: websocket dropped and not resumed within 60 s")
    stats.tunnel_ended("t", CLEAN, 1, 1, resumed=3)
    stats.tunnel_ended("t", dropped, 1, 1, resumed=1, resume_failure="timeout")
    stats.tunnel_ended("t", dropped, 1, 1, resume_failure="refused")
    live = (LiveTunnel("abc123", "t", "p", "d", 1.0, 0, 0, "detached", 2),)
    snap = Snapshot(live, stats.labels(), {}, 1.0)
    assert snap.resumes() == {"resumed": 6, "refused": 1, "timeout": 1, "lost": 0}
    retired: dict[str, LabelStats] = {}
    retire(retired, snap)  # the worker died: its live tunnel's re-attaches still count
    assert retired["t"].resumes == {"resumed": 6, "timeout": 1, "refused": 1}
    merged = merge([snap], retired, {}, 1.0)
    assert merged.resumes()["resumed"] == 12
