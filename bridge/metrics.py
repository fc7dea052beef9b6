"""The optional Prometheus endpoint (YAML ``metrics: HOST:PORT``), through prometheus-client.

prometheus-client is imported only when an endpoint is started (``pip install 'tcpbridge[metrics]'``;
config validation says so when it is missing). Nothing is counted through it: at each scrape a
collector reads the daemon's :class:`~bridge.stats.Stats` and live tunnels (one
:meth:`~bridge.registry.TunnelRegistry.snapshot`) and turns them into metric families, on a private
registry (never the global default one), served by a small http.server thread.

Every tunnel metric has the label ``tunnel``: the tunnel name on the frontend, ``listener/route``
on the backend (``listener/-`` for refusals of an unknown route).

* ``tcpbridge_info{daemon,version}`` (1)
* ``tcpbridge_tunnels_active{tunnel}``
* ``tcpbridge_tunnels_opened_total{tunnel}``
* ``tcpbridge_tunnels_closed_total{tunnel,outcome}``: clean, closed, timeout, protocol_error, abort
* ``tcpbridge_bytes_total{tunnel,direction}``: to_websocket, to_tcp; ended and live tunnels
* ``tcpbridge_open_failures_total{tunnel,reason}``: http_404, timeout, tls, max_connections, ...
* ``tcpbridge_handshake_seconds{tunnel}`` (histogram)
* ``tcpbridge_resumes_total{tunnel,result}``: resumed, refused, timeout, lost (resumable tunnels'
  re-attaches, :data:`bridge.stats.RESUME_RESULTS`)
* ``tcpbridge_tunnels_detached{tunnel}``: resumable tunnels waiting for a new websocket now
* ``tcpbridge_reloads_total{result}``: ok, failed
* ``process_*`` (prometheus-client's process collector: CPU, memory, open file descriptors); with
  worker processes, :class:`SummedProcessCollector`: CPU, memory and descriptors of the main
  process and its workers together (CPU of workers that ended included), start time and file
  limit of the main process
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from bridge import __version__
from bridge.config import Address
from bridge.listen import LISTEN_BACKLOG, bind_listener
from bridge.outcome import CLASSES
from bridge.stats import RELOAD_RESULTS, RESUME_RESULTS, Snapshot

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("tcpbridge.metrics")

#: Seconds a scraper may take to send its request.
REQUEST_TIMEOUT = 10.0


class BridgeCollector:
    """Reads the daemon's counters and live tunnels at scrape time (a prometheus-client collector)."""

    def __init__(self, daemon: str, snapshot: Callable[[], Snapshot],
                 known_labels: Callable[[], Iterable[str]]) -> None:
        self.daemon = daemon
        self.snapshot = snapshot
        self.known_labels = known_labels

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snap = self.snapshot()
        info = GaugeMetricFamily("tcpbridge_info", "tcpbridge daemon and version", labels=["daemon", "version"])
        info.add_metric([self.daemon, __version__], 1)
        yield info

        labels = sorted({*self.known_labels(), *snap.labels, *(t.label for t in snap.live)})
        active = GaugeMetricFamily("tcpbridge_tunnels_active", "Tunnels running now", labels=["tunnel"])
        opened = CounterMetricFamily("tcpbridge_tunnels_opened", "Tunnels opened", labels=["tunnel"])
        closed = CounterMetricFamily("tcpbridge_tunnels_closed", "Tunnels ended, by outcome class",
                                     labels=["tunnel", "outcome"])
        moved = CounterMetricFamily("tcpbridge_bytes", "Bytes carried (ended and live tunnels)",
                                    labels=["tunnel", "direction"])
        failures = CounterMetricFamily("tcpbridge_open_failures", "Connections that never became a tunnel, by reason",
                                       labels=["tunnel", "reason"])
        handshake = HistogramMetricFamily(
            "tcpbridge_handshake_seconds",
            "Frontend: accepted connection to the backend's 101; backend: request headers read to 101 sent",
            labels=["tunnel"])
        resumes = CounterMetricFamily("tcpbridge_resumes", "Re-attaches of resumable tunnels, by result",
                                      labels=["tunnel", "result"])
        detached = GaugeMetricFamily("tcpbridge_tunnels_detached",
                                     "Resumable tunnels waiting for a new websocket now", labels=["tunnel"])
        live_count: dict[str, int] = {}
        live_ws: dict[str, int] = {}
        live_tcp: dict[str, int] = {}
        live_resumes: dict[str, int] = {}
        live_detached: dict[str, int] = {}
        for tunnel in snap.live:
            live_resumes[tunnel.label] = live_resumes.get(tunnel.label, 0) + tunnel.resumes
            live_detached[tunnel.label] = live_detached.get(tunnel.label, 0) + (tunnel.resume == "detached")
            live_count[tunnel.label] = live_count.get(tunnel.label, 0) + 1
            live_ws[tunnel.label] = live_ws.get(tunnel.label, 0) + tunnel.bytes_to_ws
            live_tcp[tunnel.label] = live_tcp.get(tunnel.label, 0) + tunnel.bytes_to_tcp
        for label in labels:
            stats = snap.labels.get(label)
            active.add_metric([label], live_count.get(label, 0))
            opened.add_metric([label], stats.opened if stats else 0)
            for outcome in CLASSES:
                closed.add_metric([label, outcome], stats.closed.get(outcome, 0) if stats else 0)
            moved.add_metric([label, "to_websocket"], (stats.bytes_to_ws if stats else 0) + live_ws.get(label, 0))
            moved.add_metric([label, "to_tcp"], (stats.bytes_to_tcp if stats else 0) + live_tcp.get(label, 0))
            detached.add_metric([label], live_detached.get(label, 0))
            for result in RESUME_RESULTS:
                ended = stats.resumes.get(result, 0) if stats else 0
                resumes.add_metric([label, result], ended + (live_resumes.get(label, 0) if result == "resumed" else 0))
            if stats:
                for reason, count in sorted(stats.failures.items()):
                    failures.add_metric([label, reason], count)
                histogram = stats.handshake
                handshake.add_metric([label], histogram.cumulative(), histogram.total)
        yield from (active, opened, closed, moved, failures, handshake, resumes, detached)

        reloads = CounterMetricFamily("tcpbridge_reloads", "Configuration reloads (SIGHUP), by result",
                                      labels=["result"])
        for result in RELOAD_RESULTS:
            reloads.add_metric([result], snap.reloads.get(result, 0))
        yield reloads


#: process_* samples that add up over processes; the others (start time, file limit) are main's.
SUMMED = ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
          "process_open_fds")


class SummedProcessCollector:
    """prometheus-client's process metrics, summed over a daemon's processes (main and workers).

    ``pids()``: the live processes, main first; ``ended_cpu()``: CPU seconds of workers that
    ended, so ``process_cpu_seconds_total`` never goes down when one is replaced.
    """

    def __init__(self, pids: Callable[[], list[int]], ended_cpu: Callable[[], float]) -> None:
        self.pids = pids
        self.ended_cpu = ended_cpu

    def collect(self) -> Iterator[Metric]:
        from prometheus_client import ProcessCollector

        families: dict[str, Metric] = {}
        for index, pid in enumerate(self.pids()):
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():  # type: ignore[misc]
                if family.name not in families:
                    families[family.name] = family
                    continue
                kept = families[family.name]
                for i, sample in enumerate(family.samples):
                    if sample.name in SUMMED and i < len(kept.samples):
                        kept.samples[i] = kept.samples[i]._replace(value=kept.samples[i].value + sample.value)
            if index == 0 and not families:
                return  # no /proc: prometheus-client yields nothing, and so do we
        cpu = families.get("process_cpu_seconds")
        if cpu is not None and cpu.samples:
            cpu.samples[0] = cpu.samples[0]._replace(value=cpu.samples[0].value + self.ended_cpu())
        yield from families.values()


def build_registry(collector: BridgeCollector,
                   processes: SummedProcessCollector | None = None) -> CollectorRegistry:
    """A private registry holding ``collector`` and the process collector (``processes`` if given)."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if processes is None:
        ProcessCollector(registry=registry)
    else:
        registry.register(processes)
    return registry


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.0"
    server_version = f"tcpbridge/{__version__}"
    sys_version = ""

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._answer(404, "text/plain; charset=utf-8", b"404 Not Found: metrics are at /metrics\n")
            return
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        try:
            body = encoder(self.server.registry)
        except Exception:
            log.exception("metrics: collecting failed")
            self._answer(500, "text/plain; charset=utf-8", b"500 Internal Server Error: see the daemon's log\n")
            return
        self._answer(200, content_type, body)

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.debug("metrics: %s %s", self.client_address[0], format % args)


class MetricsServer(ThreadingHTTPServer):
    """``GET /metrics`` on ``address``; bound by the constructor (ListenError), served by :meth:`start`."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: Address, registry: CollectorRegistry) -> None:
        sock = bind_listener(address, "metrics")
        self.address_family = sock.family
        super().__init__((address.host, address.port), _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()
        self.registry = registry
        self.address = Address(*sock.getsockname()[:2])
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.25},
                                        name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics: serving Prometheus metrics on http://%s/metrics", self.address)

    def stop(self) -> None:
        if self._thread:
            self.shutdown()
            self._thread.join(timeout=5)
        self.server_close()


def start_metrics(address: Address, daemon: str, snapshot: Callable[[], Snapshot],
                  known_labels: Callable[[], Iterable[str]],
                  processes: SummedProcessCollector | None = None) -> MetricsServer:
    """Bind the endpoint (ListenError when it cannot) with a fresh registry; call ``start()`` to serve."""
    return MetricsServer(address, build_registry(BridgeCollector(daemon, snapshot, known_labels), processes))
