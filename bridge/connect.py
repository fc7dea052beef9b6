"""``tcpbridge connect``: carry stdin/stdout over one websocket, e.g. as ssh's ProxyCommand.

::

    ssh -o ProxyCommand='tcpbridge connect wss://host/ --route ssh' user@host
    tcpbridge connect --config /etc/tcpbridge/frontend.yaml ssh

The connection is a frontend tunnel whose TCP side is this process's stdio: it is
opened with :func:`bridge.frontend.open_endpoint` (the daemon's dial, and binary
messages when the backend consents) and pumped by the daemons' own
:class:`bridge.tunnel.Tunnel`, so auth, TLS, proxies, keepalive and half-close
behave exactly as in ``tcpbridge-frontend``. The pump is given one end of a
``socketpair()``; two copy threads join the other end to fd 0 and fd 1:

* stdin EOF → ``shutdown(SHUT_WR)`` → the pump sends the end-of-stream marker,
  and output keeps flowing (half-close);
* the peer's end-of-stream → EOF on the pair → stdout is closed, so the reader
  (ssh) sees EOF while our input may still flow;
* an abort (reset, dropped websocket, bad frame, broken stdout) ends the process
  with status 1, stdout left unclosed until exit, and one stderr line saying why.

Exit statuses: 0 clean end; 1 the connection could not be opened or was
aborted; 2 usage or configuration errors; 128+N after signal N aborted it
(SIGINT at once; SIGHUP and SIGTERM after :data:`SIGNAL_GRACE` seconds in which
the connection may still end cleanly, since ssh closes our stdin and then sends
SIGHUP when it is done; a SIGINT during that grace aborts at once), quietly.
Signals are read through the daemons' mechanism, :class:`bridge.service.SignalQueue`.
Apart from that one line, nothing is written to stderr at the default log level
(``warning``): ssh shows the proxy command's stderr to its user.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bridge import config
from bridge.config import ConfigError, FrontendTunnel, redact_url
from bridge.frontend import offered_session, open_endpoint, redial_for
from bridge.outcome import Kind, Outcome
from bridge.protocol import CloseCode
from bridge.registry import TunnelRegistry
from bridge.secrets import SecretResolver
from bridge.service import SignalQueue, setup_logging
from bridge.sockets import describe_error
from bridge.transport import DialError
from bridge.tunnel import Tunnel

log = logging.getLogger("tcpbridge.connect")

#: As in :mod:`bridge.cli` (not imported from there: cli imports this module).
EXIT_CLEAN = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
PROG = "tcpbridge connect"
#: Bytes copied per read from stdin or from the pump's end of the pair.
CHUNK = 64 * 1024
#: How long a connection may take to end cleanly after SIGHUP or SIGTERM before it is aborted.
SIGNAL_GRACE = 2.0
#: How long an aborted connection waits for the output copier before exiting anyway.
ABORT_OUTPUT_WAIT = 1.0
#: Kinds of :meth:`Tunnel.run`'s outcome that are a deliberate end, not a failure: a half-close timeout
#: is how a session with a peer that never sends end-of-stream (a Go backend) ends after our input did.
CLEAN_ENDS = frozenset({Kind.CLEAN, Kind.CLOSED_BY_PEER, Kind.HALF_CLOSE_TIMEOUT})
#: The tunnel's name in the URL form (never shown: it only names the config entry).
URL_TUNNEL_NAME = "connect"
#: ``listen`` of the URL form's tunnel: required by the config schema, never bound.
UNUSED_LISTEN = "127.0.0.1:1"
INTERRUPTING_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)


# ---------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Define ``tcpbridge connect``'s arguments on ``parser`` (a subcommand's parser)."""
    parser.add_argument("target", metavar="URL|TUNNEL",
                        help="the backend's ws:// or wss:// base URL; with --config, a tunnel name of that file")
    parser.add_argument("--config", metavar="FILE",
                        help="take backend URL, route, headers, auth, TLS, proxy and options from the tunnel "
                             "named TUNNEL of this frontend YAML (its listen address is not used)")
    parser.add_argument("--route", metavar="NAME", help="backend route (default: default)")
    parser.add_argument("--header", action="append", default=[], type=_header, metavar="'NAME: VALUE'",
                        help="extra upgrade-request header (repeatable)")
    parser.add_argument("--token-file", metavar="PATH",
                        help="send the file's content as X-Tcpbridge-Token (the backend's token)")
    parser.add_argument("--proxy", metavar="env|none|URL",
                        help="HTTP proxy: env (default: *_proxy variables), none, or http://host:port")
    parser.add_argument("--ca-file", metavar="PATH", help="wss://: trust this PEM CA bundle instead of the system's")
    parser.add_argument("--connect-timeout", type=float, metavar="SECONDS",
                        help="one deadline for TCP connect, proxy CONNECT, TLS and the websocket upgrade "
                             "together (default 10)")
    parser.add_argument("--log-level", choices=config.LOG_LEVELS, default="warning",
                        help="stderr log level (default %(default)s: only why a connection failed)")


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'Name: value'")
    return name.strip(), value.strip()


_URL_ONLY_FLAGS = ("route", "header", "token_file", "proxy", "ca_file", "connect_timeout")


def tunnel_from_args(args: argparse.Namespace) -> FrontendTunnel:
    """The tunnel to open, from the URL form's flags or from ``--config FILE TUNNEL``.

    Everything is validated by :mod:`bridge.config`, with its messages; raise
    ConfigError listing every problem.
    """
    if args.config:
        used = [f"--{flag.replace('_', '-')}" for flag in _URL_ONLY_FLAGS if getattr(args, flag)]
        if used:
            raise ConfigError([f"{PROG}: {', '.join(used)} cannot be combined with --config "
                               "(set them in the tunnel's YAML entry)"])
        return tunnel_from_file(args.config, args.target)
    return tunnel_from_url(args.target, route=args.route, headers=args.header, token_file=args.token_file,
                           proxy=args.proxy, ca_file=args.ca_file, connect_timeout=args.connect_timeout)


def tunnel_from_file(path: str, name: str) -> FrontendTunnel:
    """Tunnel ``name`` of the frontend YAML at ``path``; ConfigError lists the known names if absent."""
    loaded = config.load_frontend(path)
    for tunnel in loaded.tunnels:
        if tunnel.name == name:
            return tunnel
    known = ", ".join(tunnel.name for tunnel in loaded.tunnels)
    raise ConfigError([f"{path}: no tunnel named {name!r}; known tunnels: {known}"])


def tunnel_from_url(
    url: str,
    *,
    route: str | None = None,
    headers: list[tuple[str, str]] | None = None,
    token_file: str | None = None,
    proxy: str | None = None,
    ca_file: str | None = None,
    connect_timeout: float | None = None,
) -> FrontendTunnel:
    """A tunnel to ``url`` built through :func:`bridge.config.parse_frontend`, so it is validated like YAML.

    Connection settings go at the document's top level, where problems are
    reported by key alone (``tcpbridge connect: backend: ...``); only the route
    belongs to the tunnel entry, whose label is removed from its messages.
    """
    document: dict[str, Any] = {"backend": url}
    header_map: dict[str, Any] = dict(headers or [])
    if token_file is not None:
        header_map["X-Tcpbridge-Token"] = {"file": os.path.abspath(token_file)}
    if header_map:
        document["headers"] = header_map
    if proxy is not None:
        document["proxy"] = proxy
    if ca_file is not None:
        document["tls"] = {"ca_file": ca_file}
    if connect_timeout is not None:
        document["connect_timeout"] = connect_timeout
    entry: dict[str, Any] = {"name": URL_TUNNEL_NAME, "listen": UNUSED_LISTEN}
    if route is not None:
        entry["route"] = route
    document["tunnels"] = [entry]
    try:
        return config.parse_frontend(document, PROG).tunnels[0]
    except ConfigError as exc:
        label = f"tunnels[0] {URL_TUNNEL_NAME!r}: "
        raise ConfigError([problem.replace(label, "") for problem in exc.problems]) from None


# ---------------------------------------------------------------------------
# Running one connection


def run(args: argparse.Namespace) -> int:
    """``tcpbridge connect``: open the tunnel, pump stdio through it, return the exit status."""
    setup_logging(args.log_level)
    try:
        tunnel = tunnel_from_args(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    return connect(tunnel)


def connect(tunnel: FrontendTunnel, stdin: int = 0, stdout: int = 1) -> int:
    """Carry the file descriptors ``stdin``/``stdout`` over one websocket of ``tunnel``; return the exit status.

    Returns when the tunnel has ended (both directions, or an abort) and, after a
    clean end, everything received has been written to ``stdout``. A copy thread
    may still be blocked reading ``stdin`` then: it is a daemon thread, and the
    process exits without waiting for it.
    """
    url = redact_url(tunnel.url)
    session = offered_session(tunnel)
    try:
        websocket = open_endpoint(tunnel, SecretResolver(), session=session)
    except DialError as exc:
        print(f"{PROG}: cannot open {url}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    ours, theirs = socket.socketpair()
    redial = redial_for(tunnel, session, SecretResolver()) if session is not None else None
    pump = Tunnel(theirs, websocket, label=tunnel.name, peer="stdio", destination=url, options=tunnel.options,
                  tcp_role="stdio", session=session, redial=redial)
    return _pump(pump, ours, stdin, stdout, url)


def _pump(pump: Tunnel, ours: socket.socket, stdin: int, stdout: int, url: str) -> int:
    """Run ``pump`` with copy threads between ``ours`` and stdio; the exit status."""
    finished = threading.Event()
    interrupt = _Interrupt(pump, finished)
    interrupt.install()
    output = _start(_copy_output, ours, stdout, pump)
    _start(_copy_input, stdin, ours, pump)
    registry = TunnelRegistry()
    registry.start()
    try:
        outcome = registry.run(pump)
    finally:
        finished.set()
        interrupt.signals.wake()  # its thread returns; the handlers stay, so a late SIGHUP cannot cut the output
        registry.stop()
    if outcome.kind in CLEAN_ENDS:
        output.join()  # everything received reaches stdout before we exit
        return EXIT_CLEAN
    output.join(ABORT_OUTPUT_WAIT)
    if interrupt.signum is not None:
        return 128 + interrupt.signum
    print(f"{PROG}: {url}: {outcome}", file=sys.stderr)
    return EXIT_FAILURE


def _start(target: Callable[..., None], *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, name=target.__name__.strip("_"), daemon=True)
    thread.start()
    return thread


def _copy_input(fd: int, sock: socket.socket, pump: Tunnel) -> None:
    """Copy ``fd`` into ``sock`` until EOF, then half-close ``sock``.

    A read error aborts the tunnel (a cut input must not look complete); a send
    error means the tunnel already ended, and copying stops.
    """
    while True:
        try:
            data = _read(fd)
        except OSError as exc:
            pump.abort(Outcome(Kind.ABORTED_BY_CLIENT, f"abort: cannot read stdin ({describe_error(exc)})"))
            return
        try:
            if not data:
                sock.shutdown(socket.SHUT_WR)
                return
            sock.sendall(data)
        except OSError:
            return


def _copy_output(sock: socket.socket, fd: int, pump: Tunnel) -> None:
    """Copy ``sock`` to ``fd`` until EOF, then close ``fd`` unless the tunnel was aborted.

    EOF arrives when the peer sent its end-of-stream marker (the output is
    complete) or when the pump released its end after an abort; only the first
    closes ``fd``. A write error (the reader went away) aborts the tunnel.
    """
    while True:
        try:
            data = sock.recv(CHUNK)
        except OSError:
            return  # the pump reset its end: the outcome says why
        if not data:
            break
        try:
            _write_all(fd, data)
        except OSError as exc:
            pump.abort(Outcome(Kind.ABORTED_BY_CLIENT, f"abort: cannot write stdout ({describe_error(exc)})"))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
            return
    if pump.outcome is None or pump.outcome.kind in CLEAN_ENDS:
        end_output(fd)


def _read(fd: int) -> bytes:
    """Up to CHUNK bytes from ``fd`` (b"" at EOF), waiting even if ``fd`` is non-blocking."""
    while True:
        try:
            return os.read(fd, CHUNK)
        except BlockingIOError:
            select.select([fd], [], [])


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``, waiting even if ``fd`` is non-blocking."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])


def end_output(fd: int) -> None:
    """Signal EOF to the reader of ``fd`` now: FIN if it is a socket, then close it.

    ``fd`` is replaced by /dev/null rather than closed, so the number is never
    reused by another file while something (sys.stdout) still refers to it.
    """
    duplicate = os.dup(fd)
    try:
        sock = socket.socket(fileno=duplicate)
    except OSError:  # not a socket
        os.close(duplicate)
    else:
        with sock, contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


class _Interrupt:
    """SIGHUP, SIGINT and SIGTERM end the connection.

    They are queued by a :class:`bridge.service.SignalQueue` and acted on by a
    thread of ours (a handler runs on the main thread, which may hold the pump's
    lock). SIGINT aborts at once with close 1001. After SIGHUP or SIGTERM the
    connection gets :data:`SIGNAL_GRACE` seconds to end on its own first (ssh
    closes our stdin and sends SIGHUP right away, before the half-close has gone
    round); a SIGINT meanwhile cuts the grace short. ``signum`` is the signal
    that aborted the connection (the exit status is 128 + it).
    """

    def __init__(self, pump: Tunnel, finished: threading.Event) -> None:
        self.signum: int | None = None
        self.signals = SignalQueue()
        self._pump = pump
        self._finished = finished

    def install(self) -> None:
        self.signals.install(INTERRUPTING_SIGNALS)
        _start(self._act)

    def _act(self) -> None:
        signum = self._next(None)
        if signum is None:
            return  # the connection ended first
        self.signum = signum
        grace_ends = time.monotonic() + SIGNAL_GRACE
        while self.signum != signal.SIGINT:
            signum = self._next(grace_ends)
            if signum is None:
                break
            if signum == signal.SIGINT:
                self.signum = signum
        if self._finished.is_set():
            return
        name = signal.Signals(self.signum).name
        self._pump.abort(Outcome(Kind.SHUTDOWN, f"abort: interrupted by {name}"), CloseCode.GOING_AWAY)

    def _next(self, deadline: float | None) -> int | None:
        """The next signal before ``deadline`` (monotonic; None: no limit); None once past it or finished."""
        while not self._finished.is_set():
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                return None
            signum = self.signals.next(timeout)
            if signum is not None:
                return signum
        return None
