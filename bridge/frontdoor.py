"""The backend's front door: accept connections, read their requests, route them, admit tunnels.

Each listener is a threaded ``socketserver`` TCP server whose connection threads read requests
with :mod:`bridge.http1` (h11 parses each head). A bridge upgrade passes :mod:`bridge.admission`,
then its thread connects the route's target *before* answering (so an unreachable target gets a
502 with the reason, where the Go backend answers 101 and hangs up), sends the 101 itself
(:mod:`bridge.server_end`), and becomes one of the tunnel's two pump threads. Every other request
is passed through (:mod:`bridge.passthrough`) or refused.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import socket
import socketserver
import sys
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from bridge import __version__, admission, events, http1, passthrough, protocol, resume
from bridge.admission import TunnelCounters, UpgradeRefused
from bridge.config import Address, Listener
from bridge.events import Event
from bridge.handoff import Handoff, Reattach
from bridge.handshake import header_tokens
from bridge.listen import LISTEN_BACKLOG
from bridge.origin import OriginPool
from bridge.registry import TunnelRegistry
from bridge.secrets import SecretResolver
from bridge.server_end import NO_SUCH_SESSION, ServerEndpoint, bridge_upgrade_response, reattach, refuse_reattach
from bridge.session import Session
from bridge.sockets import RECV_CHUNK, describe_error, shutdown_socket
from bridge.tunnel import Tunnel, new_tunnel_id

log = logging.getLogger("tcpbridge.backend")

#: Seconds a connection may take to send a complete request (and may idle between kept-alive requests).
HANDSHAKE_TIMEOUT = 30.0
#: The stats and metrics reason of a re-attach refused in band (no live session has its id).
REFUSED_REATTACH = "no_such_session"
#: The answer to a session header that no frontend of ours sends (several, or not a session id).
NOT_A_SESSION = "not a session id"
#: Largest request header block (the lines after the request line) accepted: 431 beyond.
MAX_HEADER_BYTES = 16 * 1024
#: Our ``Server`` header.
SERVER = f"tcpbridge/{__version__}"
#: Methods answered 404 (or passed through) rather than 501 on a listener without ``passthrough``.
KNOWN_METHODS = frozenset({"HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
#: After a refused request head (400, 414, 431, 501, 505), the rest of the request is
#: read and dropped (this much, this long) so that closing the connection does not reset it
#: before the client has read the answer.
DRAIN_BYTES = 1024 * 1024
DRAIN_SECONDS = 2.0


class ListenerServer(socketserver.ThreadingTCPServer):
    """One backend listener: a TCP server whose connection threads read HTTP requests and become tunnels.

    ``listener`` is read afresh by every request, so a reload swaps it in place.
    Each connection is handled on a daemon thread from ``registry.workers``
    (pooled, not started per connection), and ``server_close`` never waits for
    them: a listener removed by a reload or stopped for shutdown leaves its live
    tunnels running (shutdown drains them through the registry).
    """

    daemon_threads = True
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG
    allow_reuse_address = True

    def __init__(self, listener: Listener, registry: TunnelRegistry, sock: socket.socket, *,
                 secrets: SecretResolver | None = None, counters: TunnelCounters | None = None,
                 handoff: Handoff | None = None) -> None:
        self.address_family = sock.family
        super().__init__((listener.listen.host, listener.listen.port), BridgeRequestHandler,
                         bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()
        self.listener = listener
        self.registry = registry
        self.secrets = secrets or SecretResolver()
        self.counters = counters or TunnelCounters()
        #: Idle keep-alive connections to the listener's passthrough origin.
        self.origin_pool = OriginPool()
        self.handoff = handoff

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection to a pooled thread (ThreadingMixIn starts a new thread for each).

        Out of threads, the RuntimeError reaches socketserver, which logs it
        through :meth:`handle_error` and closes the connection.
        """
        self.registry.workers.submit(self.process_request_thread, request, client_address,
                                     name=f"request-{self.listener.name}")

    def server_close(self) -> None:
        super().server_close()
        self.origin_pool.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a failed request in one line; a client that went away is not worth a traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            log.debug("listener %s: connection from %s failed: %s", self.listener.name, client_address, error)
        else:
            log.exception("listener %s: error serving %s", self.listener.name, client_address)


class BridgeRequestHandler(socketserver.StreamRequestHandler):
    """Answers one HTTP connection: bridge upgrades become tunnels, everything else is a 404
    or, with the listener's ``passthrough`` set, is reverse-proxied there (:mod:`bridge.passthrough`).

    Every check happens before the 101 and before the target is dialled, in this
    order: bridge path (404), handshake (400/426), Origin (403), token (401/403/503),
    route (404), tunnel caps (503), target (502). Each refusal logs one line with the
    real reason: behind the inverting proxy the client only ever sees a 500.
    """

    server: ListenerServer
    #: Seconds each read of a request may wait (the whole head has :data:`HANDSHAKE_TIMEOUT`).
    timeout = HANDSHAKE_TIMEOUT
    # Small frames go out back to back (data, then an end-of-stream marker): without NODELAY the
    # second waits for a delayed ACK (~40 ms).
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        # What the request being served says; the log lines and refusals read them before it is parsed.
        self.command, self.path, self.request_version, self.request_head = "", "", "HTTP/1.1", b""
        self.headers = http1.Headers()
        self.close_connection = True

    def handle(self) -> None:
        """Requests, one after another, while the connection is kept alive."""
        self.handle_one_request()
        while not self.close_connection:
            self.handle_one_request()

    def handle_one_request(self) -> None:
        """One request, whose line and headers must all arrive within :data:`HANDSHAKE_TIMEOUT`.

        The socket timeout only bounds each read, so a client trickling a byte at a
        time could hold the thread forever; the housekeeper shuts such a connection
        down when the deadline passes. The deadline also ends idle keep-alive
        connections.
        """
        self.close_connection = True
        deadline = self.server.registry.call_at(time.monotonic() + HANDSHAKE_TIMEOUT, self._request_too_slow)
        try:
            request = http1.read_request(self.rfile, MAX_HEADER_BYTES)
        except http1.RequestError as refused:
            deadline.cancel()
            self._refuse_request(refused)
            return
        except OSError as exc:
            log.debug("listener %s: %s: no complete request: %s", self.server.listener.name, self._peer(),
                      describe_error(exc))
            return
        finally:
            deadline.cancel()  # the head is in: bodies and tunnels have their own timeouts
        if request is None:
            return
        self.command, self.path, self.request_version = request.method, request.target, request.version
        self.request_head = request.head
        self.headers = request.headers
        self.close_connection = not request.keep_alive
        if request.expects_continue:
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._route()

    def _route(self) -> None:
        """Serve the parsed request: GET may be a bridge upgrade; every other method is passed through
        or refused (404, or 501 for a method no HTTP server knows)."""
        if self.command == "GET":
            self._get()
        elif self.command in KNOWN_METHODS or self.server.listener.passthrough:
            self._not_found()
        else:
            self._refuse_request(http1.RequestError(HTTPStatus.NOT_IMPLEMENTED,
                                                    f"unsupported method {self.command[:40]!r}"))

    def _request_too_slow(self) -> None:
        log.debug("listener %s: %s did not send a complete request within %g s; closing",
                  self.server.listener.name, self._peer(), HANDSHAKE_TIMEOUT)
        shutdown_socket(self.connection)

    def _refuse_request(self, refused: http1.RequestError) -> None:
        """Answer a request that cannot be served, then close the connection (what is left of the request
        is drained first, so that closing does not reset the answer away).

        A head too large (431) or ambiguous (400, :mod:`bridge.request_rules`: two HTTP parsers could
        read it differently, RFC 9112 section 11.2) is refused like an upgrade, with a warning; a
        malformed one with one debug line."""
        self.close_connection = True
        where = f"{self.command} {self.path[:200]}: " if self.command else ""
        if refused.smuggling or refused.status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE:
            self._refuse(new_tunnel_id(), UpgradeRefused(refused.status, where + refused.detail,
                                                         {"Connection": "close"}, body=refused.detail))
        else:
            log.debug("listener %s: %s: %d %s", self.server.listener.name, self._peer(), refused.status,
                      refused.detail)
            with contextlib.suppress(OSError):
                self.wfile.write(http1.plain_answer(refused.status, refused.detail, [("Connection", "close")],
                                                    server=SERVER))
        self._drain()

    def _get(self) -> None:
        listener = self.server.listener  # once: a reload may swap it while this request runs
        if listener.passthrough and not self._is_bridge_upgrade():
            self._passthrough(listener, listener.passthrough)
            return
        tunnel_id = new_tunnel_id()
        self._headers_read = time.monotonic()  # the start of the handshake time in stats and metrics
        try:
            route = self._bridge_route()
            key = self._check_upgrade()
            admission.check_origin(listener, self.headers)
            admission.check_token(listener, route, self.headers, self.server.secrets)
            session_id = self._session_to_resume()
            if session_id is not None:
                self._resume(listener, route, key, session_id)
                return
            target = self._target(listener, route)
            release = admission.admit(listener, route, self.server.counters)
        except UpgradeRefused as refused:
            self._refuse(tunnel_id, refused)
            return
        try:
            with self.server.registry.opening(self.connection):  # a drain waits for it until its tunnel runs
                self._open_tunnel(listener, route, target, key, tunnel_id, release)
        finally:
            release()

    def _open_tunnel(self, listener: Listener, route: str, target: Address, key: str, tunnel_id: str,
                     release: Callable[[], None]) -> None:
        try:
            sock = self._connect(listener, route, target)
        except UpgradeRefused as refused:
            release()  # before answering: the client may try again the moment it reads the 502
            self._refuse(tunnel_id, refused)
            return
        self.close_connection = True
        binary = listener.options.frames == "auto" and \
            protocol.binary_offered(self.headers.get_all(protocol.OFFER_HEADER))
        try:
            received = self._upgrade(key, binary)
        except OSError as exc:
            facts = events.tunnel_facts(f"{listener.name}/{route}", tunnel_id, self._peer(), str(target))
            log.info("tunnel %s [%s]: client %s left during the handshake: %s",
                     tunnel_id, listener.name, self._peer(), exc,
                     extra=events.mark(Event.OPEN_FAILED, {**facts, "reason": "client_left"}))
            sock.close()
            return
        self.server.registry.stats.handshake(f"{listener.name}/{route}", time.monotonic() - self._headers_read)
        session = self._consent_to_resume(listener)
        endpoint = ServerEndpoint(self.connection, received, listener.options.max_message_bytes,
                                  binary_consented=binary, resume=session is not None)
        if session is not None and session.id is not None:
            with contextlib.suppress(OSError):  # the client left: the pump's first read ends the tunnel (abort)
                endpoint.send_control(resume.Consent(session.id, listener.options.resume_buffer))
        pump = Tunnel(
            sock,
            endpoint,
            label=f"{listener.name}/{route}",
            peer=self._peer(),
            destination=str(target),
            options=listener.options,
            tcp_role="target",
            tunnel_id=tunnel_id,
            session=session,
        )
        self.server.registry.run(pump)

    def _session_to_resume(self) -> str | None:
        """The session id a re-attaching request names (:data:`~bridge.resume.SESSION_HEADER`), None when it
        names none; UpgradeRefused 404 for a header no frontend of ours sends (several, or no session id)."""
        values = self.headers.get_all(resume.SESSION_HEADER)
        if not values:
            return None
        if len(values) == 1 and resume.is_session_id(values[0].strip()):
            return values[0].strip()
        raise UpgradeRefused(HTTPStatus.NOT_FOUND, NOT_A_SESSION)

    def _resume(self, listener: Listener, route: str, key: str, session_id: str) -> None:
        """Re-attach the live tunnel of ``session_id`` here, hand the connection to the worker that holds
        it, or refuse in band when no live resumable tunnel of this listener and route has that id
        (unknown, ended, expired, or ``resume: false`` here: the answer never says which, nor repeats
        the id)."""
        binary = listener.options.frames == "auto" and \
            protocol.binary_offered(self.headers.get_all(protocol.OFFER_HEADER))
        if not listener.options.resume:
            self._refuse_in_band(listener, key, binary)
            return
        tunnel = self.server.registry.resumable(session_id)
        handoff = self.server.handoff
        if tunnel is None and handoff is not None and handoff.owner(session_id) != handoff.slot:
            self._hand_off(handoff, Reattach(listener.name, route, key, binary, session_id, self._peer()))
            return
        if tunnel is None or tunnel.label != f"{listener.name}/{route}":
            self._refuse_in_band(listener, key, binary)
            return
        self.close_connection = True
        try:
            received = self._upgrade(key, binary)
        except OSError as exc:
            log.info("tunnel %s [%s]: client %s left while re-attaching: %s", tunnel.id, tunnel.label, self._peer(),
                     exc, extra=events.mark(None, tunnel.facts()))
            return
        reattach(tunnel, ServerEndpoint(self.connection, received, listener.options.max_message_bytes,
                                        binary_consented=binary, resume=True))

    def _refuse_in_band(self, listener: Listener, key: str, binary: bool) -> None:
        """Refuse a re-attach that names no live session here: upgrade, then an announced close
        (:func:`~bridge.server_end.refuse_reattach`; a 404 reaches a frontend behind the inverting proxy as
        a 500 that it must retry). Logged and counted as any refusal."""
        self.close_connection = True
        label, tunnel_id = self._stats_label(), new_tunnel_id()
        log.info("tunnel %s [%s]: refused %s: %s", tunnel_id, listener.name, self._peer(), NO_SUCH_SESSION,
                 extra=events.mark(Event.OPEN_FAILED, {"tunnel": label, "tunnel_id": tunnel_id, "peer": self._peer(),
                                                       "reason": REFUSED_REATTACH}))
        self.server.registry.stats.open_failed(label, REFUSED_REATTACH)
        try:
            received = self._upgrade(key, binary)
        except OSError:
            return
        refuse_reattach(ServerEndpoint(self.connection, received, listener.options.max_message_bytes,
                                       binary_consented=binary, resume=True))

    def _hand_off(self, handoff: Handoff, record: Reattach) -> None:
        """Pass this connection to the worker that holds its session, and let go of it without closing it."""
        try:
            handoff.send(record, self.connection)
        except OSError as exc:
            raise UpgradeRefused(HTTPStatus.SERVICE_UNAVAILABLE, f"cannot reach the worker that holds this "
                                 f"session: {exc}", {"Retry-After": "1"}) from None
        log.debug("listener %s: %s re-attaches to a session of worker %d: handed over", record.listener,
                  record.peer, handoff.owner(record.session_id))
        self.close_connection = True
        os.close(self.connection.detach())  # the server's shutdown and close after this handler touch nothing

    def _consent_to_resume(self, listener: Listener) -> Session | None:
        """The session of a tunnel whose frontend offered resume, if this listener allows it (its consent
        is the tunnel's first message, sent by the caller)."""
        frontend_buffer = resume.parse_offer(self.headers.get_all(resume.RESUME_HEADER))
        if not listener.options.resume or frontend_buffer is None:
            return None
        handoff = self.server.handoff
        session_id = handoff.new_session_id() if handoff is not None else resume.new_session_id()
        return Session(listener.options.resume_buffer, consented=True, session_id=session_id,
                       peer_buffer=frontend_buffer)

    def _not_found(self) -> None:
        listener = self.server.listener
        if listener.passthrough:
            self._passthrough(listener, listener.passthrough)
            return
        self._refuse(new_tunnel_id(), UpgradeRefused(
            HTTPStatus.NOT_FOUND, f"{self.command} {urlsplit(self.path).path}: not a tcpbridge upgrade"
        ), quiet=True)

    def _is_bridge_upgrade(self) -> bool:
        """A websocket upgrade on a bridge path: a tunnel (or a refusal), never passed through."""
        path = urlsplit(self.path).path
        upgrade = header_tokens([self.headers.get("Upgrade", "")])
        return protocol.route_for_path(path) is not None and "websocket" in upgrade

    def _bridge_route(self) -> str:
        path = urlsplit(self.path).path
        route = protocol.route_for_path(path)
        if route is None or not self._is_bridge_upgrade():
            raise UpgradeRefused(HTTPStatus.NOT_FOUND, f"GET {path}: not a tcpbridge upgrade")
        return route

    def _passthrough(self, listener: Listener, url: str) -> None:
        """Reverse-proxy this request to the listener's HTTP origin: no token, Origin or cap applies (as in Go)."""
        passthrough.serve(self, url, pool=self.server.origin_pool, options=listener.options, listener=listener.name,
                          registry=self.server.registry)

    def _target(self, listener: Listener, route: str) -> Address:
        target = listener.routes.get(route)
        if target is None:
            known = ", ".join(sorted(listener.routes)) or "none"
            raise UpgradeRefused(HTTPStatus.NOT_FOUND, f"no route {route!r} on this listener (routes: {known})")
        return target

    def _check_upgrade(self) -> str:
        if "upgrade" not in header_tokens([self.headers.get("Connection", "")]):
            raise UpgradeRefused(HTTPStatus.BAD_REQUEST, "Connection header lacks 'Upgrade'")
        if self.headers.get("Sec-WebSocket-Version", "").strip() != "13":
            raise UpgradeRefused(HTTPStatus.UPGRADE_REQUIRED, "unsupported websocket version (need 13)",
                                 {"Sec-WebSocket-Version": "13"})
        key = self.headers.get("Sec-WebSocket-Key", "").strip()
        try:
            valid = len(base64.b64decode(key, validate=True)) == 16
        except (binascii.Error, ValueError):
            valid = False
        if not valid:
            raise UpgradeRefused(HTTPStatus.BAD_REQUEST, "missing or invalid Sec-WebSocket-Key")
        return key

    def _connect(self, listener: Listener, route: str, target: Address) -> socket.socket:
        try:
            sock = socket.create_connection((target.host, target.port), timeout=listener.options.connect_timeout)
        except TimeoutError:
            reason = f"timed out after {listener.options.connect_timeout:g} s"
            raise UpgradeRefused(HTTPStatus.BAD_GATEWAY, f"route {route!r}: cannot connect to {target}: {reason}") \
                from None
        except OSError as exc:
            raise UpgradeRefused(HTTPStatus.BAD_GATEWAY, f"route {route!r}: cannot connect to {target}: "
                                 f"{describe_error(exc)}") \
                from None
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _upgrade(self, key: str, binary: bool) -> bytes:
        """Send the 101 (consenting to binary messages if ``binary``); return the bytes the client sent after it."""
        self.connection.sendall(bridge_upgrade_response(key, binary))
        received = self._buffered_request_bytes()
        self.connection.settimeout(None)  # the handshake timeout must not end an idle tunnel
        return received

    def _buffered_request_bytes(self) -> bytes:
        """Take what the handler's buffered reader read past the request headers."""
        sock = self.connection
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            return self.rfile.read1(RECV_CHUNK) or b""
        except OSError:
            return b""
        finally:
            sock.settimeout(timeout)

    def _refuse(self, tunnel_id: str, refused: UpgradeRefused, quiet: bool = False) -> None:
        level = logging.DEBUG if quiet else refused.level
        label, reason = self._stats_label(), f"http_{int(refused.status)}"
        facts = {"tunnel": label, "tunnel_id": tunnel_id, "peer": self._peer(), "reason": reason}
        log.log(level, "tunnel %s [%s]: refused %s: %d %s", tunnel_id, self.server.listener.name,
                self._peer(), refused.status, refused.detail,
                extra=events.mark(None if quiet else Event.OPEN_FAILED, facts))
        if not quiet:  # quiet: a request that was no bridge upgrade at all
            self.server.registry.stats.open_failed(label, reason)
        if refused.headers.get("Connection", "").lower() == "close":
            self.close_connection = True
        self.wfile.write(http1.plain_answer(refused.status, refused.body, list(refused.headers.items()),
                                            server=SERVER, head_only=self.command == "HEAD"))

    def _drain(self) -> None:
        """Read and drop what the client still sends, within bounds, then let the connection close.

        Closing a socket with unread bytes makes the kernel send a reset, which can
        destroy our answer before the client has read it.
        """
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + DRAIN_SECONDS
            left = DRAIN_BYTES
            while left > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.connection.settimeout(remaining)
                data = self.rfile.read1(min(left, RECV_CHUNK))
                if not data:
                    break
                left -= len(data)

    def _peer(self) -> str:
        return str(Address(self.client_address[0], self.client_address[1]))

    def _stats_label(self) -> str:
        """``listener/route`` for stats; ``listener/-`` for a route not configured (clients cannot add labels)."""
        listener = self.server.listener
        route = protocol.route_for_path(urlsplit(getattr(self, "path", "")).path)
        return f"{listener.name}/{route if route in listener.routes else '-'}"
