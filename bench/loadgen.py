"""The benchmark's load generators, each run as its own process so it never takes the measuring GIL.

Two modes, each printing one JSON line on stdout when done:

* ``rr``: N connections to an echo service, each a loop of one request of ``--size`` bytes and its
  echo, back to back (or one request every ``--interval-ms``: an interactive user). One epoll loop
  over all connections, so the generator costs a few microseconds per request whatever N is.
  After ``--warmup`` seconds it measures for ``--seconds``: completed requests, latency percentiles
  (microseconds, request sent to echo complete), and the CPU seconds that the processes of
  ``--cpu-pids`` and their descendants spent in that window (read here so the window is exact).
  Every echo is compared with what was sent; a difference or an EOF fails the run.
* ``bulk``: ``--uploads`` streams to the sink and ``--downloads`` streams from the flood service,
  one thread each, for ``--seconds``; reports MiB/s each way.

Every socket call has a timeout; the process ends after warm-up + seconds + a bounded grace.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procstat

IO_TIMEOUT = 30.0
MIB = 1 << 20


class LoadError(Exception):
    """The run failed: what went wrong and on which connection."""


def window_cpu(roots: list[int]) -> float:
    """CPU seconds so far of ``roots`` and their live descendants (socat's forked children too)."""
    return sum(procstat.cpu_seconds(pid) for pid in procstat.descendants(roots)) if roots else 0.0


def percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _open(address: tuple[str, int], count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(address, timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(IO_TIMEOUT)
        socks.append(sock)
    return socks


def request_response(address: tuple[str, int], connections: int, size: int, warmup: float, seconds: float,
                     interval: float, cpu_roots: list[int]) -> dict[str, Any]:
    """Drive ``connections`` echo loops; see the module docstring."""
    socks = _open(address, connections)
    messages = [bytes((i + j) & 0xFF for j in range(size)) for i in range(connections)]
    by_fd = {sock.fileno(): i for i, sock in enumerate(socks)}
    got = [bytearray() for _ in socks]
    sent_at = [0] * connections
    due = [0.0] * connections  # paced mode: when each connection sends next
    poller = select.epoll()
    latencies: list[float] = []
    count = 0
    try:
        for sock in socks:
            poller.register(sock.fileno(), select.EPOLLIN)
        now = time.monotonic()
        start_window = now + warmup
        end = start_window + seconds
        cpu_start: float | None = None
        measuring = False

        def send(i: int) -> None:
            sent_at[i] = time.perf_counter_ns()
            socks[i].sendall(messages[i])

        for i in range(connections):
            send(i)
        while True:
            now = time.monotonic()
            if not measuring and now >= start_window:
                measuring, cpu_start = True, window_cpu(cpu_roots)
            if now >= end:
                break
            timeout = min(end - now, 1.0)
            if interval:
                pending = [due[i] for i in range(connections) if not sent_at[i]]
                if pending:
                    timeout = max(0.0, min(timeout, min(pending) - now))
            for fd, _ in poller.poll(timeout):
                i = by_fd[fd]
                buf = got[i]
                data = socks[i].recv(size - len(buf))
                if not data:
                    raise LoadError(f"connection {i}: EOF with {len(buf)} of {size} bytes of an echo")
                buf += data
                if len(buf) < size:
                    continue
                elapsed = time.perf_counter_ns() - sent_at[i]
                if buf != messages[i]:
                    raise LoadError(f"connection {i}: echo differs from the request")
                buf.clear()
                if measuring:
                    latencies.append(elapsed / 1000)
                    count += 1
                if interval:
                    sent_at[i] = 0
                    due[i] = time.monotonic() + interval
                else:
                    send(i)
            if interval:
                now = time.monotonic()
                for i in range(connections):
                    if not sent_at[i] and due[i] <= now:
                        send(i)
        cpu = window_cpu(cpu_roots) - (cpu_start or 0.0)
    finally:
        poller.close()
        for sock in socks:
            sock.close()
    latencies.sort()
    return {"connections": connections, "size": size, "seconds": seconds, "requests": count,
            "per_s": count / seconds, "p50_us": percentile(latencies, 50), "p99_us": percentile(latencies, 99),
            "relay_cpu_s": cpu, "relay_cpu_us_per_request": cpu / count * 1e6 if count and cpu_roots else None}


def _upload(address: tuple[str, int], stop: threading.Event, moved: list[int], slot: int) -> None:
    block = memoryview(bytes(MIB))
    with socket.create_connection(address, timeout=10) as sock:
        sock.settimeout(IO_TIMEOUT)
        sock.sendall(struct.pack("!Q", 1 << 62))  # the sink's length: more than will ever be sent
        while not stop.is_set():
            sock.sendall(block)
            moved[slot] += len(block)


def _download(address: tuple[str, int], stop: threading.Event, moved: list[int], slot: int) -> None:
    buf = memoryview(bytearray(MIB))
    with socket.create_connection(address, timeout=10) as sock:
        sock.settimeout(IO_TIMEOUT)
        while not stop.is_set():
            k = sock.recv_into(buf)
            if not k:
                raise LoadError("flood stream ended early")
            moved[slot] += k


def bulk(sink: tuple[str, int], flood: tuple[str, int], uploads: int, downloads: int,
         seconds: float) -> dict[str, Any]:
    """Run the bulk streams for ``seconds``; an error in any stream fails the run."""
    stop = threading.Event()
    moved = [0] * (uploads + downloads)
    errors: list[str] = []

    def run(target: Any, address: tuple[str, int], slot: int) -> None:
        try:
            target(address, stop, moved, slot)
        except (OSError, LoadError) as exc:
            if not stop.is_set():
                errors.append(f"stream {slot}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(_upload, sink, i)) for i in range(uploads)]
    threads += [threading.Thread(target=run, args=(_download, flood, uploads + i)) for i in range(downloads)]
    for thread in threads:
        thread.start()
    print(json.dumps({"started": True}), flush=True)  # the caller starts its probe now
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(IO_TIMEOUT)
    up, down = sum(moved[:uploads]), sum(moved[uploads:])
    return {"seconds": seconds, "upload_mib_s": up / MIB / seconds, "download_mib_s": down / MIB / seconds,
            "errors": errors}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("rr", "bulk"))
    parser.add_argument("--port", type=int, help="rr: the echo service")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--interval-ms", type=float, default=0.0, help="rr: pace each connection (0: back to back)")
    parser.add_argument("--cpu-pids", default="", help="rr: comma-separated relay pids to measure CPU of")
    parser.add_argument("--sink-port", type=int)
    parser.add_argument("--flood-port", type=int)
    parser.add_argument("--uploads", type=int, default=2)
    parser.add_argument("--downloads", type=int, default=2)
    args = parser.parse_args()
    try:
        if args.mode == "rr":
            roots = [int(p) for p in args.cpu_pids.split(",") if p.strip()]
            result = request_response(("127.0.0.1", args.port), args.connections, args.size, args.warmup,
                                      args.seconds, args.interval_ms / 1000, roots)
        else:
            result = bulk(("127.0.0.1", args.sink_port), ("127.0.0.1", args.flood_port), args.uploads,
                          args.downloads, args.seconds)
    except (OSError, LoadError) as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)
    os._exit(0)  # a bulk stream stuck in a call must not hold the process open


if __name__ == "__main__":
    sys.exit(main())
