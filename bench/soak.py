"""Soak run (`make soak`): many tunnels through a real frontend+backend pair, checked byte for byte.

Starts, as real processes on 127.0.0.1: an echo target (asyncio, this same file with
``--serve-echo``), a backend and a frontend. Then:

1. records the idle fds, threads and RSS of both daemons;
2. runs ``--rounds`` rounds of ``--tunnels`` concurrent tunnels, each echoing ``--size``
   pseudo-random bytes (sha256 checked both ways);
3. runs one burst of ``--burst`` concurrent tunnels each moving ``--burst-size`` bytes both ways;
4. after each phase waits (bounded) for both daemons to return to their idle fds and threads
   (threads come back once the daemons' pooled workers have been idle ``IDLE_SECONDS``);
5. SIGKILLs the backend, then the frontend, mid-transfer, restarts each on the same port and
   measures how long until a new tunnel echoes its first byte.

Prints a table and exits 1 if any byte was corrupted or lost, or if fds/threads did not return
to their idle values within ``--settle-timeout`` seconds. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import free_port  # bench.py beside this script
from bridge.workers import IDLE_SECONDS

BIN = Path(sys.executable).parent
CHUNK = 64 * 1024
READY_TIMEOUT = 15.0


# ---------------------------------------------------------------------------
# The echo target (its own process)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 18):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()
        await asyncio.wait_for(reader.read(1), 60)
    except (TimeoutError, OSError):
        pass
    finally:
        writer.close()


async def _serve_echo() -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    stdin_closed = loop.create_future()
    loop.add_reader(sys.stdin.fileno(), lambda: stdin_closed.done() or stdin_closed.set_result(None))
    async with server:
        await stdin_closed  # the parent went away (or closed our stdin): stop


# ---------------------------------------------------------------------------
# Processes


class Proc:
    """A child process whose stderr is kept (warnings and errors whole, the rest as a short tail)."""

    def __init__(self, name: str, args: list[str]) -> None:
        self.name = name
        self.args = args
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.tail: deque[str] = deque(maxlen=40)
        self.problems: list[str] = []
        self.lines = 0
        self.closes: Counter[str] = Counter()  # "closed (REASON)" of each tunnel, numbers blanked
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            self.lines += 1
            self.tail.append(line)
            if " ready: " in line:
                self.ready.set()
            if " closed (" in line:
                reason = line.split(" closed (", 1)[1].rsplit("): ", 1)[0]
                self.closes[re.sub(r"\d+", "N", reason)] += 1
            if (" WARNING " in line or " ERROR " in line or "Traceback" in line) and len(self.problems) < 200:
                self.problems.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self) -> Proc:
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n" + "\n".join(self.tail))
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        with contextlib.suppress(OSError):
            if self.proc.stdin:
                self.proc.stdin.close()
        self._reader.join(5)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {name} in /proc/{pid}/status")


@dataclass
class Snapshot:
    fds: int
    threads: int
    rss_kib: int

    @classmethod
    def of(cls, pid: int) -> Snapshot:
        return cls(fds(pid), status_field(pid, "Threads"), status_field(pid, "VmRSS"))

    @property
    def shape(self) -> tuple[int, int]:
        return self.fds, self.threads


def settle(pid: int, stable: float = 1.0, timeout: float = 15.0) -> Snapshot:
    """A snapshot once fds and threads stayed unchanged for ``stable`` seconds."""
    deadline = time.monotonic() + timeout
    last = Snapshot.of(pid)
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = Snapshot.of(pid)
        if now.shape != last.shape:
            since = time.monotonic()
        last = now
        if time.monotonic() - since >= stable:
            break
    return last


def back_to_idle(pid: int, idle: Snapshot, timeout: float) -> tuple[bool, Snapshot, float]:
    started = time.monotonic()
    while True:
        now = Snapshot.of(pid)
        if now.shape == idle.shape:
            return True, now, time.monotonic() - started
        if time.monotonic() - started > timeout:
            return False, now, time.monotonic() - started
        time.sleep(0.1)


# ---------------------------------------------------------------------------
# The load: asyncio clients, data generated and hashed as it streams


@dataclass
class Outcome:
    ok: int = 0
    corrupted: int = 0
    lost: int = 0
    bytes_moved: int = 0  # payload bytes, counted once per direction
    examples: list[str] = field(default_factory=list)

    def add(self, status: str, moved: int) -> None:
        if status == "ok":
            self.ok += 1
            self.bytes_moved += moved
        else:
            if status.startswith("corrupted"):
                self.corrupted += 1
            else:
                self.lost += 1
            if len(self.examples) < 5:
                self.examples.append(status)

    @property
    def total(self) -> int:
        return self.ok + self.corrupted + self.lost


class Gate:
    """Holds every tunnel of a burst until all of them are open (or failed), so they run concurrently."""

    def __init__(self, count: int, on_open: Callable[[], None] | None = None) -> None:
        self.count = count
        self.arrived = 0
        self.opened = 0
        self.event = asyncio.Event()
        self.on_open = on_open

    def arrive(self, opened: bool) -> None:
        self.arrived += 1
        self.opened += opened
        if self.arrived == self.count and not self.event.is_set():
            if self.on_open:
                self.on_open()
            self.event.set()


GREETING = 16  # bytes each gated tunnel echoes before waiting at the gate


async def one_tunnel(port: int, size: int, seed: int, connects: asyncio.Semaphore, timeout: float,
                     gate: Gate | None = None) -> str:
    """Echo ``size`` pseudo-random bytes through one tunnel; 'ok', 'corrupted: ...' or 'lost: ...'.

    With a ``gate``, the tunnel first echoes :data:`GREETING` bytes (so it is open end to end),
    then waits until every tunnel of the burst got that far.
    """
    sent_hash, got_hash = hashlib.sha256(), hashlib.sha256()
    received = 0
    arrived = False

    def arrive(opened: bool) -> None:
        nonlocal arrived
        if gate and not arrived:
            arrived = True
            gate.arrive(opened)

    async def run() -> None:
        nonlocal received
        async with connects:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 18)
        rng = random.Random(seed)
        left = size
        try:
            if gate:
                first = rng.randbytes(min(GREETING, left))
                sent_hash.update(first)
                writer.write(first)
                left -= len(first)
                echoed = await reader.readexactly(len(first))
                got_hash.update(echoed)
                received += len(echoed)
                arrive(True)
                await asyncio.wait_for(gate.event.wait(), 300)

            async def send() -> None:
                nonlocal left
                while left:
                    chunk = rng.randbytes(min(CHUNK, left))
                    sent_hash.update(chunk)
                    writer.write(chunk)
                    await writer.drain()
                    left -= len(chunk)
                writer.write_eof()

            async def receive() -> None:
                nonlocal received
                while data := await reader.read(1 << 18):
                    got_hash.update(data)
                    received += len(data)

            await asyncio.gather(send(), receive())
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    try:
        await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        return f"lost: timed out after {timeout:g} s with {received} of {size} bytes back"
    except (OSError, asyncio.IncompleteReadError) as exc:
        return f"lost: {type(exc).__name__} {exc} after {received} of {size} bytes back"
    finally:
        arrive(False)
    if received < size:
        return f"lost: EOF after {received} of {size} bytes"
    if received > size or got_hash.digest() != sent_hash.digest():
        return f"corrupted: {received} bytes back, sha256 differs"
    return "ok"


async def many(port: int, count: int, size: int, seed: int, connect_backlog: int, timeout: float,
               gate: Gate | None = None) -> Outcome:
    connects = asyncio.Semaphore(connect_backlog)
    results = await asyncio.gather(*(one_tunnel(port, size, seed * 1_000_003 + i, connects, timeout, gate)
                                     for i in range(count)))
    outcome = Outcome()
    for status in results:
        outcome.add(status, 2 * size)
    return outcome


# ---------------------------------------------------------------------------
# Kill and restart


def echo_byte(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as client:
            client.settimeout(2)
            client.sendall(b"x")
            return client.recv(1) == b"x"
    except OSError:
        return False


def kill_mid_transfer(victim: Proc, frontend_port: int) -> str:
    """Start a tunnel streaming both ways, SIGKILL ``victim``; return how the client's stream ended.

    The client stops sending before the kill so that its recv() is what meets the end (a send
    that meets a reset would consume the ECONNRESET and leave a bare EOF for recv)."""
    client = socket.create_connection(("127.0.0.1", frontend_port), timeout=10)
    try:
        block = os.urandom(1 << 20)
        client.sendall(block)
        got = 0
        client.settimeout(10)
        while got < 512 * 1024:
            data = client.recv(1 << 18)
            if not data:
                return "eof before the kill"
            got += len(data)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        try:
            while client.recv(1 << 18):
                pass
        except ConnectionResetError:
            return "reset"
        except TimeoutError:
            return "still open after 10 s"
        return "clean EOF"
    finally:
        client.close()


def restart(make: Callable[[], Proc], frontend_port: int, timeout: float = 30.0) -> tuple[Proc, float]:
    started = time.monotonic()
    proc = make()
    while time.monotonic() - started < timeout:
        if echo_byte(frontend_port):
            return proc, time.monotonic() - started
        time.sleep(0.02)
    raise RuntimeError(f"nothing served {timeout:g} s after restarting {proc.name}:\n" + "\n".join(proc.tail))


# ---------------------------------------------------------------------------
# Main


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tunnels", type=int, default=200, help="concurrent tunnels per round")
    parser.add_argument("--size", type=int, default=64 * 1024, help="bytes each round tunnel echoes")
    parser.add_argument("--burst", type=int, default=1000, help="concurrent tunnels in the burst (0: skip)")
    parser.add_argument("--burst-size", type=int, default=1 << 20, help="bytes each burst tunnel moves each way")
    parser.add_argument("--connect-backlog", type=int, default=256, help="connection attempts in flight at once")
    parser.add_argument("--tunnel-timeout", type=float, default=600.0)
    parser.add_argument("--settle-timeout", type=float, default=IDLE_SECONDS + 30.0)
    parser.add_argument("--no-kill", action="store_true", help="skip the SIGKILL/restart measurements")
    parser.add_argument("--ping-interval", type=float, default=None,
                        help="set ping_interval in both daemons' YAML (0 turns keepalive off; default: theirs)")
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        asyncio.run(_serve_echo())
        return 0

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    needed = 2 * max(args.burst, args.tunnels) + 256
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < needed:
        print(f"soak: RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)} is below the {needed} needed",
              file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="tcpbridge-soak-"))
    procs: list[Proc] = []
    failures: list[str] = []
    rows: list[tuple[str, str]] = []
    try:
        echo = Proc("echo", [sys.executable, __file__, "--serve-echo"])
        procs.append(echo)
        assert echo.proc.stdout is not None
        echo_port = int(echo.proc.stdout.readline())
        backend_port, frontend_port = free_port(), free_port()
        backend_cfg, frontend_cfg = tmp / "backend.yaml", tmp / "frontend.yaml"
        extra = "" if args.ping_interval is None else f"ping_interval: {args.ping_interval:g}\n"
        backend_cfg.write_text(extra + f"listeners:\n  - name: soak\n    listen: 127.0.0.1:{backend_port}\n"
                               f"    routes:\n      default: 127.0.0.1:{echo_port}\n")
        frontend_cfg.write_text(extra + f"backend: ws://127.0.0.1:{backend_port}/\n"
                                f"tunnels:\n  - name: soak\n    listen: 127.0.0.1:{frontend_port}\n")

        def start_backend() -> Proc:
            proc = Proc("backend", [str(BIN / "tcpbridge-backend"), "--config", str(backend_cfg)])
            procs.append(proc)
            return proc

        def start_frontend() -> Proc:
            proc = Proc("frontend", [str(BIN / "tcpbridge-frontend"), "--config", str(frontend_cfg)])
            procs.append(proc)
            return proc

        back = start_backend().wait_ready()
        front = start_frontend().wait_ready()
        if not echo_byte(frontend_port):
            raise RuntimeError("the pair does not echo a byte")
        time.sleep(0.5)
        daemons = {"frontend": front, "backend": back}
        # stable for longer than a pooled worker stays parked: the warm-up tunnel's workers are gone
        idle = {name: settle(proc.pid, stable=IDLE_SECONDS + 1, timeout=IDLE_SECONDS + 15)
                for name, proc in daemons.items()}
        print("soak: idle  " + "  ".join(f"{n}: {s.fds} fds, {s.threads} threads, {s.rss_kib // 1024} MiB RSS"
                                          for n, s in idle.items()), flush=True)

        # -- rounds --------------------------------------------------------------
        rounds = Outcome()
        warm = idle
        started = time.monotonic()
        for index in range(args.rounds):
            outcome = asyncio.run(many(frontend_port, args.tunnels, args.size, index, args.connect_backlog,
                                       args.tunnel_timeout))
            rounds.ok += outcome.ok
            rounds.corrupted += outcome.corrupted
            rounds.lost += outcome.lost
            rounds.bytes_moved += outcome.bytes_moved
            rounds.examples += outcome.examples[: 5 - len(rounds.examples)]
            print(f"soak: round {index + 1}/{args.rounds}: {outcome.ok} ok, {outcome.corrupted} corrupted, "
                  f"{outcome.lost} lost", flush=True)
            if index == 0:
                warm = {name: Snapshot.of(proc.pid) for name, proc in daemons.items()}
        rounds_time = time.monotonic() - started
        after_rounds = {}
        for name, proc in daemons.items():
            ok, snap, waited = back_to_idle(proc.pid, idle[name], args.settle_timeout)
            after_rounds[name] = (ok, snap, waited)
            if not ok:
                failures.append(f"{name}: {snap.fds} fds / {snap.threads} threads after the rounds "
                                f"(idle {idle[name].fds} / {idle[name].threads})")

        # -- burst ---------------------------------------------------------------
        burst = Outcome()
        burst_time = 0.0
        after_burst = {}
        peak = {name: Snapshot(0, 0, 0) for name in daemons}
        at_gate = {}
        gate = None
        if args.burst:
            stop_sampling = threading.Event()

            def sample() -> None:
                while not stop_sampling.wait(0.2):
                    for name, proc in daemons.items():
                        with contextlib.suppress(OSError, RuntimeError):
                            now = Snapshot.of(proc.pid)
                            old = peak[name]
                            peak[name] = Snapshot(max(old.fds, now.fds), max(old.threads, now.threads),
                                                  max(old.rss_kib, now.rss_kib))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            print(f"soak: burst of {args.burst} tunnels x {mib(args.burst_size)} both ways ...", flush=True)
            started = time.monotonic()
            at_gate: dict[str, Snapshot] = {}

            def snapshot_open() -> None:
                at_gate.update({name: Snapshot.of(proc.pid) for name, proc in daemons.items()})
                print(f"soak: {gate.opened} of {args.burst} tunnels open at once "
                      f"({time.monotonic() - started:.1f} s); transferring", flush=True)

            gate = Gate(args.burst, snapshot_open)
            burst = asyncio.run(many(frontend_port, args.burst, args.burst_size, 10**6, args.connect_backlog,
                                     args.tunnel_timeout, gate))
            burst_time = time.monotonic() - started
            stop_sampling.set()
            sampler.join(5)
            print(f"soak: burst: {burst.ok} ok, {burst.corrupted} corrupted, {burst.lost} lost in {burst_time:.1f} s",
                  flush=True)
            for name, proc in daemons.items():
                ok, snap, waited = back_to_idle(proc.pid, idle[name], args.settle_timeout)
                after_burst[name] = (ok, snap, waited)
                if not ok:
                    failures.append(f"{name}: {snap.fds} fds / {snap.threads} threads after the burst "
                                    f"(idle {idle[name].fds} / {idle[name].threads})")

        for outcome, what in ((rounds, "rounds"), (burst, "burst")):
            if outcome.corrupted or outcome.lost:
                failures.append(f"{what}: {outcome.corrupted} corrupted, {outcome.lost} lost: {outcome.examples}")

        # -- kill and restart ------------------------------------------------------
        problems = [line for proc in procs if proc.name != "echo" for line in proc.problems]
        kills: dict[str, tuple[str, float]] = {}
        if not args.no_kill:
            ending = kill_mid_transfer(back, frontend_port)
            back, seconds = restart(start_backend, frontend_port)
            back.wait_ready()
            kills["backend"] = (ending, seconds)
            ending = kill_mid_transfer(front, frontend_port)
            front, seconds = restart(start_frontend, frontend_port)
            front.wait_ready()
            kills["frontend"] = (ending, seconds)
            if kills["backend"][0] != "reset":
                failures.append(f"backend SIGKILL: the client's stream ended with {kills['backend'][0]}, not a reset")

        # -- report ----------------------------------------------------------------
        round_tunnels = args.rounds * args.tunnels
        rows.append(("round tunnels",
                     f"{rounds.total} ({args.rounds} x {args.tunnels} x {args.size // 1024} KiB echo)"))
        rows.append(("  corrupted / lost", f"{rounds.corrupted} / {rounds.lost}"))
        rows.append(("  time, throughput", f"{rounds_time:.1f} s, {mib(rounds.bytes_moved / rounds_time)}/s "
                                          f"(both directions), {round_tunnels / rounds_time:.0f} tunnels/s"))
        if args.burst:
            opened = gate.opened if gate else 0
            rows.append(("burst tunnels", f"{burst.total} x {mib(args.burst_size)} each way, "
                                          f"{opened} open at once before any bulk transfer"))
            rows.append(("  corrupted / lost", f"{burst.corrupted} / {burst.lost}"))
            rows.append(("  time, throughput", f"{burst_time:.1f} s, {mib(burst.bytes_moved / burst_time)}/s "
                                              "(both directions)"))
        for name in daemons:
            base = idle[name]
            ok_r, snap_r, wait_r = after_rounds[name]
            rows.append((f"{name} fds idle/after rounds", f"{base.fds} / {snap_r.fds} "
                                                          f"({'back' if ok_r else 'NOT back'} in {wait_r:.1f} s)"))
            rows.append((f"{name} threads idle/after rounds", f"{base.threads} / {snap_r.threads}"))
            growth = (snap_r.rss_kib - base.rss_kib) / 1024 / (round_tunnels / 1000)
            rows.append((f"{name} RSS idle/after rounds", f"{base.rss_kib / 1024:.1f} / {snap_r.rss_kib / 1024:.1f} "
                                                          f"MiB ({growth:+.2f} MiB per 1000 tunnels)"))
            if args.rounds > 1:
                later = (args.rounds - 1) * args.tunnels / 1000
                warm_growth = (snap_r.rss_kib - warm[name].rss_kib) / 1024 / later
                rows.append((f"{name} RSS after round 1/last", f"{warm[name].rss_kib / 1024:.1f} / "
                                                                f"{snap_r.rss_kib / 1024:.1f} MiB "
                                                                f"({warm_growth:+.2f} MiB per 1000 tunnels)"))
            if args.burst:
                ok_b, snap_b, wait_b = after_burst[name]
                if name in at_gate:
                    rows.append((f"{name} with all burst tunnels open", f"{at_gate[name].fds} fds, "
                                 f"{at_gate[name].threads} threads, {at_gate[name].rss_kib / 1024:.0f} MiB RSS"))
                rows.append((f"{name} peak during burst", f"{peak[name].fds} fds, {peak[name].threads} threads, "
                                                          f"{peak[name].rss_kib / 1024:.0f} MiB RSS"))
                rows.append((f"{name} after burst", f"{snap_b.fds} fds, {snap_b.threads} threads "
                                                    f"({'back' if ok_b else 'NOT back'} in {wait_b:.1f} s), "
                                                    f"{snap_b.rss_kib / 1024:.1f} MiB RSS"))
        for name, (ending, seconds) in kills.items():
            seen = f"client saw: {ending}; " if name == "backend" else ""
            rows.append((f"{name} SIGKILL mid-transfer", f"{seen}restart-to-first-byte {seconds:.3f} s"))
        rows.append(("daemon warnings/errors", f"{len(problems)} (before the kills)"))
        for proc in procs:
            unclean = {reason: n for reason, n in proc.closes.items() if reason != "clean"}
            if unclean and proc.name != "echo":
                rows.append((f"{proc.name} (pid {proc.pid}) tunnel ends", ", ".join(
                    f"{n} {reason}" for reason, n in sorted(proc.closes.items(), key=lambda kv: -kv[1]))))
        width = max(len(key) for key, _ in rows)
        print("\n" + "\n".join(f"{key:<{width}}  {value}" for key, value in rows))
        for line in problems[:10]:
            print(f"  {line}")
    except Exception as exc:  # report, clean up, fail
        failures.append(f"soak aborted: {type(exc).__name__}: {exc}")
    finally:
        for proc in reversed(procs):
            proc.stop(signal.SIGTERM)
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print("\nSOAK FAILED:\n" + "\n".join(f"  {failure}" for failure in failures))
        return 1
    print("\nsoak passed: nothing corrupted or lost; fds and threads back to idle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
