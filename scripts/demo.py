"""`make run`: start a frontend+backend pair from the example configs and show bytes crossing it.

It starts an echo service at the target of the backend route the frontend's
`echo` tunnel uses, runs both daemons as real processes (their logs go to this
terminal), sends a greeting and 1 MiB of random bytes through the tunnel, checks
they come back intact, and keeps the pair running until Ctrl-C (or exits at once
with --once).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bridge import config

BIN = Path(sys.executable).parent


def echo_server(address: config.Address) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    server = socket.create_server((address.host, address.port), family=family)

    def serve_one(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server


def start_daemon(program: str, config_path: str, timeout: float = 15.0) -> subprocess.Popen[bytes]:
    """Start a daemon and wait for its sd_notify READY=1, sent once every listener is bound."""
    with tempfile.TemporaryDirectory() as directory:
        notify_path = str(Path(directory) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(notify_path)
            notify.settimeout(0.2)
            process = subprocess.Popen([str(BIN / program), "--config", config_path],
                                       env={**os.environ, "NOTIFY_SOCKET": notify_path})
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise SystemExit(f"demo: {program} exited with status {process.returncode}; see its log above")
                with contextlib.suppress(TimeoutError):
                    if b"READY=1" in notify.recv(4096).split(b"\n"):
                        return process
            process.terminate()
            raise SystemExit(f"demo: {program} was not ready after {timeout:g} s")


def round_trip(address: config.Address, payload: bytes) -> tuple[bytes, float]:
    started = time.perf_counter()
    with socket.create_connection((address.host, address.port), timeout=15) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        chunks = []
        while data := sock.recv(1 << 20):
            chunks.append(data)
        sender.join()
    return b"".join(chunks), time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--frontend-config", default="conf/frontend.yaml")
    parser.add_argument("--backend-config", default="conf/backend.yaml")
    parser.add_argument("--tunnel", default="echo", help="the frontend tunnel to demonstrate (default: echo)")
    parser.add_argument("--once", action="store_true", help="exit after the demonstration")
    args = parser.parse_args()

    try:
        front_cfg = config.load_frontend(args.frontend_config)
        back_cfg = config.load_backend(args.backend_config)
    except config.ConfigError as exc:
        raise SystemExit(f"demo: {exc}") from None
    tunnel = next((t for t in front_cfg.tunnels if t.name == args.tunnel), None)
    if tunnel is None:
        raise SystemExit(f"demo: {args.frontend_config} has no tunnel named {args.tunnel!r}")
    target = next((lst.routes[tunnel.route] for lst in back_cfg.listeners if tunnel.route in lst.routes), None)
    if target is None:
        raise SystemExit(f"demo: {args.backend_config} has no route {tunnel.route!r} for tunnel {tunnel.name!r}")

    print(f"demo: echo service on {target}; {tunnel.listen} -> {tunnel.url} -> {target}", flush=True)
    try:
        echo = echo_server(target)
    except OSError as exc:
        raise SystemExit(f"demo: cannot start the echo service on {target}: {exc.strerror}") from None
    processes = [start_daemon("tcpbridge-backend", args.backend_config)]
    try:
        processes.append(start_daemon("tcpbridge-frontend", args.frontend_config))
        greeting = b"hello through tcpbridge\n"
        reply, seconds = round_trip(tunnel.listen, greeting)
        print(f"demo: sent {greeting!r}, got back {reply!r} in {seconds * 1000:.1f} ms", flush=True)
        blob = os.urandom(1024 * 1024)
        reply, seconds = round_trip(tunnel.listen, blob)
        same = hashlib.sha256(reply).digest() == hashlib.sha256(blob).digest()
        print(f"demo: 1 MiB of random bytes there and back in {seconds * 1000:.1f} ms, "
              f"sha256 {'matches' if same else 'DIFFERS'}", flush=True)
        if not same:
            return 1
        if args.once:
            return 0
        print(f"demo: the pair is running. Try:  printf 'hi\\n' | nc -q1 {tunnel.listen.host} {tunnel.listen.port}"
              "\ndemo: Ctrl-C stops it.", flush=True)
        stop_signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        signal.sigwait(stop_signals)
        print("\ndemo: stopping", flush=True)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
        echo.close()


if __name__ == "__main__":
    sys.exit(main())
