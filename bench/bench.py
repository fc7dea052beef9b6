#!/usr/bin/env python3
"""tcpbridge benchmark: tcpbridge (frontend+backend) against direct TCP and a two-hop socat relay.

Sections: bulk throughput each way, 64-byte round trips, connection setup rate, request/response
under concurrency (N connections each a loop of one request and its echo, from a load generator
process: requests/s, p50/p99 and the relays' CPU per request), an interactive connection's round
trips beside bulk streams (head-of-line stalls), and thousands of held tunnels (memory, teardown).

Everything runs on 127.0.0.1, in one run, interleaved: in each round every system is measured once
per metric, in an order rotated from round to round, so a noisy machine hurts every system alike.
Medians over rounds, and ratios to socat from the same run.

    .venv/bin/python bench/bench.py                 # the full run (make bench)
    .venv/bin/python bench/bench.py --quick         # smoke test: small sizes, one round
    .venv/bin/python bench/bench.py --systems tcpbridge,socat --size 64M --rounds 5
    .venv/bin/python bench/bench.py --profile       # also py-spy the daemons during a bulk run each way
    .venv/bin/python bench/bench.py --sections rr,mixed --rounds 1   # one part only
    .venv/bin/python bench/bench.py --systems socat,tcpbridge-noresume,tcpbridge --sections bulk,rtt  # resume's cost

Processes: the targets (sink, source, echo, flood) run in their own process (bench/targets.py), the
request/response and bulk load in processes of their own (bench/loadgen.py); the daemons
are started as real processes from generated YAML (``ping_interval: 0``), logging to files; socat is
``socat TCP-LISTEN:a,fork,reuseaddr,bind=127.0.0.1,backlog=1024 TCP:127.0.0.1:b`` twice per target,
so it has the same number of hops as frontend+backend (backlog as tcpbridge's listeners, or held
connections opened in bursts would be dropped by socat's default backlog of 5).

Results: a table on stdout, bench/results/<timestamp>.json and latest.json, latest.png.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import procstat  # noqa: E402
from targets import payload  # noqa: E402

BIN = Path(sys.executable).parent
MIB = 1 << 20
GIB = 1 << 30
CHUNK = 1 << 20
IO_TIMEOUT = 30.0  # no progress for this long on any one socket call: the run fails
SEED = 20240601
SYSTEMS = ("direct", "socat", "tcpbridge")
#: tcpbridge with ``workers: N`` (or auto) and/or ``resume`` set in both daemons, beside the configured
#: default (resumable): tcpbridge-w2, tcpbridge-noresume (``resume: false``), tcpbridge-w2-resume; a size
#: after -resume sets ``resume_buffer`` in MiB (tcpbridge-resume16m).
VARIANT = re.compile(r"tcpbridge(?=-)(?:-w(\d+|auto))?(?:(-resume)(?:(\d+)m)?|(-noresume))?")
SECTIONS = ("bulk", "rtt", "setup", "rr", "mixed", "held")
RESULTS = HERE / "results"


class BenchError(Exception):
    """One measurement failed; recorded with its reason, the run goes on."""


# ---------------------------------------------------------------------------------------------
# Systems under test


@dataclass
class System:
    name: str
    ports: dict[str, int]              # sink / source / echo: where a client connects
    roots: list[int] = field(default_factory=list)  # relay processes (CPU and memory are theirs)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    idle_tasks: int = 0
    warnings: list[str] = field(default_factory=list)
    restarts: int = 0

    def address(self, service: str) -> tuple[str, int]:
        return ("127.0.0.1", self.ports[service])

    def pids(self) -> list[int]:
        return procstat.descendants(self.roots) if self.roots else []

    def tasks(self) -> int:
        """Threads of every relay process: thread-per-tunnel daemons and fork-per-connection socat alike."""
        return sum(procstat.threads(pid) for pid in self.pids())

    def cpu(self) -> float:
        """CPU seconds of the relay processes and every live process below them (tcpbridge's workers)."""
        return sum(procstat.cpu_seconds(pid) for pid in self.pids())

    def memory(self) -> dict[str, int]:
        return procstat.memory_kib(self.pids())

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until every tunnel's threads (or socat's children) are gone again."""
        if not self.roots:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.tasks() <= self.idle_tasks:
                return True
            time.sleep(0.05)
        left = self.tasks()
        if left <= self.idle_tasks:
            return True
        self.warnings.append(f"not idle {timeout:.0f} s after a test: {left} tasks, idle is {self.idle_tasks}")
        return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for whatever is left after 30 s (socat's forked children included)."""
        tree = {pid: procstat.start_time(pid) for pid in self.pids()}
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for pid, started in tree.items():  # only processes this benchmark started, or their forked children
            if started is not None and procstat.start_time(pid) == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            try:
                proc.wait(60)  # a process with thousands of threads takes a while to die
            except subprocess.TimeoutExpired:
                self.warnings.append(f"pid {proc.pid} still there 60 s after SIGKILL")


#: Every port :func:`free_port` handed out in this run.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing is bound to now, never one handed out before in this run (the kernel may offer a
    port again as soon as it is closed: two listeners of one config once got the same one)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no port that was not handed out before, in 100 tries")


def listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port (read from /proc/net/tcp, without connecting)?"""
    wanted = f"0100007F:{port:04X}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[1] == wanted and parts[3] == "0A":
                return True
    return False


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    if not predicate():
        raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_targets(size: int) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    proc = subprocess.Popen([sys.executable, str(HERE / "targets.py"), "--size", str(size), "--seed", str(SEED)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout=60):
        proc.kill()
        raise BenchError("targets process did not start in 60 s")
    line = proc.stdout.readline()
    sel.close()
    if not line:
        raise BenchError(f"targets process exited with {proc.wait(5)}")
    return proc, json.loads(line)


def start_direct(targets: dict[str, int]) -> System:
    return System("direct", dict(targets))


def start_socat(targets: dict[str, int], workdir: Path) -> System:
    workdir.mkdir(parents=True, exist_ok=True)
    socat = shutil.which("socat")
    if not socat:
        raise BenchError("socat is not installed (apt-get install socat)")
    system = System("socat", {})
    for service, target in targets.items():
        middle, front = free_port(), free_port()
        for listen, to in ((middle, target), (front, middle)):
            log = workdir / f"socat-{service}-{listen}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [socat, f"TCP-LISTEN:{listen},fork,reuseaddr,bind=127.0.0.1,backlog=1024", f"TCP:127.0.0.1:{to}"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            system.procs.append(proc)
            system.roots.append(proc.pid)
            system.logs.append(log)
        system.ports[service] = front
    for proc, log in zip(system.procs, system.logs, strict=True):
        port = int(log.stem.rsplit("-", 1)[1])
        wait_for(lambda port=port, proc=proc: listening(port) or proc.poll() is not None,  # type: ignore[misc]
                 10, f"socat on {port}")
        if proc.poll() is not None:
            raise BenchError(f"socat exited with {proc.returncode}: {log.read_text()[-500:]}")
    return system


def _write_yaml(path: Path, data: dict[str, Any]) -> Path:
    import yaml
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _start_daemon(command: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen([str(BIN / command), "--config", str(config)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    def ready() -> bool:
        return proc.poll() is not None or " ready: " in log.read_text(errors="replace")
    wait_for(ready, 20, f"{command} to log ' ready: '")
    if proc.poll() is not None:
        raise BenchError(f"{command} exited with {proc.returncode}: {log.read_text(errors='replace')[-1500:]}")
    return proc


def start_tcpbridge(targets: dict[str, int], workdir: Path, log_level: str, name: str = "tcpbridge") -> System:
    """A frontend+backend pair; ``name`` tcpbridge-wN runs both with ``workers: N``, tcpbridge-resume (or
    tcpbridge-wN-resume) with ``resume: true`` (tcpbridge-resume16m: and ``resume_buffer: 16 MiB``),
    tcpbridge-noresume (or tcpbridge-wN-noresume) with ``resume: false``."""
    variant = VARIANT.fullmatch(name)
    workers: dict[str, Any] = {}
    if variant and variant.group(1):
        workers["workers"] = variant.group(1) if variant.group(1) == "auto" else int(variant.group(1))
    if variant and variant.group(2):
        workers["resume"] = True
    if variant and variant.group(3):
        workers["resume_buffer"] = int(variant.group(3)) * MIB
    if variant and variant.group(4):
        workers["resume"] = False
    workdir.mkdir(parents=True, exist_ok=True)
    backend_port = free_port()
    ports = {service: free_port() for service in targets}
    backend_cfg = _write_yaml(workdir / "backend.yaml", {
        **workers,
        "log_level": log_level,
        "ping_interval": 0,
        "listeners": [{"name": "bench", "listen": f"127.0.0.1:{backend_port}",
                       "routes": {service: f"127.0.0.1:{port}" for service, port in targets.items()}}],
    })
    frontend_cfg = _write_yaml(workdir / "frontend.yaml", {
        **workers,
        "backend": f"ws://127.0.0.1:{backend_port}/",
        "log_level": log_level,
        "ping_interval": 0,
        "tunnels": [{"name": service, "listen": f"127.0.0.1:{port}", "route": service}
                    for service, port in ports.items()],
    })
    system = System(name, ports)
    back = _start_daemon("tcpbridge-backend", backend_cfg, workdir / "backend.log")
    system.procs.append(back)
    try:
        front = _start_daemon("tcpbridge-frontend", frontend_cfg, workdir / "frontend.log")
    except BaseException:
        system.stop()
        raise
    system.procs.append(front)
    system.roots = [front.pid, back.pid]
    system.logs = [workdir / "frontend.log", workdir / "backend.log"]
    return system


# ---------------------------------------------------------------------------------------------
# Measurements


def connect(system: System, service: str) -> socket.socket:
    sock = socket.create_connection(system.address(service), timeout=10)
    sock.settimeout(IO_TIMEOUT)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise BenchError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def _harness_cpu(targets_pid: int) -> float:
    return time.process_time() + procstat.cpu_seconds(targets_pid)


def bulk_upload(system: System, data: bytes, digest: bytes, targets_pid: int, deadline_s: float) -> dict[str, Any]:
    n = len(data)
    view = memoryview(data)
    cpu0, harness0 = system.cpu(), _harness_cpu(targets_pid)
    with connect(system, "sink") as sock:
        start = time.perf_counter()
        deadline = start + deadline_s
        sock.sendall(struct.pack("!Q", n))
        for offset in range(0, n, CHUNK):
            sock.sendall(view[offset:offset + CHUNK])
            if time.perf_counter() > deadline:
                raise BenchError(f"upload slower than the {deadline_s:.0f} s limit")
        reply = recv_exactly(sock, 40)
        seconds = time.perf_counter() - start
    system.wait_idle()
    cpu = system.cpu() - cpu0
    harness = _harness_cpu(targets_pid) - harness0
    got = struct.unpack("!Q", reply[32:])[0]
    if got != n or reply[:32] != digest:
        raise BenchError(f"upload corrupted: sink got {got} of {n} bytes, sha256 {reply[:32].hex()[:16]}…")
    return {"bytes": n, "seconds": seconds, "mib_s": n / MIB / seconds, "sha256_ok": True,
            "cpu_s": cpu, "cpu_s_per_gib": cpu / (n / GIB) if system.roots else None,
            "harness_cpu_s_per_gib": harness / (n / GIB)}


def bulk_download(system: System, n: int, digest: bytes, buf: bytearray, targets_pid: int,
                  deadline_s: float) -> dict[str, Any]:
    view = memoryview(buf)
    cpu0, harness0 = system.cpu(), _harness_cpu(targets_pid)
    got = 0
    with connect(system, "source") as sock:
        start = time.perf_counter()
        deadline = start + deadline_s
        sock.sendall(struct.pack("!Q", n))
        while got < n:
            k = sock.recv_into(view[got:], min(4 * MIB, n - got))
            if not k:
                break
            got += k
            if time.perf_counter() > deadline:
                raise BenchError(f"download slower than the {deadline_s:.0f} s limit")
        seconds = time.perf_counter() - start
    system.wait_idle()
    cpu = system.cpu() - cpu0
    harness = _harness_cpu(targets_pid) - harness0
    if got != n or hashlib.sha256(view[:n]).digest() != digest:
        raise BenchError(f"download corrupted: got {got} of {n} bytes" + (", sha256 mismatch" if got == n else ""))
    return {"bytes": n, "seconds": seconds, "mib_s": n / MIB / seconds, "sha256_ok": True,
            "cpu_s": cpu, "cpu_s_per_gib": cpu / (n / GIB) if system.roots else None,
            "harness_cpu_s_per_gib": harness / (n / GIB)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def rtt(system: System, count: int) -> dict[str, Any]:
    message = bytes(range(64))
    samples: list[float] = []
    with connect(system, "echo") as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(count + 100):  # the first 100 warm the path up
            start = time.perf_counter_ns()
            sock.sendall(message)
            reply = recv_exactly(sock, 64)
            elapsed = time.perf_counter_ns() - start
            if reply != message:
                raise BenchError(f"round trip {i}: echo differs")
            if i >= 100:
                samples.append(elapsed / 1000)
    system.wait_idle()
    return {"count": count, "p50_us": percentile(samples, 50), "p99_us": percentile(samples, 99),
            "mean_us": statistics.fmean(samples)}


def setup(system: System, count: int) -> dict[str, Any]:
    samples: list[float] = []
    start_all = time.perf_counter()
    for i in range(count):
        start = time.perf_counter_ns()
        with socket.create_connection(system.address("echo"), timeout=10) as sock:
            sock.settimeout(IO_TIMEOUT)
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise BenchError(f"connection {i}: 1-byte echo failed")
        samples.append((time.perf_counter_ns() - start) / 1e6)
    total = time.perf_counter() - start_all
    system.wait_idle()
    return {"count": count, "per_s": count / total, "p50_ms": percentile(samples, 50),
            "p99_ms": percentile(samples, 99)}


def _echo_check(socks: list[socket.socket], first: int, tag: bytes, deadline: float) -> None:
    """Send each socket a message naming it, and read it all back, concurrently."""
    expected: dict[socket.socket, bytes] = {}
    received: dict[socket.socket, bytearray] = {}
    sel = selectors.DefaultSelector()
    try:
        for i, sock in enumerate(socks):
            message = tag + b"%07d:tcpbridge-bench" % (first + i)
            sock.sendall(message)
            expected[sock] = message
            received[sock] = bytearray()
            sel.register(sock, selectors.EVENT_READ, first + i)
        pending = len(socks)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{pending} of {len(socks)} echoes not back in time")
            for key, _ in sel.select(timeout=min(1.0, remaining)):
                sock = key.fileobj  # type: ignore[assignment]
                assert isinstance(sock, socket.socket)
                want = expected[sock]
                data = sock.recv(len(want) - len(received[sock]))
                if not data:
                    raise BenchError(f"tunnel {key.data}: EOF before its echo was complete")
                received[sock] += data
                if len(received[sock]) == len(want):
                    if bytes(received[sock]) != want:
                        raise BenchError(f"tunnel {key.data}: echo differs")
                    sel.unregister(sock)
                    pending -= 1
    finally:
        sel.close()


def concurrency(system: System, n: int, measure_memory: bool) -> dict[str, Any]:
    """Open ``n`` tunnels to the echo target and hold them all; verify each with an echo, twice."""
    result: dict[str, Any] = {"tunnels": n, "held": 0, "verified": False}
    if measure_memory and system.roots:
        idle = system.memory()
        result["idle_rss_kib"], result["idle_pss_kib"] = idle["rss_kib"], idle["pss_kib"]
    socks: list[socket.socket] = []
    start = time.perf_counter()
    deadline = time.monotonic() + 30 + n * 0.02
    batch = 100
    try:
        for first in range(0, n, batch):
            opened = []
            for _ in range(min(batch, n - first)):
                sock = socket.create_connection(system.address("echo"), timeout=10)
                opened.append(sock)
                socks.append(sock)
            _echo_check(opened, first, b"O", deadline)
            if time.monotonic() > deadline:
                raise BenchError(f"only {len(socks)} of {n} tunnels open in time")
        result["open_s"] = time.perf_counter() - start
        # Every tunnel is open at once: check them all again while they are held.
        for first in range(0, n, 500):
            _echo_check(socks[first:first + 500], first, b"H", deadline)
        result["held"] = n
        result["verified"] = True
        result["tasks_held"] = system.tasks()
        if measure_memory and system.roots:
            held = system.memory()
            result["held_rss_kib"], result["held_pss_kib"] = held["rss_kib"], held["pss_kib"]
            result["rss_kib_per_tunnel"] = (held["rss_kib"] - result["idle_rss_kib"]) / n
            result["pss_kib_per_tunnel"] = (held["pss_kib"] - result["idle_pss_kib"]) / n
    except (OSError, BenchError) as exc:
        result["held"] = len(socks)
        result["error"] = f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc)
    finally:
        closing = time.perf_counter()
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
        # How long until every tunnel is reclaimed; bounded, the caller restarts a relay that is not idle.
        if system.roots:
            result["idle_again"] = system.wait_idle(teardown_timeout(n))
            result["teardown_s"] = time.perf_counter() - closing if result["idle_again"] else None
    return result


def _loadgen(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(HERE / "loadgen.py"), *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _loadgen_result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise BenchError(f"load generator still running {timeout:.0f} s after it should have ended") from None
    lines = out.strip().splitlines()
    if not lines:
        raise BenchError(f"load generator exited with {proc.returncode}: {err.strip()[-500:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    if "error" in result:
        raise BenchError(result["error"])
    return result


def request_response(system: System, connections: int, size: int, seconds: float) -> dict[str, Any]:
    """``connections`` echo loops of ``size``-byte requests for ``seconds``, from their own process."""
    pids = ",".join(str(pid) for pid in system.roots)
    proc = _loadgen(["rr", "--port", str(system.ports["echo"]), "--connections", str(connections),
                     "--size", str(size), "--seconds", str(seconds), "--cpu-pids", pids])
    result = _loadgen_result(proc, seconds + 60 + connections * 0.05)
    system.wait_idle()
    if not result["requests"]:
        raise BenchError("no request completed")
    return result


MIXED_STREAMS = 4  # half uploads, half downloads
INTERACTIVE_INTERVAL_MS = 2.0  # the interactive connection: one 64-byte request every 2 ms, as keystrokes


def mixed(system: System, seconds: float, streams: int) -> dict[str, Any]:
    """One interactive connection's round trips alone, then while ``streams`` bulk streams share the relay."""
    probe = ["rr", "--port", str(system.ports["echo"]), "--connections", "1", "--size", "64",
             "--seconds", str(seconds), "--interval-ms", str(INTERACTIVE_INTERVAL_MS)]
    alone = _loadgen_result(_loadgen(probe), seconds + 60)
    uploads = streams // 2
    bulk = _loadgen(["bulk", "--sink-port", str(system.ports["sink"]), "--flood-port", str(system.ports["flood"]),
                     "--uploads", str(uploads), "--downloads", str(streams - uploads),
                     "--seconds", str(seconds + 1.0)])
    try:
        assert bulk.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(bulk.stdout, selectors.EVENT_READ)
        started = sel.select(timeout=30)
        sel.close()
        if not started or "started" not in bulk.stdout.readline():
            raise BenchError("bulk streams did not start in 30 s")
        loaded = _loadgen_result(_loadgen(probe), seconds + 60)
        streamed = _loadgen_result(bulk, seconds + 60)
    finally:
        if bulk.poll() is None:
            bulk.kill()
            bulk.wait(10)
    system.wait_idle()
    if streamed["errors"]:
        raise BenchError(f"bulk streams failed: {streamed['errors'][0]}")
    return {"seconds": seconds, "streams": streams, "alone_p50_us": alone["p50_us"], "alone_p99_us": alone["p99_us"],
            "loaded_p50_us": loaded["p50_us"], "loaded_p99_us": loaded["p99_us"],
            "loaded_requests": loaded["requests"],
            "bulk_mib_s": streamed["upload_mib_s"] + streamed["download_mib_s"]}


def teardown_timeout(n: int) -> float:
    return 30.0 + 0.012 * n


def preflight(system: System, n: int) -> str | None:
    """Why the machine cannot hold ``n`` tunnels through ``system``, or None if it can."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if n + 200 > nofile:
        return f"needs {n + 200} open files in the benchmark process, RLIMIT_NOFILE is {nofile}"
    if system.name == "direct":
        return None
    if system.name.startswith("tcpbridge"):
        new_tasks, per_process = 4 * n, 2 * n  # two threads per tunnel in each daemon
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if 2 * n + 100 > hard:
            return f"each daemon needs {2 * n + 100} open files, the hard RLIMIT_NOFILE is {hard}"
        max_maps = procstat.read_int("/proc/sys/vm/max_map_count")
        if max_maps is not None and 2 * per_process + 2000 > max_maps:
            return (f"each daemon needs ~{2 * per_process + 2000} memory maps (2 per thread), "
                    f"vm.max_map_count is {max_maps}")
    else:
        new_tasks = 2 * n  # a forked socat per hop per connection
    now = procstat.tasks_now()
    limits = {"kernel.pid_max": procstat.read_int("/proc/sys/kernel/pid_max"),
              "kernel.threads-max": procstat.read_int("/proc/sys/kernel/threads-max")}
    cg_max, cg_current, where = procstat.cgroup_pids_limit()
    if cg_max is not None:
        limits[f"cgroup pids.max ({where}, TasksMax)"] = cg_max
    for name, limit in limits.items():
        used = cg_current if name.startswith("cgroup") and cg_current is not None else now
        if limit is not None and used + new_tasks + 500 > limit:
            why = ("2 threads per tunnel per daemon" if system.name.startswith("tcpbridge")
                   else "2 socat processes per connection")
            return f"needs {new_tasks} more tasks ({why}), {used} in use, {name} is {limit}"
    if os.geteuid() != 0:
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[0]
        if nproc != resource.RLIM_INFINITY and now + new_tasks > nproc:
            return f"needs {new_tasks} more tasks, RLIMIT_NPROC is {nproc}"
    return None


# ---------------------------------------------------------------------------------------------
# Profiling (optional)


def profile(system: System, data: bytes, digest: bytes, buf: bytearray, targets_pid: int,
            outdir: Path, stamp: str) -> dict[str, Any]:
    """py-spy the two daemons during one upload and one download; the hottest functions by own time."""
    pyspy = shutil.which("py-spy") or (str(BIN / "py-spy") if (BIN / "py-spy").exists() else None)
    if not pyspy:
        return {"error": "py-spy not installed (pip install py-spy)"}
    names = dict(zip(system.roots, ("frontend", "backend"), strict=True))
    report: dict[str, Any] = {}
    for direction in ("upload", "download"):
        spies = {}
        for pid, name in names.items():
            out = outdir / f"{stamp}-profile-{direction}-{name}.txt"
            spies[name] = (out, subprocess.Popen(
                [pyspy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
                 "--output", str(out), "--duration", "300"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        time.sleep(1.0)
        try:
            if direction == "upload":
                bulk_upload(system, data, digest, targets_pid, 300)
            else:
                bulk_download(system, len(data), digest, buf, targets_pid, 300)
        finally:
            for _, spy in spies.values():
                if spy.poll() is None:
                    spy.send_signal(signal.SIGINT)
            for _, spy in spies.values():
                try:
                    spy.wait(60)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait(5)
        for name, (out, spy) in spies.items():
            key = f"{direction}/{name}"
            if not out.exists():
                err = spy.stderr.read().decode(errors="replace")[-300:] if spy.stderr else ""
                report[key] = {"error": f"py-spy wrote nothing: {err.strip()}"}
                continue
            report[key] = {"file": str(out), **_hottest(out)}
    return report


#: Leaf frames that are a thread waiting, not working (py-spy's idle detection misses some).
WAITING = ("Condition.wait", "Event.wait", ".select (selectors", "socket.accept", "Service._next_signal",
           "time.sleep", "Thread.join")


def _hottest(path: Path, top: int = 10) -> dict[str, Any]:
    """Own-time and inclusive-time leaders from py-spy's collapsed stacks ("a;b;c count"), waits left out."""
    own: dict[str, int] = {}
    own_lines: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = waiting = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames or any(w in frames[-1] for w in WAITING):
            waiting += count
            continue
        own_lines[frames[-1]] = own_lines.get(frames[-1], 0) + count
        frames = [re.sub(r":\d+\)$", ")", f) for f in frames]  # per function, not per line
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count

    active = max(1, total - waiting)

    def leaders(table: dict[str, int]) -> list[list[Any]]:
        ranked = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [[frame, round(100 * count / active, 1)] for frame, count in ranked]

    return {"samples": total, "active_samples": total - waiting, "own": leaders(own), "own_lines": leaders(own_lines),
            "inclusive": leaders(inclusive)}


# ---------------------------------------------------------------------------------------------
# Summary, table, chart


def median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(samples: dict[str, dict[str, list[dict[str, Any]]]], counts: list[int],
              rr_keys: list[str]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for system, runs in samples.items():
        def ok(metric: str, runs: dict[str, list[dict[str, Any]]] = runs) -> list[dict[str, Any]]:
            return [r for r in runs.get(metric, []) if "error" not in r]
        s: dict[str, Any] = {}
        for direction in ("upload", "download"):
            good = ok(direction)
            s[f"{direction}_mib_s"] = median([r["mib_s"] for r in good])
            s[f"{direction}_cpu_s_per_gib"] = median([r["cpu_s_per_gib"] for r in good])
            s[f"{direction}_harness_cpu_s_per_gib"] = median([r["harness_cpu_s_per_gib"] for r in good])
            s[f"{direction}_errors"] = len(runs.get(direction, [])) - len(good)
        good = ok("rtt")
        s["rtt_p50_us"] = median([r["p50_us"] for r in good])
        s["rtt_p99_us"] = median([r["p99_us"] for r in good])
        good = ok("setup")
        s["setup_per_s"] = median([r["per_s"] for r in good])
        s["setup_p50_ms"] = median([r["p50_ms"] for r in good])
        s["setup_p99_ms"] = median([r["p99_ms"] for r in good])
        for key in rr_keys:
            good = ok(key)
            s[f"{key}_per_s"] = median([r["per_s"] for r in good])
            s[f"{key}_p50_us"] = median([r["p50_us"] for r in good])
            s[f"{key}_p99_us"] = median([r["p99_us"] for r in good])
            s[f"{key}_cpu_us"] = median([r["relay_cpu_us_per_request"] for r in good])
            s[f"{key}_errors"] = len(runs.get(key, [])) - len(good)
        good = ok("mixed")
        for field_ in ("alone_p50_us", "alone_p99_us", "loaded_p50_us", "loaded_p99_us", "bulk_mib_s"):
            s[f"mixed_{field_}"] = median([r[field_] for r in good])
        for i, n in enumerate(counts):
            runs_n = runs.get(f"conc{n}", [])
            skipped = [r for r in runs_n if r.get("skipped")]
            measured = [r for r in runs_n if not r.get("skipped")]
            s[f"conc{n}_held_min"] = min((r["held"] for r in measured), default=None)
            s[f"conc{n}_all_verified"] = bool(measured) and all(r.get("verified") for r in measured)
            s[f"conc{n}_open_s"] = median([r.get("open_s") for r in measured])
            # Not idle within the bound counts as the bound (shown as ">"), so the median stays honest.
            s[f"conc{n}_teardown_s"] = median([r["teardown_s"] if r.get("teardown_s") is not None
                                               else teardown_timeout(n) for r in measured if "idle_again" in r])
            s[f"conc{n}_teardown_timeouts"] = sum(1 for r in measured if r.get("idle_again") is False)
            s[f"conc{n}_skipped"] = skipped[0]["skipped"] if skipped else None
            s[f"conc{n}_errors"] = sorted({r["error"] for r in measured if "error" in r})
            if i == 0:
                s["mem_rss_kib_per_tunnel"] = median([r.get("rss_kib_per_tunnel") for r in measured])
                s["mem_pss_kib_per_tunnel"] = median([r.get("pss_kib_per_tunnel") for r in measured])
                s["mem_idle_rss_kib"] = median([r.get("idle_rss_kib") for r in measured])
        summary[system] = s
    return summary


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def verdicts(summary: dict[str, dict[str, Any]], counts: list[int], rr_keys: list[str]) -> list[dict[str, Any]]:
    tb, so = summary.get("tcpbridge"), summary.get("socat")
    out: list[dict[str, Any]] = []
    if tb is None:
        return out

    def add(name: str, value: float | None, passed: bool | None, shown: str) -> None:
        out.append({"target": name, "value": value, "pass": passed, "shown": shown})

    def vs_socat(key: str, name: str, check: Callable[[float], bool]) -> None:
        r = ratio(tb.get(key), so.get(key)) if so else None
        add(name, r, None if r is None else check(r), "n/a (needs socat)" if r is None else f"{r:.2f}x")

    vs_socat("upload_mib_s", "bulk upload >= 0.30x socat", lambda r: r >= 0.30)
    vs_socat("download_mib_s", "bulk download >= 0.30x socat", lambda r: r >= 0.30)
    vs_socat("rtt_p50_us", "RTT p50 <= 1.2x socat", lambda r: r <= 1.2)
    vs_socat("setup_per_s", "setup rate >= 1.2x socat", lambda r: r >= 1.2)
    for n in (20, 50):
        if f"rr64x{n}" in rr_keys:
            vs_socat(f"rr64x{n}_per_s", f"64 B request/response, {n} connections >= 1.0x socat", lambda r: r >= 1.0)
    if "rr64x1" in rr_keys and "rr64x50" in rr_keys:
        growth = ratio(tb.get("rr64x50_cpu_us"), tb.get("rr64x1_cpu_us"))
        add("CPU per request at 50 connections <= 1.3x at 1", growth, None if growth is None else growth <= 1.3,
            "n/a" if growth is None else f"{growth:.2f}x ({tb['rr64x1_cpu_us']:.0f} -> {tb['rr64x50_cpu_us']:.0f} us)")
    rss, pss = tb.get("mem_rss_kib_per_tunnel"), tb.get("mem_pss_kib_per_tunnel")
    worst = max(v for v in (rss, pss) if v is not None) if (rss is not None or pss is not None) else None
    add(f"memory <= 100 KiB/tunnel at {counts[0]} (RSS and PSS)", worst,
        None if worst is None else worst <= 100, "n/a" if worst is None else f"{worst:.1f} KiB")
    n = counts[-1]
    skipped = tb.get(f"conc{n}_skipped")
    held = tb.get(f"conc{n}_held_min")
    if skipped:
        add(f"{n} tunnels held, every byte verified", None, None, f"machine cannot: {skipped}")
    else:
        add(f"{n} tunnels held, every byte verified", held,
            None if held is None else bool(tb.get(f"conc{n}_all_verified")),
            "n/a" if held is None else f"{held} held (worst round)")
    teardown = tb.get(f"conc{n}_teardown_s")
    if not skipped:
        add(f"{n} tunnels: all closed -> idle <= 10 s", teardown, None if teardown is None else
            teardown <= 10 and not tb.get(f"conc{n}_teardown_timeouts"),
            "n/a" if teardown is None else f"{teardown:.1f} s")
    cpus = [tb.get("upload_cpu_s_per_gib"), tb.get("download_cpu_s_per_gib")]
    worst_cpu = max((c for c in cpus if c is not None), default=None)
    add("CPU <= 12 s/GiB (both daemons, each way)", worst_cpu,
        None if worst_cpu is None else worst_cpu <= 12,
        "n/a" if worst_cpu is None else f"{cpus[0]:.1f} up / {cpus[1]:.1f} down s/GiB")
    return out


ROWS: list[tuple[str, str, str, str]] = [
    # label, key, format, better
    ("bulk upload (MiB/s)", "upload_mib_s", "{:.1f}", "higher"),
    ("bulk download (MiB/s)", "download_mib_s", "{:.1f}", "higher"),
    ("RTT 64 B p50 (us)", "rtt_p50_us", "{:.0f}", "lower"),
    ("RTT 64 B p99 (us)", "rtt_p99_us", "{:.0f}", "lower"),
    ("setup rate (conn/s)", "setup_per_s", "{:.0f}", "higher"),
    ("setup p50 (ms)", "setup_p50_ms", "{:.2f}", "lower"),
    ("setup p99 (ms)", "setup_p99_ms", "{:.2f}", "lower"),
    ("CPU upload (s/GiB, relays)", "upload_cpu_s_per_gib", "{:.2f}", "lower"),
    ("CPU download (s/GiB, relays)", "download_cpu_s_per_gib", "{:.2f}", "lower"),
    ("harness CPU upload (s/GiB)", "upload_harness_cpu_s_per_gib", "{:.2f}", "lower"),
    ("harness CPU download (s/GiB)", "download_harness_cpu_s_per_gib", "{:.2f}", "lower"),
]


def rr_label(key: str) -> str:
    size, _, n = key[2:].partition("x")
    shown = f"{int(size) // 1024} KiB" if int(size) >= 1024 else f"{size} B"
    return f"req/resp {shown} x{n}"


def table(summary: dict[str, dict[str, Any]], systems: list[str], counts: list[int], rr_keys: list[str],
          checks: list[dict[str, Any]]) -> str:
    rows = list(ROWS)
    rows.insert(7, (f"memory RSS/tunnel @{counts[0]} (KiB)", "mem_rss_kib_per_tunnel", "{:.1f}", "lower"))
    rows.insert(8, (f"memory PSS/tunnel @{counts[0]} (KiB)", "mem_pss_kib_per_tunnel", "{:.1f}", "lower"))
    for key in rr_keys:
        rows.append((f"{rr_label(key)} (req/s)", f"{key}_per_s", "{:.0f}", "higher"))
        rows.append((f"{rr_label(key)} p50 (us)", f"{key}_p50_us", "{:.0f}", "lower"))
        rows.append((f"{rr_label(key)} p99 (us)", f"{key}_p99_us", "{:.0f}", "lower"))
        rows.append((f"{rr_label(key)} relay CPU (us/req)", f"{key}_cpu_us", "{:.1f}", "lower"))
    rows.append(("interactive p99 alone (us)", "mixed_alone_p99_us", "{:.0f}", "lower"))
    rows.append((f"interactive p99 + {MIXED_STREAMS} bulk (us)", "mixed_loaded_p99_us", "{:.0f}", "lower"))
    rows.append((f"{MIXED_STREAMS} bulk streams beside it (MiB/s)", "mixed_bulk_mib_s", "{:.0f}", "higher"))
    for n in counts:
        rows.append((f"{n} tunnels: open all (s)", f"conc{n}_open_s", "{:.1f}", "lower"))
        rows.append((f"{n} tunnels: close -> idle (s)", f"conc{n}_teardown_s", "{:.1f}", "lower"))
    bridges = [s for s in systems if s.startswith("tcpbridge")]
    header = ["metric (median of rounds)", *systems, *(f"{s}/socat" for s in bridges)]
    lines = [header]
    for label, key, fmt, _ in rows:
        if all(summary.get(system, {}).get(key) is None for system in systems):
            continue  # a section not run (--sections) or failed everywhere (its errors are in the log)
        cells = [label]
        for system in systems:
            value = summary.get(system, {}).get(key)
            cell = "-" if value is None else fmt.format(value)
            if key.endswith("_teardown_s") and summary.get(system, {}).get(key[:-2] + "_timeouts"):
                cell = ">" + cell  # some round hit the bound
            cells.append(cell)
        for bridge in bridges:
            r = ratio(summary.get(bridge, {}).get(key), summary.get("socat", {}).get(key))
            cells.append("-" if r is None else f"{r:.2f}x")
        lines.append(cells)
    for n in counts:
        cells = [f"{n} tunnels held+verified"]
        for system in systems:
            s = summary.get(system, {})
            if s.get(f"conc{n}_skipped"):
                cells.append("cannot")
            elif s.get(f"conc{n}_held_min") is None:
                cells.append("-")
            else:
                cells.append(f"{s[f'conc{n}_held_min']}" + ("" if s.get(f"conc{n}_all_verified") else " FAIL"))
        cells += [""] * len(bridges)
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = []
    for j, row in enumerate(lines):
        text.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
        if j == 0:
            text.append("  ".join("-" * w for w in widths))
    if checks:
        text.append("")
        text.append("targets (tcpbridge, ratios to socat in this run):")
        width = max(len(c["target"]) for c in checks)
        for c in checks:
            mark = {True: "PASS", False: "FAIL", None: "n/a "}[c["pass"]]
            text.append(f"  {mark}  {c['target'].ljust(width)}  {c['shown']}")
    return "\n".join(text)


def chart(summary: dict[str, dict[str, Any]], systems: list[str], counts: list[int], rr_keys: list[str],
          title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"direct": "#888888", "socat": "#4c72b0", "tcpbridge": "#dd8452"}
    panels = [
        ("bulk throughput (MiB/s, higher is better)", [("upload", "upload_mib_s"), ("download", "download_mib_s")]),
        ("64 B round trip (us, lower is better)", [("p50", "rtt_p50_us"), ("p99", "rtt_p99_us")]),
        ("connection setup (conn/s, higher is better)", [("rate", "setup_per_s")]),
        (f"memory per held tunnel @{counts[0]} (KiB)",
         [("RSS", "mem_rss_kib_per_tunnel"), ("PSS", "mem_pss_kib_per_tunnel")]),
        ("relay CPU (s per GiB, lower is better)",
         [("upload", "upload_cpu_s_per_gib"), ("download", "download_cpu_s_per_gib")]),
        ("tunnels held, all verified (worst round)", [(str(n), f"conc{n}_held_min") for n in counts]),
        ("request/response (req/s, higher is better)", [(rr_label(k)[9:], f"{k}_per_s") for k in rr_keys]),
        ("relay CPU per request (us, lower is better)", [(rr_label(k)[9:], f"{k}_cpu_us") for k in rr_keys]),
        (f"interactive p99 (us): alone, + {MIXED_STREAMS} bulk streams",
         [("alone", "mixed_alone_p99_us"), ("loaded", "mixed_loaded_p99_us")]),
    ]
    fig, axes = plt.subplots(3, 3, figsize=(15, 12.5))
    for ax, (label, series) in zip(axes.flat, panels, strict=True):
        width = 0.8 / max(1, len(systems))
        for j, system in enumerate(systems):
            xs, ys = [], []
            for i, (_, key) in enumerate(series):
                value = summary.get(system, {}).get(key)
                xs.append(i + (j - (len(systems) - 1) / 2) * width)
                ys.append(value if value is not None else 0)
            bars = ax.bar(xs, ys, width, label=system, color=colours.get(system))
            if system == "tcpbridge" and "socat" in summary:
                for bar, (_, key) in zip(bars, series, strict=True):
                    r = ratio(summary["tcpbridge"].get(key), summary["socat"].get(key))
                    if r is not None and not key.startswith("conc"):
                        ax.annotate(f"{r:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                    ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(series)), [name for name, _ in series])
        if label.startswith(("bulk", "connection", "memory")):
            ax.set_yscale("log")  # direct TCP / socat's RSS would flatten the other bars
            label += " [log]"
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def describe(metric: str, r: dict[str, Any]) -> str:
    """One progress line's worth of a measurement."""
    if metric in ("upload", "download"):
        cpu = r["cpu_s_per_gib"]
        return f"{r['mib_s']:8.1f} MiB/s" + (f"  cpu {cpu:.2f} s/GiB" if cpu is not None else "")
    if metric == "rtt":
        return f"p50 {r['p50_us']:.0f} us  p99 {r['p99_us']:.0f} us"
    if metric == "setup":
        return f"{r['per_s']:.0f} conn/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms"
    if metric.startswith("rr"):
        cpu = r["relay_cpu_us_per_request"]
        return (f"{r['per_s']:.0f} req/s  p50 {r['p50_us']:.0f} us  p99 {r['p99_us']:.0f} us"
                + (f"  relay cpu {cpu:.1f} us/req" if cpu is not None else ""))
    if metric == "mixed":
        return (f"interactive p99 {r['alone_p99_us']:.0f} us alone, {r['loaded_p99_us']:.0f} us beside "
                f"{r['streams']} bulk streams ({r['bulk_mib_s']:.0f} MiB/s)")
    if r.get("skipped"):
        return f"SKIPPED: {r['skipped']}"
    text = f"{r['held']}/{r['tunnels']} held" + (" verified" if r["verified"] else f" FAILED: {r.get('error')}")
    if "open_s" in r:
        text += f"  open {r['open_s']:.1f} s"
    if r.get("teardown_s") is not None:
        text += f"  idle again {r['teardown_s']:.1f} s after close"
    elif r.get("idle_again") is False:
        text += f"  NOT idle {teardown_timeout(r['tunnels']):.0f} s after close"
    if "rss_kib_per_tunnel" in r:
        text += f"  {r['rss_kib_per_tunnel']:.1f} KiB RSS, {r['pss_kib_per_tunnel']:.1f} KiB PSS per tunnel"
    return text


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": MIB, "G": GIB}.get(text[-1:])
    return int(float(text[:-1]) * scale) if scale else int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small sizes, one round")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {','.join(SYSTEMS)}, plus tcpbridge-wN or tcpbridge-wauto "
                        "(tcpbridge with workers: N), tcpbridge-noresume or tcpbridge-wN-noresume (resume: false), "
                        "tcpbridge-resume16m (resume_buffer 16 MiB)")
    parser.add_argument("--size", help="bulk transfer size each way (default 256M; --quick 8M)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
    parser.add_argument("--rtt-count", type=int, help="64-byte round trips per run (default 3000; --quick 300)")
    parser.add_argument("--setup-count", type=int, help="connections per setup run (default 1000; --quick 100)")
    parser.add_argument("--concurrency", help="held-tunnel counts; memory is measured at the first "
                        "(default 1000,5000; --quick 100,300)")
    parser.add_argument("--rr-counts", help="concurrent request/response connections "
                        "(default 1,20,50,200; --quick 1,20)")
    parser.add_argument("--rr-sizes", help="request sizes in bytes (default 64,4096; --quick 64)")
    parser.add_argument("--rr-seconds", type=float, help="measured seconds per request/response run and "
                        "per mixed run (default 4; --quick 1)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default all)")
    parser.add_argument("--log-level", default="info", help="daemons' log_level (default info, as deployed)")
    parser.add_argument("--profile", action="store_true", help="also py-spy the daemons during one bulk run each way")
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    args = parser.parse_args()

    quick = args.quick
    size = parse_size(args.size) if args.size else (8 * MIB if quick else 256 * MIB)
    rounds = args.rounds or (1 if quick else 3)
    rtt_count = args.rtt_count or (300 if quick else 3000)
    setup_count = args.setup_count or (100 if quick else 1000)
    counts = [int(c) for c in (args.concurrency or ("100,300" if quick else "1000,5000")).split(",") if c.strip()]
    rr_counts = [int(c) for c in (args.rr_counts or ("1,20" if quick else "1,20,50,200")).split(",") if c.strip()]
    rr_sizes = [int(c) for c in (args.rr_sizes or ("64" if quick else "64,4096")).split(",") if c.strip()]
    rr_seconds = args.rr_seconds or (1.0 if quick else 4.0)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if sections - set(SECTIONS):
        parser.error(f"unknown sections: {sorted(sections - set(SECTIONS))}")
    unknown = {s for s in systems if s not in SYSTEMS and not VARIANT.fullmatch(s)}
    if unknown or not systems or not counts or not rr_counts or not rr_sizes or size <= 0 or rounds <= 0:
        parser.error(f"bad arguments (unknown systems: {sorted(unknown)})" if unknown else "bad arguments")
    systems = [s for s in SYSTEMS if s in systems] + [s for s in systems if VARIANT.fullmatch(s)]

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tcpbridge-bench-"))
    began = time.monotonic()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {text}", file=sys.stderr, flush=True)

    log(f"payload {size / MIB:g} MiB, {rounds} round(s), systems {','.join(systems)}, tunnels {counts}; "
        f"work dir {workdir}")
    data = payload(size, SEED)
    digest = hashlib.sha256(data).digest()
    buf = bytearray(size)
    targets_proc, target_ports = start_targets(size)
    running: dict[str, System] = {}
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {s: {} for s in systems}
    meta: dict[str, Any] = {}
    profile_report: dict[str, Any] | None = None
    try:
        def start(name: str, generation: int = 0) -> System:
            if name == "direct":
                system = start_direct(target_ports)
            elif name == "socat":
                system = start_socat(target_ports, workdir / f"socat-{generation}")
            else:
                system = start_tcpbridge(target_ports, workdir / f"{name}-{generation}", args.log_level, name)
            # Warm every path up once, and learn the relay's idle task count.
            system.idle_tasks = system.tasks()
            try:
                rtt(system, 10)
                setup(system, 5)
            except (OSError, BenchError) as exc:
                log(f"{system.name}: warm-up failed: {exc}")
            system.wait_idle(10)
            system.idle_tasks = system.tasks()
            return system

        for name in systems:
            try:
                running[name] = start(name)
            except BenchError as exc:
                log(f"{name}: cannot start: {exc}")
                samples[name]["start_error"] = [{"error": str(exc)}]

        metrics = [*(["upload", "download"] if "bulk" in sections else []),
                   *(["rtt"] if "rtt" in sections else []), *(["setup"] if "setup" in sections else []),
                   *([f"rr{size}x{n}" for size in rr_sizes for n in rr_counts] if "rr" in sections else []),
                   *(["mixed"] if "mixed" in sections else []),
                   *([f"conc{n}" for n in counts] if "held" in sections else [])]
        deadline_s = max(120.0, size / MIB * 1.0)
        for rnd in range(rounds):
            order = [s for s in systems if s in running]
            order = order[rnd % len(order):] + order[:rnd % len(order)] if order else order
            for metric in metrics:
                for name in order:
                    system = running[name]
                    if not system.alive():
                        samples[name].setdefault(metric, []).append({"error": "relay process exited"})
                        continue
                    try:
                        if metric == "upload":
                            r = bulk_upload(system, data, digest, targets_proc.pid, deadline_s)
                        elif metric == "download":
                            r = bulk_download(system, size, digest, buf, targets_proc.pid, deadline_s)
                        elif metric == "rtt":
                            r = rtt(system, rtt_count)
                        elif metric == "setup":
                            r = setup(system, setup_count)
                        elif metric.startswith("rr"):
                            rr_size, _, rr_n = metric[2:].partition("x")
                            r = request_response(system, int(rr_n), int(rr_size), rr_seconds)
                        elif metric == "mixed":
                            r = mixed(system, rr_seconds, MIXED_STREAMS)
                        else:
                            n = int(metric[4:])
                            reason = preflight(system, n)
                            if reason:
                                r = {"tunnels": n, "held": 0, "verified": False, "skipped": reason}
                            else:
                                r = concurrency(system, n, measure_memory=n == counts[0])
                        shown = describe(metric, r)
                    except (OSError, BenchError) as exc:
                        r = {"error": f"{type(exc).__name__}: {exc}"}
                        shown = f"FAILED: {r['error']}"
                        system.wait_idle(60)
                    r["round"] = rnd + 1
                    samples[name].setdefault(metric, []).append(r)
                    log(f"round {rnd + 1}/{rounds}  {metric:<9} {name:<10} {shown}")
                    if system.roots and (not system.alive() or not system.wait_idle(1)):
                        # Tunnels still open (or a relay died): later measurements would pay for it.
                        log(f"{name}: not idle after {metric} ({system.tasks()} tasks, idle {system.idle_tasks}):"
                            " restarting it")
                        restarts = system.restarts + 1
                        warnings = [*system.warnings, f"restarted after {metric} in round {rnd + 1}: not idle"]
                        system.stop()
                        try:
                            running[name] = start(name, restarts)
                        except BenchError as exc:
                            log(f"{name}: cannot restart: {exc}")
                            running[name] = system  # dead: its later metrics record "relay process exited"
                        running[name].restarts, running[name].warnings = restarts, warnings

        if args.profile and "tcpbridge" in running:
            log("profiling the daemons with py-spy during one upload and one download")
            profile_report = profile(running["tcpbridge"], data, digest, buf, targets_proc.pid, args.out, stamp)

        meta = {
            "timestamp": stamp,
            "duration_s": round(time.monotonic() - began, 1),
            "quick": quick, "size_bytes": size, "rounds": rounds, "rtt_count": rtt_count,
            "setup_count": setup_count, "tunnel_counts": counts, "systems": systems,
            "rr_counts": rr_counts, "rr_sizes": rr_sizes, "rr_seconds": rr_seconds,
            "mixed": {"streams": MIXED_STREAMS, "interactive_interval_ms": INTERACTIVE_INTERVAL_MS},
            "daemon_log_level": args.log_level,
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                        "pid_max": procstat.read_int("/proc/sys/kernel/pid_max"),
                        "threads_max": procstat.read_int("/proc/sys/kernel/threads-max"),
                        "max_map_count": procstat.read_int("/proc/sys/vm/max_map_count"),
                        "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
                        "loadavg_at_end": Path("/proc/loadavg").read_text().split()[:3]},
            "warnings": {name: s.warnings for name, s in running.items() if s.warnings},
            "restarts": {name: s.restarts for name, s in running.items()},
            "daemon_threads_idle": running["tcpbridge"].idle_tasks if "tcpbridge" in running else None,
        }
        with contextlib.suppress(Exception):
            meta["git"] = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                         capture_output=True, text=True, timeout=10).stdout.strip()
        with contextlib.suppress(Exception):
            meta["socat"] = subprocess.run(["socat", "-V"], capture_output=True, text=True,
                                           timeout=10).stdout.splitlines()[1].strip()
    finally:
        for system in running.values():
            system.stop()
        with contextlib.suppress(OSError):
            assert targets_proc.stdin is not None
            targets_proc.stdin.close()
        try:
            targets_proc.wait(10)
        except subprocess.TimeoutExpired:
            targets_proc.kill()
            targets_proc.wait(5)

    rr_keys = [f"rr{size}x{n}" for size in rr_sizes for n in rr_counts]
    summary = summarise({k: v for k, v in samples.items() if k in running}, counts, rr_keys)
    checks = verdicts(summary, counts, rr_keys)
    shown_systems = [s for s in systems if s in running]
    text = table(summary, shown_systems, counts, rr_keys, checks)
    print()
    print(f"tcpbridge benchmark {stamp}: {size / MIB:g} MiB each way, {rounds} round(s), "
          f"{os.cpu_count()} CPUs, medians over rounds" + ("  [--quick: smoke test, not a baseline]" if quick else ""))
    print(text)
    for name, warnings in meta.get("warnings", {}).items():
        for warning in warnings[:5]:
            print(f"warning: {name}: {warning}")
    if profile_report:
        print("\nhottest functions (py-spy, own time, % of the daemon's non-waiting samples):")
        for key, rep in profile_report.items():
            if "error" in rep:
                print(f"  {key}: {rep['error']}")
                continue
            print(f"  {key} ({rep['active_samples']} of {rep['samples']} samples working):")
            for frame, pct in rep["own"][:6]:
                print(f"    {pct:5.1f}%  {frame}")

    result = {"meta": meta, "summary": summary, "targets": checks, "samples": samples,
              "profile": profile_report, "table": text}
    out_json = args.out / f"{stamp}.json"
    out_json.write_text(json.dumps(result, indent=2, default=str))
    shutil.copyfile(out_json, args.out / "latest.json")
    print(f"\nwrote {out_json} and {args.out / 'latest.json'}")
    if not args.no_chart:
        try:
            title = (f"tcpbridge vs socat (2 hops) vs direct TCP — {stamp}, {size / MIB:g} MiB, {rounds} round(s), "
                     f"{os.cpu_count()} CPUs, loopback")
            chart(summary, shown_systems, counts, rr_keys, title, args.out / "latest.png")
            shutil.copyfile(args.out / "latest.png", args.out / f"{stamp}.png")
            print(f"wrote {args.out / 'latest.png'}")
        except ImportError:
            print("no chart: matplotlib is not installed (pip install -e '.[bench]')")
    if any("error" in r for runs in samples.values() for rs in runs.values() for r in rs):
        print(f"daemon logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
