"""Counters every daemon keeps, always on, with no dependency: what ``tcpbridge status`` and the
Prometheus endpoint (:mod:`bridge.metrics`) report.

One :class:`Stats` per daemon (``TunnelRegistry.stats``). Everything is counted per *label*: the
tunnel name on the frontend, ``listener/route`` on the backend (``listener/-`` for a refusal whose
route is not configured, so a client cannot create labels at will). Nothing here runs per byte:
a tunnel adds to the counters once when it opens and once when it ends, and the bytes of live
tunnels are read from their :class:`~bridge.tunnel.Tunnel` objects when someone asks
(:meth:`TunnelRegistry.snapshot`), so byte totals include live tunnels and never go down.

Ended tunnels are counted by outcome class (:data:`bridge.outcome.CLASSES`, few and stable, for
dashboards): ``clean`` (both directions finished), ``closed`` (the peer closed the websocket with
1000 before both had finished), ``timeout`` (idle, half-close or ping timeout), ``protocol_error``
(bad input from the websocket peer), ``abort`` (a reset, a dropped connection, a shutdown:
everything else); :class:`bridge.outcome.Kind` says which class each kind of end is.

Open failures (a connection or upgrade that never became a tunnel) are counted by reason label:
on the frontend the :attr:`bridge.transport.DialError.label` of the failure (``http_NNN``,
``timeout``, ``tls``, ...) or ``max_connections`` (its cap); on the backend ``http_NNN``, the
status it refused with, or ``no_such_session`` for a re-attach it refused in band.

The handshake histogram measures, on the frontend, from the accepted client connection to the
backend's 101; on the backend, from the request's headers being read to our 101 being sent (so it
includes connecting the target).
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field

from bridge.outcome import Outcome

#: Upper bounds (seconds) of the handshake histogram's buckets; +Inf is implied.
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RELOAD_RESULTS = ("ok", "failed")
#: How a resumable tunnel's re-attach went: ``resumed``, or why it could not be: the backend refused
#: it (``refused``: unknown session, token), ``resume_timeout`` passed (``timeout``), or bytes the
#: peer needed were no longer kept or it broke the exchange (``lost``).
RESUME_RESULTS = ("resumed", "refused", "timeout", "lost")


@dataclass
class Histogram:
    """Cumulative-on-read bucket counts (``counts[i]``: observations in bucket ``i`` alone)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(HANDSHAKE_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(HANDSHAKE_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``(upper bound, observations <= it)`` pairs, ending with ``+Inf``, as Prometheus wants them."""
        running, pairs = 0, []
        for bound, count in zip((*map(_bound, HANDSHAKE_BUCKETS), "+Inf"), self.counts, strict=True):
            running += count
            pairs.append((bound, running))
        return pairs

    def copy(self) -> Histogram:
        return Histogram(list(self.counts), self.total, self.count)


def _bound(value: float) -> str:
    return repr(float(value))


@dataclass
class LabelStats:
    """The counters of one label (a frontend tunnel, a backend listener/route)."""

    opened: int = 0
    closed: dict[str, int] = field(default_factory=dict)  # outcome class -> tunnels
    bytes_to_ws: int = 0  # of ended tunnels only
    bytes_to_tcp: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # reason class -> connections
    handshake: Histogram = field(default_factory=Histogram)
    resumes: dict[str, int] = field(default_factory=dict)  # RESUME_RESULTS -> re-attaches (ended tunnels)

    def copy(self) -> LabelStats:
        return LabelStats(self.opened, dict(self.closed), self.bytes_to_ws, self.bytes_to_tcp,
                          dict(self.failures), self.handshake.copy(), dict(self.resumes))

    def add(self, other: LabelStats) -> None:
        """Add ``other``'s counters to these (another worker's, or a dead one's)."""
        self.opened += other.opened
        _add_counts(self.closed, other.closed)
        self.bytes_to_ws += other.bytes_to_ws
        self.bytes_to_tcp += other.bytes_to_tcp
        _add_counts(self.failures, other.failures)
        _add_counts(self.resumes, other.resumes)
        self.handshake.counts = [a + b for a, b in zip(self.handshake.counts, other.handshake.counts, strict=True)]
        self.handshake.total += other.handshake.total
        self.handshake.count += other.handshake.count


def _add_counts(into: dict[str, int], counts: dict[str, int]) -> None:
    for key, count in counts.items():
        into[key] = into.get(key, 0) + count


def add_labels(into: dict[str, LabelStats], labels: dict[str, LabelStats]) -> None:
    """Add every label's counters of ``labels`` to ``into`` (copying labels ``into`` lacks)."""
    for label, stats in labels.items():
        if label in into:
            into[label].add(stats)
        else:
            into[label] = stats.copy()


class Stats:
    """A daemon's counters. Thread-safe; each call takes one short lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._labels: dict[str, LabelStats] = {}
        self.reloads = dict.fromkeys(RELOAD_RESULTS, 0)
        #: Wall-clock and monotonic start, for uptime and ``process start`` metrics.
        self.started = time.time()
        self.started_monotonic = time.monotonic()

    def _label(self, label: str) -> LabelStats:
        stats = self._labels.get(label)
        if stats is None:
            stats = self._labels[label] = LabelStats()
        return stats

    def tunnel_opened(self, label: str) -> None:
        with self._lock:
            self._label(label).opened += 1

    def tunnel_ended(self, label: str, outcome: Outcome, bytes_to_ws: int, bytes_to_tcp: int, *,
                     resumed: int = 0, resume_failure: str | None = None) -> None:
        """``resumed``: the tunnel's re-attaches; ``resume_failure``: why its last one failed (RESUME_RESULTS)."""
        kind = outcome.kind.metric_class
        with self._lock:
            stats = self._label(label)
            stats.closed[kind] = stats.closed.get(kind, 0) + 1
            stats.bytes_to_ws += bytes_to_ws
            stats.bytes_to_tcp += bytes_to_tcp
            if resumed:
                stats.resumes["resumed"] = stats.resumes.get("resumed", 0) + resumed
            if resume_failure is not None:
                stats.resumes[resume_failure] = stats.resumes.get(resume_failure, 0) + 1

    def open_failed(self, label: str, reason: str) -> None:
        with self._lock:
            failures = self._label(label).failures
            failures[reason] = failures.get(reason, 0) + 1

    def handshake(self, label: str, seconds: float) -> None:
        with self._lock:
            self._label(label).handshake.observe(max(0.0, seconds))

    def reloaded(self, ok: bool) -> None:
        with self._lock:
            self.reloads["ok" if ok else "failed"] += 1

    def labels(self) -> dict[str, LabelStats]:
        """A copy of every label's counters, taken at one instant."""
        with self._lock:
            return {label: stats.copy() for label, stats in self._labels.items()}

    def reload_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.reloads)


@dataclass(frozen=True)
class LiveTunnel:
    """What the status and metrics views show of a tunnel that is still running."""

    id: str
    label: str
    peer: str
    destination: str
    age: float
    bytes_to_ws: int
    bytes_to_tcp: int
    #: ``resumable``, ``detached`` (waiting for a new websocket) or empty (resume not agreed).
    resume: str = ""
    resumes: int = 0


@dataclass(frozen=True)
class Snapshot:
    """Live tunnels and counters read at one instant (ended tunnels are in ``labels``, live ones in ``live``)."""

    live: tuple[LiveTunnel, ...]
    labels: dict[str, LabelStats]
    reloads: dict[str, int]
    uptime: float

    def totals(self) -> dict[str, int]:
        """Opened, active, failed to open, and bytes each way (ended plus live tunnels)."""
        return {
            "opened": sum(s.opened for s in self.labels.values()),
            "active": len(self.live),
            "open_failures": sum(sum(s.failures.values()) for s in self.labels.values()),
            "bytes_to_websocket": sum(s.bytes_to_ws for s in self.labels.values())
            + sum(t.bytes_to_ws for t in self.live),
            "bytes_to_tcp": sum(s.bytes_to_tcp for s in self.labels.values()) + sum(t.bytes_to_tcp for t in self.live),
        }

    def resumes(self) -> dict[str, int]:
        """Re-attaches by result (RESUME_RESULTS), of ended and live tunnels."""
        counts = dict.fromkeys(RESUME_RESULTS, 0)
        for stats in self.labels.values():
            _add_counts(counts, stats.resumes)
        counts["resumed"] += sum(t.resumes for t in self.live)
        return counts


def merge(parts: list[Snapshot], retired: dict[str, LabelStats], reloads: dict[str, int],
          uptime: float) -> Snapshot:
    """One snapshot of several worker processes: their counters and live tunnels summed, plus the
    counters of ``retired`` (workers that are gone); ``reloads`` and ``uptime`` are the main process's."""
    labels: dict[str, LabelStats] = {}
    add_labels(labels, retired)
    for part in parts:
        add_labels(labels, part.labels)
    live = tuple(tunnel for part in parts for tunnel in part.live)
    return Snapshot(live, labels, dict(reloads), uptime)


def retire(retired: dict[str, LabelStats], last: Snapshot) -> None:
    """Fold the last snapshot of a worker that died into ``retired``: its live tunnels died with it,
    so they count as ended (``abort``) with the bytes they had moved, and totals never go down."""
    add_labels(retired, last.labels)
    for tunnel in last.live:
        stats = retired.setdefault(tunnel.label, LabelStats())
        stats.closed["abort"] = stats.closed.get("abort", 0) + 1
        stats.bytes_to_ws += tunnel.bytes_to_ws
        stats.bytes_to_tcp += tunnel.bytes_to_tcp
        if tunnel.resumes:
            stats.resumes["resumed"] = stats.resumes.get("resumed", 0) + tunnel.resumes


def human_bytes(count: int) -> str:
    """``812 B``, ``1.5 KiB``, ``3.2 MiB``, …: for one-line summaries."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
