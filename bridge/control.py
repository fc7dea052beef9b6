"""The daemon's control socket and what ``tcpbridge status`` does with it.

A Unix stream socket (mode 0600) at the YAML's ``control_socket``, else at
``$RUNTIME_DIRECTORY/control.sock`` when systemd provides that directory (the units set
``RuntimeDirectory=``), else none. One request per connection: the client sends a line
(``status``), the daemon answers one JSON document and closes. One thread serves the socket;
each client gets :data:`CLIENT_TIMEOUT` seconds in all to send its line, and as long to take the
answer, so a stuck client delays the others by that much at most.

A socket file left behind by a killed daemon is removed at start when nothing answers on it;
one a live process answers on makes the start fail (exit 1), as a port in use does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from bridge.listen import ListenError
from bridge.protocol import BRIDGE_PATH
from bridge.sockets import describe_error
from bridge.stats import human_bytes

log = logging.getLogger("tcpbridge.control")

SOCKET_NAME = "control.sock"
CLIENT_TIMEOUT = 2.0
MAX_REQUEST_BYTES = 1024
#: Largest answer a client reads (1000 live tunnels are about 250 KB).
MAX_ANSWER_BYTES = 64 * 1024 * 1024


def default_socket_path(environ: Mapping[str, str] = os.environ) -> str | None:
    """``$RUNTIME_DIRECTORY/control.sock`` (the first directory, if systemd gives several), or None."""
    directory = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(directory, SOCKET_NAME) if directory else None


def unit_socket_path(daemon: str) -> str:
    """The socket of a daemon run by the shipped units: ``frontend``, ``backend``, ``frontend@NAME``, …"""
    role, _, instance = daemon.partition("@")
    return f"/run/tcpbridge-{role}{'-' + instance if instance else ''}/{SOCKET_NAME}"


class ControlServer:
    """Answers requests on a Unix socket with ``answer(request)`` (a JSON-able mapping)."""

    def __init__(self, path: str, answer: Callable[[str], Mapping[str, Any]]) -> None:
        self.path = path
        self._answer = answer
        self._sock: socket.socket | None = None
        self._inode = 0
        self._wake_read, self._wake_write = os.pipe()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def bind(self) -> None:
        """Bind the socket (mode 0600), replacing a stale one; raise ListenError naming the path."""
        _clear_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # no window where the socket is open to others; only the main thread runs
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)
            sock.listen(16)
            self._inode = os.stat(self.path).st_ino
        except OSError as exc:
            sock.close()
            raise ListenError(f"control socket {self.path}: cannot listen: {describe_error(exc)}") from None
        finally:
            os.umask(old_umask)
        self._sock = sock

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()
        log.info("control socket: %s (tcpbridge status --socket %s)", self.path, self.path)

    def stop(self) -> None:
        """Stop serving, close the socket and remove its file (unless another process replaced it)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b".")
        if self._thread:
            self._thread.join(timeout=2 * CLIENT_TIMEOUT + 1)
        if self._sock is not None:
            self._sock.close()
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
        for fd in (self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _serve(self) -> None:
        assert self._sock is not None
        listening = self._sock.fileno()
        while not self._stopping.is_set():
            readable, _, _ = select.select([listening, self._wake_read], [], [])
            if self._stopping.is_set():
                return
            if listening not in readable:
                continue
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                log.debug("control socket: accept failed: %s", exc)
                time.sleep(0.05)
                continue
            with conn:
                try:
                    self._handle(conn)
                except (OSError, ValueError) as exc:
                    log.debug("control socket: client failed: %s", exc)
                except Exception:  # a bug must not end the thread
                    log.exception("control socket: answering failed")

    def _handle(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + CLIENT_TIMEOUT
        request = b""
        while b"\n" not in request and len(request) <= MAX_REQUEST_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete request in {CLIENT_TIMEOUT:g} s")
            conn.settimeout(remaining)
            data = conn.recv(MAX_REQUEST_BYTES + 1 - len(request))
            if not data:
                break
            request += data
        command = request.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        answer = self._answer(command)
        conn.settimeout(CLIENT_TIMEOUT)  # covers the whole sendall
        conn.sendall(json.dumps(answer, indent=1).encode() + b"\n")


def _clear_stale(path: str) -> None:
    """Remove a socket file nothing listens on; refuse a path that is live or not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenError(f"control socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"control socket {path}: the file exists and is not a socket (remove it or set "
                          "another control_socket)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            log.info("control socket: removed %s, left behind by a daemon that is gone", path)
            return
        except OSError as exc:
            raise ListenError(f"control socket {path}: cannot check the existing socket: {exc.strerror or exc}") \
                from None
    raise ListenError(f"control socket {path}: another process is listening there (is this daemon already "
                      "running? set another control_socket)")


# ---------------------------------------------------------------------------
# The client side: tcpbridge status


class StatusError(Exception):
    """No daemon answered; the message names the path and why."""


def query(path: str, request: str = "status", timeout: float = 5.0) -> dict[str, Any]:
    """Send ``request`` to the control socket at ``path`` and return the daemon's JSON answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(request.encode() + b"\n")
            chunks, size = [], 0
            while size <= MAX_ANSWER_BYTES:
                data = sock.recv(1 << 16)
                if not data:
                    break
                chunks.append(data)
                size += len(data)
        except FileNotFoundError:
            raise StatusError(f"no daemon answers at {path}: no such socket (is the daemon running, with "
                              "this control_socket?)") from None
        except ConnectionRefusedError:
            raise StatusError(f"no daemon answers at {path}: connection refused (left behind by a daemon "
                              "that is gone?)") from None
        except PermissionError:
            raise StatusError(f"cannot connect to {path}: permission denied (run as root or as the "
                              "daemon's user)") from None
        except TimeoutError:
            raise StatusError(f"the daemon at {path} did not answer in {timeout:g} s") from None
        except OSError as exc:
            raise StatusError(f"cannot query {path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise StatusError(f"{path}: the answer is not a status document (not a tcpbridge control socket?)") \
            from None
    if not isinstance(answer, dict) or "daemon" not in answer:
        raise StatusError(f"{path}: unexpected answer {str(answer)[:200]!r}")
    return answer


def format_status(doc: Mapping[str, Any]) -> str:
    """The human-readable view ``tcpbridge status`` prints."""
    lines = [
        f"{doc['daemon']} {doc['version']}, pid {doc['pid']}, up {_duration(doc['uptime_seconds'])}, "
        f"config {doc['config']}",
        doc["summary"],
        *_workers_line(doc.get("workers")),
        "",
    ]
    listeners = doc.get("listeners", [])
    lines += _table(["LISTENER", "ADDRESS", "LEADS TO"],
                    [[item["name"], item["listen"], item["to"]] for item in listeners]) or ["no listeners"]
    lines.append("")
    tunnels = doc.get("tunnels", [])
    lines += _table(["TUNNEL", "NAME", "PEER", "DESTINATION", "AGE", "TO WEBSOCKET", "TO TCP", "RESUME"],
                    [[t["id"], t["label"], t["peer"], _short(t["destination"]), _duration(t["age_seconds"]),
                      human_bytes(t["bytes_to_websocket"]), human_bytes(t["bytes_to_tcp"]), _resume(t)]
                     for t in tunnels]) \
        or ["no active tunnels"]
    totals = doc.get("totals", {})
    closed = ", ".join(f"{kind} {count}" for kind, count in totals.get("closed", {}).items() if count)
    failures = ", ".join(f"{reason} {count}" for reason, count in totals.get("open_failures_by_reason", {}).items())
    reloads = doc.get("reloads", {})
    resumes = ", ".join(f"{result} {count}" for result, count in totals.get("resumes", {}).items() if count)
    lines += ["", f"ended: {closed or 'none'}; failed to open: {failures or 'none'}; "
                  f"reloads: {reloads.get('ok', 0)} ok, {reloads.get('failed', 0)} failed"
                  + (f"; resumes: {resumes}" if resumes else "")]
    return "\n".join(lines)


def _resume(tunnel: Mapping[str, Any]) -> str:
    """``-`` (not resumable), ``on``, ``detached``, with the re-attaches so far: ``on, 2 resumes``."""
    state = {"resumable": "on", "detached": "detached"}.get(tunnel.get("resume", ""), "-")
    count = tunnel.get("resumes", 0)
    return state + (f", {count} resume{'s' if count != 1 else ''}" if count else "")


def _workers_line(workers: list[dict[str, Any]] | None) -> list[str]:
    """``2 workers: pid 4243 (cpu 0, serving, 17 active), ...; 1 restart`` (daemons with ``workers`` > 1)."""
    if not workers:
        return []
    def one(w: dict[str, Any]) -> str:
        cpu = "" if w["cpu"] is None else f"cpu {w['cpu']}, "
        return f"pid {w['pid'] or '-'} ({cpu}{w['state']}, {w['active']} active)"

    shown = ", ".join(one(w) for w in workers)
    restarts = sum(w["restarts"] for w in workers)
    return [f"{len(workers)} workers: {shown}" + (f"; {restarts} restart{'s' if restarts != 1 else ''}"
                                                   if restarts else "")]


def _short(destination: str) -> str:
    """A frontend tunnel's URL without the bridge path every one of them has (the listener table shows it)."""
    return destination.replace(BRIDGE_PATH, "/…")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def add_status_arguments(parser: Any) -> None:
    """``tcpbridge status [frontend|backend|frontend@NAME|backend@NAME] [--socket PATH] [--json]``."""
    parser.add_argument("daemon", nargs="?", metavar="DAEMON",
                        help="frontend, backend, frontend@NAME or backend@NAME: the socket the shipped units give "
                             f"it (/run/tcpbridge-DAEMON/{SOCKET_NAME}, @ becoming -); default: both")
    parser.add_argument("--socket", metavar="PATH", help="the daemon's control_socket")
    parser.add_argument("--json", action="store_true", help="print the daemon's JSON document")


def run_status(daemon: str | None, socket_path: str | None, as_json: bool) -> int:
    """Print the live status of one daemon (or of both shipped ones); 1 when none answers."""
    if socket_path:
        paths = [socket_path]
    elif daemon:
        if daemon.partition("@")[0] not in ("frontend", "backend"):
            print(f"tcpbridge status: {daemon!r}: expected frontend, backend, frontend@NAME or backend@NAME "
                  "(or --socket PATH)", file=sys.stderr)
            return 2
        paths = [unit_socket_path(daemon)]
    else:
        paths = [unit_socket_path("frontend"), unit_socket_path("backend")]
    documents, errors = [], []
    for path in paths:
        try:
            documents.append(query(path))
        except StatusError as exc:
            errors.append(str(exc))
    if not documents:
        for error in errors:
            print(f"tcpbridge status: {error}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(documents[0] if len(paths) == 1 and documents else documents, indent=1))
    else:
        print("\n\n".join(format_status(doc) for doc in documents))
    return 0
