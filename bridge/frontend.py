"""The frontend daemon: local TCP listeners whose connections each get a websocket to a backend.

Each accepted connection is served on its own thread (a pooled one, from
``registry.workers``), which opens the websocket (nothing is read from the client
before the backend's 101 arrives) and then becomes one of the tunnel's two pump
threads.

Why this module is over 450 lines: the frontend daemon is its client endpoint, its dial, and its
listeners' accept-and-serve loop, each small; they share the daemon's options and registry.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bridge import events, frames, handshake, protocol, resume
from bridge.caps import Counts, LocalCounts
from bridge.config import Address, FrontendConfig, FrontendTunnel, TlsOptions, redact_url
from bridge.endpoint import Endpoint
from bridge.events import Event
from bridge.handshake import HandshakeError
from bridge.listen import Binder, ListenError, bind_fresh
from bridge.registry import Opening, TunnelRegistry
from bridge.reload import reconcile
from bridge.secrets import SecretError, SecretResolver
from bridge.session import ResumeRefused, Session
from bridge.sockets import describe_error
from bridge.transport import (
    NAME_MISMATCH_CODES,
    DialError,
    DialFailure,
    DialTimeout,
    choose_proxy,
    open_transport,
    time_left,
    tls_context,
)
from bridge.tunnel import Redial, Tunnel, new_tunnel_id, reset_on_close

log = logging.getLogger("tcpbridge.frontend")

ACCEPT_BACKOFF = 0.1
#: Bytes asked for per recv while the answer to the upgrade arrives (a 101 is ~200 bytes).
RECV_HANDSHAKE = 4096
#: Seconds between two "max_connections reached" warnings of one tunnel.
REFUSAL_LOG_INTERVAL = 1.0
#: accept() errors that mean "out of resources for now": back off instead of spinning.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


# ---------------------------------------------------------------------------
# The websocket, client side


class ClientEndpoint(Endpoint):
    """The client end of a tunnel's websocket, over the socket :func:`dial` opened.

    Frames are read and written by :mod:`bridge.endpoint`: one ``recv`` brings in
    as many frames as have arrived. ``received`` is what arrived right after the 101.

    With ``binary`` (the backend consented to binary messages in its 101) the
    endpoint sends the switch marker at once and binary messages after it, and
    expects the backend's own marker in return (:mod:`bridge.protocol`).
    """

    def __init__(self, sock: socket.socket, max_message_bytes: int, *, binary: bool = False,
                 received: bytes = b"", resume: bool = False) -> None:
        super().__init__(sock, frames.FrameParser(max_message_bytes), max_message_bytes,
                         switch_allowed=binary, received=received, resume=resume)
        if binary:
            with self._send_lock.held():
                self._write_frame(frames.OPCODE_BINARY, b"")  # the switch marker, before anything else
            self.binary = True

    def _frame_bytes(self, opcode: int, payload: bytes) -> bytes:
        return bytes(frames.masked_frame(opcode, payload, os.urandom(4)))  # control frames: bytes already

    def _write_frame(self, opcode: int, payload: bytes) -> None:
        self._sock.sendall(frames.masked_frame(opcode, payload, os.urandom(4)))


# ---------------------------------------------------------------------------
# Dialing: the websocket handshake over a transport from bridge.transport

def request_headers(tunnel: FrontendTunnel, secrets: SecretResolver, session: Session | None = None, *,
                    reattach: bool = False) -> list[str]:
    """The extra upgrade-request header lines of ``tunnel``, secrets read now, and the offer of binary messages;
    with the tunnel's ``session``, its routing key, and (``reattach``) the header that re-attaches to it."""
    try:
        lines = [f"{name}: {secrets.resolve(value)}" for name, value in tunnel.headers]
        if tunnel.basic_auth:
            lines.append(f"Authorization: {secrets.basic_auth(tunnel.basic_auth)}")
    except SecretError as exc:
        raise DialError(f"cannot read a header value: {exc}", DialFailure.SECRET) from None
    if tunnel.options.frames == "auto":
        lines.append(f"{protocol.OFFER_HEADER}: {protocol.OFFER_BINARY}")
    if tunnel.options.resume:
        lines.append(f"{resume.RESUME_HEADER}: {tunnel.options.resume_buffer}")
    if session is not None and session.affinity is not None:
        lines.append(f"{resume.AFFINITY_HEADER}: {session.affinity}")
    if reattach and session is not None and session.id is not None:
        lines.append(f"{resume.SESSION_HEADER}: {session.id}")
    return lines


def offered_session(tunnel: FrontendTunnel) -> Session | None:
    """The session of a tunnel whose dial offered resume (undecided until the backend's first message)."""
    if not tunnel.options.resume:
        return None
    return Session(tunnel.options.resume_buffer, consented=False, affinity=resume.new_affinity())


#: Refusals of a re-attaching dial that trying again cannot change: the session is unknown or expired
#: (404), or the token or Origin no longer passes (401, 403).
RESUME_REFUSALS = frozenset({401, 403, 404})


def redial_for(tunnel: FrontendTunnel, session: Session, secrets: SecretResolver) -> Redial:
    """The :data:`~bridge.tunnel.Redial` of a resumable tunnel: the same dial, headers (secrets read again),
    token and TLS checks, plus the session header."""
    def redial() -> Endpoint:
        if session.id is None:
            raise ResumeRefused("the backend never consented to resume")
        try:
            return open_endpoint(tunnel, secrets, session=session, reattach=True)
        except DialError as exc:
            if exc.status in RESUME_REFUSALS:
                raise ResumeRefused(str(exc)) from None
            raise
    return redial


def open_endpoint(tunnel: FrontendTunnel, secrets: SecretResolver,
                 environ: Mapping[str, str] = os.environ, *, session: Session | None = None,
                 reattach: bool = False) -> ClientEndpoint:
    """Dial one websocket of ``tunnel`` (see :func:`dial`) and wrap it, binary if the backend consented;
    ``session``: the tunnel's resumable session (``reattach``: re-attach to it)."""
    opened = dial(tunnel, secrets, environ, session=session, reattach=reattach)
    consent = tunnel.options.frames == "auto" and protocol.binary_accepted(
        [name for name, _ in tunnel.headers], opened.headers)
    try:
        return ClientEndpoint(opened.sock, tunnel.options.max_message_bytes, binary=consent, received=opened.received,
                              resume=tunnel.options.resume)
    except OSError as exc:
        _close_quietly(opened.sock)
        raise DialError(f"websocket dropped right after the handshake: {describe_error(exc)}",
                        DialFailure.CONNECT_ERROR) from None


@dataclass(frozen=True)
class Opened:
    """A websocket whose handshake is done: its socket, the 101's headers, the bytes that came after the 101."""

    sock: socket.socket
    headers: list[tuple[str, str]]
    received: bytes


def dial(tunnel: FrontendTunnel, secrets: SecretResolver, environ: Mapping[str, str] = os.environ, *,
         session: Session | None = None, reattach: bool = False) -> Opened:
    """Open the websocket for one connection of ``tunnel``; raise DialError saying why not.

    No Origin header and no extension offer are sent (the Go backend refuses
    both), and the connect timeout is removed once the handshake is done.

    ``connect_timeout`` is one deadline for the whole dial, taken here at the start:
    TCP connect, the proxy's CONNECT answer, TLS and the websocket upgrade together;
    when it passes the DialError says in which of them.
    """
    url = tunnel.url
    timeout = tunnel.options.connect_timeout
    deadline = time.monotonic() + timeout
    header = request_headers(tunnel, secrets, session, reattach=reattach)
    proxy = choose_proxy(url, tunnel.proxy, environ)
    via = f" via proxy {proxy}" if proxy else ""
    sock: socket.socket | None = None
    try:
        sock = open_transport(url, tunnel.tls, proxy, deadline)
        opened = _handshake(sock, url, header, deadline)
    except DialTimeout as exc:
        _close_quietly(sock)
        raise DialError(f"timed out after {timeout:g} s (connect_timeout) {exc.step}{'' if exc.at_proxy else via}",
                        DialFailure.TIMEOUT) from None
    except DialError:
        _close_quietly(sock)
        raise
    except HandshakeError as exc:
        _close_quietly(sock)
        raise DialError(f"websocket handshake failed: {exc}{via}", DialFailure.HANDSHAKE) from None
    except ssl.SSLCertVerificationError as exc:
        _close_quietly(sock)
        raise DialError(f"TLS certificate verification failed: {exc.verify_message}{_trusted(exc, tunnel.tls)}{via}",
                        DialFailure.TLS) from None
    except ssl.SSLError as exc:
        _close_quietly(sock)
        raise DialError(f"TLS handshake failed: {describe_error(exc)}{via}", DialFailure.TLS) from None
    except TimeoutError:
        _close_quietly(sock)
        raise DialError(f"timed out after {timeout:g} s (connect_timeout){via}", DialFailure.TIMEOUT) from None
    except socket.gaierror as exc:
        raise DialError(f"cannot resolve host: {exc.strerror}", DialFailure.DNS) from None
    except OSError as exc:
        _close_quietly(sock)
        refused = isinstance(exc, ConnectionRefusedError)
        raise DialError(f"{describe_error(exc)}{via}",
                        DialFailure.CONNECT_REFUSED if refused else DialFailure.CONNECT_ERROR) from None
    sock.settimeout(None)
    return opened


def _handshake(sock: socket.socket, url: str, header: list[str], deadline: float) -> Opened:
    """Send the upgrade request for ``url`` over ``sock`` and read the answer (:mod:`bridge.handshake`).

    The request must be sent and the whole answer arrive by ``deadline`` (DialTimeout
    naming the step if not); a refusal raises DialError naming its status.
    """
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    key = handshake.new_key()
    host = handshake.host_header(parts.hostname or "", parts.port or (443 if secure else 80), secure=secure)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    step = "sending the websocket upgrade request"
    try:
        sock.settimeout(time_left(deadline, step))
        sock.sendall(handshake.upgrade_request(path, host, key, header))
    except TimeoutError:
        raise DialTimeout(step) from None
    received = b""
    try:
        while (split := handshake.split_head(received)) is None:
            received += _recv_by(sock, deadline, "the backend closed the connection before answering the upgrade")
    except TimeoutError:
        raise DialTimeout("waiting for the backend's answer to the websocket upgrade") from None
    head, rest = split
    response = handshake.parse_response(head)
    if response.status != 101:
        body = _body(sock, response, rest, deadline)
        raise DialError(f"backend refused the upgrade: {handshake.refusal_summary(response, body)}",
                        DialFailure.REFUSED, response.status)
    handshake.check_switch(response, key)
    return Opened(sock, response.headers, rest)


def _recv_by(sock: socket.socket, deadline: float, eof: str) -> bytes:
    """One recv that gives up at ``deadline`` (TimeoutError); an orderly close raises HandshakeError(``eof``)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    sock.settimeout(left)
    data = sock.recv(RECV_HANDSHAKE)
    if not data:
        raise HandshakeError(eof)
    return data


def _body(sock: socket.socket, response: handshake.Response, body: bytes, deadline: float) -> bytes:
    """As much of a refusal's body as its summary needs: what came with the head, then up to its length."""
    wanted = min(response.content_length() or 0, handshake.MAX_REFUSAL_BODY)
    with contextlib.suppress(OSError, HandshakeError):
        while len(body) < wanted:
            body += _recv_by(sock, deadline, "")
    return body


def _trusted(exc: ssl.SSLCertVerificationError, tls: TlsOptions) -> str:
    """What the certificate was checked against, unless only its name was wrong."""
    if exc.verify_code in NAME_MISMATCH_CODES:
        return ""
    return f" (checked against tls ca_file {tls.ca_file})" if tls.ca_file else \
        " (checked against the system CAs; set tls ca_file for a private CA)"


def _close_quietly(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()


# ---------------------------------------------------------------------------
# The daemon


class _Listener:
    """One tunnel's listening socket and accept thread.

    ``tunnel`` is read afresh for every accepted connection, so a reload swaps
    it in place: new connections get the new settings, live tunnels keep theirs.
    """

    def __init__(self, tunnel: FrontendTunnel, sock: socket.socket) -> None:
        self.tunnel = tunnel
        self.sock = sock
        self.stopping = threading.Event()

    def close(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        self.sock.close()


class Frontend:
    """Accepts connections on every tunnel's port and carries each over its own websocket."""

    def __init__(self, config: FrontendConfig, registry: TunnelRegistry, binder: Binder = bind_fresh,
                 counts: Counts | None = None) -> None:
        self.config = config
        self.registry = registry
        self.binder = binder
        self.counts: Counts = counts or LocalCounts()  # connections per tunnel, for max_connections
        self.secrets = SecretResolver()
        self._listeners: dict[str, _Listener] = {}
        self._slots_lock = threading.Lock()
        self._refused: dict[str, tuple[float, int]] = {}  # name -> (last warning, refusals since)

    def bind(self) -> None:
        """Bind every tunnel's port, or none: raise ListenError on the first that fails."""
        self._listeners = self._bind_all({t.name: t for t in self.config.tunnels})

    def start(self) -> None:
        """Start one accept thread per bound listener."""
        for listener in self._listeners.values():
            self._start(listener)

    def apply(self, config: FrontendConfig) -> list[str]:
        """Switch to ``config`` (a reload); return one line per change.

        All new ports are bound before anything changes: if one fails, ListenError
        is raised and the running configuration is untouched. Live tunnels keep
        the settings they started with.
        """
        changes = reconcile(
            self._listeners, {tunnel.name: tunnel for tunnel in config.tunnels},
            kind="tunnel", settings_of=lambda listener: listener.tunnel, replace=_replace_tunnel,
            bind_all=self._bind_all, start=self._start, stop=_Listener.close,
        )
        self.config = config
        return changes

    @staticmethod
    def listening(config: FrontendConfig) -> list[tuple[str, Address, str]]:
        """The ports ``config`` listens on: (tunnel name, address, what to call it in errors)."""
        return [(t.name, t.listen, f"tunnel {t.name!r}") for t in config.tunnels]

    def describe(self) -> str:
        return f"{len(self._listeners)} listeners"

    def listeners(self) -> list[dict[str, Any]]:
        """Each tunnel's listener, for ``tcpbridge status`` (``labels``: its tunnel label in stats and metrics)."""
        return [{"name": name, "listen": str(listener.tunnel.listen), "to": redact_url(listener.tunnel.url),
                 "labels": [name]} for name, listener in list(self._listeners.items())]

    def close_listeners(self) -> None:
        """Stop accepting; live tunnels carry on."""
        for listener in self._listeners.values():
            listener.close()
        self._listeners.clear()

    def _bind_all(self, tunnels: dict[str, FrontendTunnel]) -> dict[str, _Listener]:
        """Bind a listener per tunnel, or none: on the first failure close the others and raise."""
        bound: dict[str, _Listener] = {}
        try:
            for name, tunnel in tunnels.items():
                bound[name] = _Listener(tunnel, self.binder(name, tunnel.listen, f"tunnel {name!r}"))
        except ListenError:
            for listener in bound.values():
                listener.close()
            raise
        return bound

    def _start(self, listener: _Listener) -> None:
        tunnel = listener.tunnel
        threading.Thread(target=self._accept_loop, args=(listener,), name=f"accept-{tunnel.name}", daemon=True).start()
        proxy = choose_proxy(tunnel.url, tunnel.proxy, os.environ)
        log.info("tunnel %s: listening on %s -> %s%s", tunnel.name, _bound(listener.sock), redact_url(tunnel.url),
                 f" via proxy {proxy}" if proxy else "")
        _check_tls(tunnel)

    def _accept_loop(self, listener: _Listener) -> None:
        while not listener.stopping.is_set():
            try:
                client, peer = listener.sock.accept()
            except OSError as exc:
                if listener.stopping.is_set():
                    return
                name = listener.tunnel.name
                if exc.errno in RESOURCE_ERRNOS:
                    log.warning("tunnel %s: cannot accept: %s; retrying in %.1f s", name, exc.strerror, ACCEPT_BACKOFF)
                    time.sleep(ACCEPT_BACKOFF)
                elif exc.errno != errno.ECONNABORTED:
                    log.error("tunnel %s: accept failed: %s", name, exc)
                    time.sleep(ACCEPT_BACKOFF)
                continue
            tunnel = listener.tunnel
            if not self._take_slot(tunnel):
                self._refuse(tunnel, client, peer)
                continue
            opening = self.registry.opening(client)  # from here until its tunnel runs, a drain waits for it
            try:
                self.registry.workers.submit(self._serve, tunnel, client, peer, opening, name=f"serve-{tunnel.name}")
            except RuntimeError as exc:  # "can't start new thread": out of threads
                self.registry.end_opening(opening)
                self._release_slot(tunnel)
                log.error("tunnel %s: cannot serve %s: %s", tunnel.name, _peer(peer), exc)
                reset_on_close(client)
                client.close()

    def _take_slot(self, tunnel: FrontendTunnel) -> bool:
        """Count a new connection of ``tunnel`` (dialling or running), unless its ``max_connections``
        are all in use (in every worker together)."""
        return self.counts.try_acquire(tunnel.name, tunnel.max_connections)

    def _release_slot(self, tunnel: FrontendTunnel) -> None:
        self.counts.release(tunnel.name)

    def _refuse(self, tunnel: FrontendTunnel, client: socket.socket, peer: tuple[str, int]) -> None:
        """Reset a connection over the cap at once; warn at most once a second per tunnel."""
        reset_on_close(client)
        client.close()
        self.registry.stats.open_failed(tunnel.name, "max_connections")
        now = time.monotonic()
        with self._slots_lock:
            last, since = self._refused.get(tunnel.name, (-math.inf, 0))
            if now - last < REFUSAL_LOG_INTERVAL:
                self._refused[tunnel.name] = (last, since + 1)
                return
            self._refused[tunnel.name] = (now, 0)
        more = f" ({since} more refused since the previous warning)" if since else ""
        facts = {"tunnel": tunnel.name, "peer": _peer(peer), "destination": redact_url(tunnel.url),
                 "reason": "max_connections"}
        log.warning("tunnel %s: refused %s: max_connections (%d) reached, connection reset%s",
                    tunnel.name, _peer(peer), tunnel.max_connections, more,
                    extra=events.mark(Event.OPEN_FAILED, facts))

    def _serve(self, tunnel: FrontendTunnel, client: socket.socket, peer: tuple[str, int], opening: Opening) -> None:
        try:
            with opening:  # ended by registry.run as it registers the tunnel, or when the dial failed
                self._serve_counted(tunnel, client, peer)
        finally:
            self._release_slot(tunnel)

    def _serve_counted(self, tunnel: FrontendTunnel, client: socket.socket, peer: tuple[str, int]) -> None:
        tunnel_id = new_tunnel_id()
        accepted = time.monotonic()
        with contextlib.suppress(OSError):  # a client already gone fails later, in the pump
            client.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = offered_session(tunnel)
        try:
            websocket = open_endpoint(tunnel, self.secrets, session=session)
        except DialError as exc:
            facts = events.tunnel_facts(tunnel.name, tunnel_id, _peer(peer), redact_url(tunnel.url))
            log.warning("tunnel %s [%s]: cannot open %s for %s: %s",
                        tunnel_id, tunnel.name, redact_url(tunnel.url), _peer(peer), exc,
                        extra=events.mark(Event.OPEN_FAILED, {**facts, "reason": exc.label}))
            self.registry.stats.open_failed(tunnel.name, exc.label)
            reset_on_close(client)
            client.close()
            return
        self.registry.stats.handshake(tunnel.name, time.monotonic() - accepted)
        pump = Tunnel(
            client,
            websocket,
            label=tunnel.name,
            peer=_peer(peer),
            destination=redact_url(tunnel.url),
            options=tunnel.options,
            tcp_role="client",
            tcp_first=True,  # most clients speak first (ssh, postgres, redis, http)
            tunnel_id=tunnel_id,
            session=session,
            redial=redial_for(tunnel, session, self.secrets) if session is not None else None,
        )
        self.registry.run(pump)


def _replace_tunnel(listener: _Listener, tunnel: FrontendTunnel) -> None:
    previous, listener.tunnel = listener.tunnel, tunnel
    if (previous.backend, previous.tls) != (tunnel.backend, tunnel.tls):
        _check_tls(tunnel)


def _check_tls(tunnel: FrontendTunnel) -> None:
    """Say at start (and reload) what is wrong or unsafe with a wss:// tunnel's TLS settings."""
    if urlsplit(tunnel.url).scheme != "wss":
        return
    if not tunnel.tls.verify:
        log.warning("tunnel %s: tls verify is off: the certificate of %s is not checked, so anyone on the path "
                    "can read and change this tunnel's traffic", tunnel.name, redact_url(tunnel.url))
    try:
        tls_context(tunnel.tls)
    except DialError as exc:
        log.error("tunnel %s: %s; its connections will fail until this is fixed", tunnel.name, exc)


def _peer(peer: tuple[str, int] | tuple[str, int, int, int]) -> str:
    return str(Address(peer[0], peer[1]))


def _bound(sock: socket.socket) -> str:
    return _peer(sock.getsockname())
