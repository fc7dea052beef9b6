#!/usr/bin/env python3
"""What a cut websocket costs a resumable tunnel: time to resume, bytes replayed, bulk time lost.

A frontend and a backend (``resume: true``, ``workers: 1``, ``ping_interval: 0``) run as real
processes, joined through a relay in this process that can cut every connection it carries, by RST
or by FIN, alternately. On 127.0.0.1:

* **interactive**: one tunnel to an echo target, a 64-byte round trip every 10 ms; the path is cut
  ``--cuts`` times, once a second. Per cut: the time from the cut to the first round trip that
  completes after it (what a user of an ssh session sees as a pause), and the round trip without cuts.
* **bulk**: ``--size`` bytes each way at once (echo), once without cuts and once with 5 cuts spread
  over the transfer; the time each took, sha256-checked, and the bytes replayed (from the daemons'
  "resumed after ..., replayed ..." lines).

    .venv/bin/python bench/cuts.py                  # part of make bench
    .venv/bin/python bench/cuts.py --cuts 5 --size 16M

Results: a table on stdout and bench/results/cuts-latest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bridge.tunnel import reset_now

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
IO_TIMEOUT = 60.0
REPLAYED = re.compile(r"resumed after ([0-9.]+) s, replayed ([0-9.]+) (B|KiB|MiB|GiB)")
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Relay:
    """Relays 127.0.0.1:port to ``upstream``; :meth:`cut` ends every live connection by RST or FIN."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.links: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.server.accept()
                up = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
            except OSError:
                return
            up.settimeout(None)
            for sock in (down, up):  # as nginx does (tcp_nodelay): small frames are not held back
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.links.append((down, up))
            for source, sink in ((down, up), (up, down)):
                threading.Thread(target=self._copy, args=(source, sink), daemon=True).start()

    @staticmethod
    def _copy(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)

    def cut(self, how: str) -> None:
        with self.lock:
            links, self.links = self.links, []
        for down, up in links:
            for sock in (down, up):
                if how == "reset":
                    reset_now(sock)  # a RST, and the copy threads blocked on it wake
                else:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)


def echo_server() -> int:
    server = socket.create_server(("127.0.0.1", 0), backlog=64)

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(1 << 18):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return int(server.getsockname()[1])


def start_pair(workdir: Path, echo: int) -> tuple[list[subprocess.Popen[bytes]], Relay, int, list[Path]]:
    backend_port, port = free_port(), free_port()
    common = {"resume": True, "ping_interval": 0, "workers": 1}
    (workdir / "backend.yaml").write_text(json.dumps({**common, "listeners": [
        {"name": "bench", "listen": f"127.0.0.1:{backend_port}", "routes": {"default": f"127.0.0.1:{echo}"}}]}))
    relay = Relay(backend_port)
    (workdir / "frontend.yaml").write_text(json.dumps({**common, "tunnels": [
        {"name": "echo", "listen": f"127.0.0.1:{port}", "backend": f"ws://127.0.0.1:{relay.port}/"}]}))
    procs, logs = [], []
    for daemon, listens in (("backend", backend_port), ("frontend", port)):
        log = workdir / f"{daemon}.log"
        with log.open("wb") as out:
            argv = [str(BIN / f"tcpbridge-{daemon}"), "--config", str(workdir / f"{daemon}.yaml")]
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT))
        logs.append(log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", listens), timeout=1):
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"tcpbridge-{daemon} did not start: {log.read_text()[-2000:]}")
    return procs, relay, port, logs


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("EOF")
        data += chunk
    return bytes(data)


def interactive(port: int, relay: Relay, cuts: int) -> dict[str, Any]:
    message = os.urandom(64)
    rtts: list[float] = []
    pauses: list[float] = []
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(100):  # warm up, and the round trip without cuts
            started = time.perf_counter()
            sock.sendall(message)
            assert recv_exactly(sock, 64) == message
            rtts.append(time.perf_counter() - started)
        for index in range(cuts):
            time.sleep(1.0)
            relay.cut("reset" if index % 2 else "close")
            cut_at = time.perf_counter()
            sock.sendall(message)
            assert recv_exactly(sock, 64) == message, "a byte was lost or repeated"
            pauses.append(time.perf_counter() - cut_at)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    return {"rtt_p50_ms": statistics.median(rtts) * 1e3, "cuts": cuts,
            "pause_p50_ms": statistics.median(pauses) * 1e3, "pause_max_ms": max(pauses) * 1e3,
            "pauses_ms": [round(p * 1e3, 1) for p in pauses]}


def bulk(port: int, relay: Relay, size: int, cuts: int) -> dict[str, Any]:
    data = os.urandom(size)
    got = hashlib.sha256()
    received = [0]
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        def read() -> None:
            while chunk := sock.recv(1 << 20):
                got.update(chunk)
                received[0] += len(chunk)

        reader = threading.Thread(target=read, daemon=True)
        started = time.perf_counter()
        reader.start()
        step = size // (cuts + 1) if cuts else size
        for offset in range(0, size, 1 << 20):
            sock.sendall(data[offset:offset + (1 << 20)])
            if cuts and offset and offset % step < (1 << 20) and offset // step <= cuts:
                relay.cut("reset" if (offset // step) % 2 else "close")
        sock.shutdown(socket.SHUT_WR)
        reader.join(IO_TIMEOUT * 4)
        elapsed = time.perf_counter() - started
    if received[0] != size or got.digest() != hashlib.sha256(data).digest():
        raise SystemExit(f"bulk with {cuts} cuts: {received[0]} of {size} bytes came back, or different ones")
    return {"seconds": elapsed, "mib_per_s_each_way": size / elapsed / (1 << 20)}


def replayed(logs: list[Path]) -> dict[str, Any]:
    waits, amounts = [], []
    for log in logs:
        for match in REPLAYED.finditer(log.read_text(errors="replace")):
            waits.append(float(match.group(1)))
            amounts.append(float(match.group(2)) * UNITS[match.group(3)])
    return {"resumes": len(amounts), "replayed_bytes_total": int(sum(amounts)),
            "replayed_bytes_max": int(max(amounts, default=0))}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text}")
    return int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuts", type=int, default=20, help="cuts of the interactive tunnel (default 20)")
    parser.add_argument("--size", type=parse_size, default=64 << 20, help="bulk bytes each way (default 64M)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where cuts-latest.json goes")
    args = parser.parse_args()
    echo = echo_server()
    with tempfile.TemporaryDirectory(prefix="tcpbridge-cuts-") as tmp:
        procs, relay, port, logs = start_pair(Path(tmp), echo)
        try:
            results = {"interactive": interactive(port, relay, args.cuts)}
            interactive_resumes = replayed(logs)
            results["bulk_uncut"] = bulk(port, relay, args.size, 0)
            results["bulk_5_cuts"] = bulk(port, relay, args.size, 5)
            all_resumes = replayed(logs)
            results["bulk_5_cuts"]["replayed"] = {
                "resumes": all_resumes["resumes"] - interactive_resumes["resumes"],
                "bytes_total": all_resumes["replayed_bytes_total"] - interactive_resumes["replayed_bytes_total"],
                "bytes_max": all_resumes["replayed_bytes_max"]}
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(20)
    inter, uncut, cut = results["interactive"], results["bulk_uncut"], results["bulk_5_cuts"]
    print(f"interactive: round trip p50 {inter['rtt_p50_ms']:.2f} ms without cuts; after each of {inter['cuts']} "
          f"cuts the next round trip took p50 {inter['pause_p50_ms']:.0f} ms, max {inter['pause_max_ms']:.0f} ms")
    print(f"bulk {args.size >> 20} MiB each way: {uncut['seconds']:.2f} s uncut ({uncut['mib_per_s_each_way']:.0f} "
          f"MiB/s), {cut['seconds']:.2f} s with 5 cuts ({cut['mib_per_s_each_way']:.0f} MiB/s); "
          f"{cut['replayed']['resumes']} re-attaches (both ends) replayed {cut['replayed']['bytes_total'] >> 10} KiB "
          f"in all, at most {cut['replayed']['bytes_max'] >> 10} KiB at once")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuts-latest.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
