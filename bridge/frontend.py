"""The frontend daemon: local TCP listeners whose connections each get a websocket to a backend.

Each accepted connection is served on its own thread, which opens the websocket
(nothing is read from the client before the backend's 101 arrives) and then
becomes one of the tunnel's two pump threads.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

import websocket
from websocket import ABNF

from bridge import protocol
from bridge.channel import SendLock, close_payload, parse_close_payload, shutdown_socket
from bridge.config import Address, FrontendConfig, FrontendTunnel, changed_fields, redact_url
from bridge.listen import ListenError, bind_listener
from bridge.protocol import CloseCode, MessageDecoder, ProtocolViolation
from bridge.secrets import SecretError, SecretResolver
from bridge.tunnel import ChannelDropped, Closed, Received, Tunnel, TunnelRegistry, new_tunnel_id, reset_on_close

log = logging.getLogger("tcpbridge.frontend")

ACCEPT_BACKOFF = 0.1
#: accept() errors that mean "out of resources for now": back off instead of spinning.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class DialError(Exception):
    """The websocket to the backend could not be opened; the message says why."""


# ---------------------------------------------------------------------------
# The websocket, client side


class ClientChannel:
    """A :class:`~bridge.tunnel.Channel` over a websocket-client connection."""

    def __init__(self, ws: websocket.WebSocket, max_message_bytes: int) -> None:
        if ws.sock is None:
            raise ChannelDropped("websocket is not connected")
        self._ws = ws
        self._sock: socket.socket = ws.sock
        self.send_lock = self._send_lock = SendLock()
        self._decoder = MessageDecoder(max_message_bytes)
        self._in_message = False
        self._binary = False
        self._last_received = time.monotonic()
        self._limit_frame_size(max_message_bytes)

    def _limit_frame_size(self, limit: int) -> None:
        # websocket-client reads a whole frame into memory; refuse oversized ones
        # when their length arrives, before the payload is buffered.
        frame_buffer = self._ws.frame_buffer
        recv_strict = frame_buffer.recv_strict

        def bounded_recv_strict(bufsize: int) -> bytes:
            if bufsize > limit:
                raise ProtocolViolation(
                    CloseCode.MESSAGE_TOO_BIG, f"message larger than max_message_bytes ({limit})"
                )
            return recv_strict(bufsize)

        frame_buffer.recv_strict = bounded_recv_strict  # type: ignore[method-assign]

    def _send(self, payload: bytes, opcode: int) -> None:
        try:
            self._ws.send(payload, opcode)
        except websocket.WebSocketException as exc:
            raise ChannelDropped(str(exc)) from None

    def send_data(self, data: bytes) -> None:
        with self._send_lock.held():
            self._send(protocol.encode(data), ABNF.OPCODE_TEXT)

    def send_end_of_stream(self) -> None:
        with self._send_lock.held():
            self._send(b"", ABNF.OPCODE_TEXT)

    def send_close(self, code: int, reason: str, *, wait: bool = True) -> bool:
        return self._send_lock.try_send(lambda: self._send(close_payload(code, reason), ABNF.OPCODE_CLOSE), wait=wait)

    def send_ping(self) -> bool:
        return self._send_lock.try_send(lambda: self._send(b"tcpbridge", ABNF.OPCODE_PING), wait=False)

    @property
    def last_received(self) -> float:
        return self._last_received

    def receive(self) -> Received:
        while True:
            frame = self._receive_frame()
            opcode = frame.opcode
            if opcode == ABNF.OPCODE_CLOSE:
                return Closed(*parse_close_payload(_bytes(frame.data)))
            if opcode == ABNF.OPCODE_PING:
                with self._send_lock.held():
                    self._send(_bytes(frame.data), ABNF.OPCODE_PONG)
                continue
            if opcode == ABNF.OPCODE_PONG:
                continue
            if opcode == ABNF.OPCODE_CONT:
                if not self._in_message:
                    raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "continuation frame outside a message")
            elif self._in_message:
                raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "new message before the previous one finished")
            else:
                self._binary = opcode == ABNF.OPCODE_BINARY
            self._in_message = not frame.fin
            result = self._decoder.feed(frame.data, binary=self._binary, message_finished=bool(frame.fin))
            if result:
                return result

    def _receive_frame(self) -> ABNF:
        try:
            frame: ABNF = self._ws.recv_frame()  # type: ignore[no-untyped-call]
            self._last_received = time.monotonic()
            return frame
        except websocket.WebSocketPayloadException as exc:
            raise ProtocolViolation(CloseCode.INVALID_DATA, str(exc)) from None
        except websocket.WebSocketProtocolException as exc:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, str(exc)) from None
        except websocket.WebSocketConnectionClosedException:
            raise ChannelDropped("connection closed without a close frame") from None
        except websocket.WebSocketException as exc:
            raise ChannelDropped(str(exc)) from None

    def shutdown(self) -> None:
        shutdown_socket(self._sock)

    def close(self) -> None:
        self._sock.close()


def _open_transport(url: str, timeout: float) -> socket.socket:
    """Connect the TCP (and TLS, for wss://) connection a websocket URL needs.

    Opening it ourselves keeps websocket-client from applying ``http_proxy``
    environment variables behind the user's back.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if secure:
            context = ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise
    return sock


def request_headers(tunnel: FrontendTunnel, secrets: SecretResolver) -> list[str]:
    """The extra upgrade-request header lines of ``tunnel``, secrets read now."""
    try:
        lines = [f"{name}: {secrets.resolve(value)}" for name, value in tunnel.headers]
        if tunnel.basic_auth:
            lines.append(f"Authorization: {secrets.basic_auth(tunnel.basic_auth)}")
    except SecretError as exc:
        raise DialError(f"cannot read a header value: {exc}") from None
    return lines


def dial(tunnel: FrontendTunnel, secrets: SecretResolver) -> websocket.WebSocket:
    """Open the websocket for one connection of ``tunnel``; raise DialError saying why not.

    No Origin header and no extension offer are sent (the Go backend refuses
    both), and the connect timeout is removed once the handshake is done.
    """
    url = tunnel.url
    timeout = tunnel.options.connect_timeout
    header = request_headers(tunnel, secrets)
    sock: socket.socket | None = None
    try:
        sock = transport = _open_transport(url, timeout)
        ws = websocket.WebSocket(skip_utf8_validation=True, enable_multithread=False)
        ws.connect(  # type: ignore[no-untyped-call]
            url,
            socket=sock,
            timeout=timeout,
            header=header,
            suppress_origin=True,
        )
    except websocket.WebSocketBadStatusException as exc:
        _close_quietly(sock)
        raise DialError(f"backend refused the upgrade: {_status(exc)}") from None
    except ssl.SSLCertVerificationError as exc:
        _close_quietly(sock)
        raise DialError(f"TLS certificate verification failed: {exc.verify_message}") from None
    except (TimeoutError, websocket.WebSocketTimeoutException):
        _close_quietly(sock)
        raise DialError(f"timed out after {timeout:g} s (connect_timeout)") from None
    except socket.gaierror as exc:
        raise DialError(f"cannot resolve host: {exc.strerror}") from None
    except OSError as exc:
        _close_quietly(sock)
        raise DialError(exc.strerror.lower() if exc.strerror else str(exc)) from None
    except websocket.WebSocketException as exc:
        _close_quietly(sock)
        raise DialError(f"websocket handshake failed: {exc}") from None
    transport.settimeout(None)
    return ws


def _bytes(data: str | bytes) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else data


def _status(exc: websocket.WebSocketBadStatusException) -> str:
    # Never include the response headers: the Go backend echoes Authorization back.
    status = f"HTTP {exc.status_code} {exc.status_message or ''}".rstrip()
    body = (exc.resp_body or b"").decode("utf-8", "replace").strip().splitlines()
    return f"{status} ({body[0][:200]})" if body else status


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

    def __init__(self, config: FrontendConfig, registry: TunnelRegistry) -> None:
        self.config = config
        self.registry = registry
        self.secrets = SecretResolver()
        self._listeners: dict[str, _Listener] = {}

    def bind(self) -> None:
        """Bind every tunnel's port, or none: raise ListenError on the first that fails."""
        self._listeners = _bind_all({t.name: t for t in self.config.tunnels})

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
        wanted = {t.name: t for t in config.tunnels}
        current = self._listeners
        fresh = _bind_all({name: t for name, t in wanted.items()
                           if name not in current or current[name].tunnel.listen != t.listen})
        changes = []
        for name in [name for name in current if name not in wanted]:
            current.pop(name).close()
            changes.append(f"tunnel {name}: removed (live tunnels finish normally)")
        for name, listener in fresh.items():
            if name in current:
                old = current.pop(name)
                old.close()
                changes.append(f"tunnel {name}: moved from {old.tunnel.listen} to {listener.tunnel.listen}")
            else:
                changes.append(f"tunnel {name}: added")
            current[name] = listener
            self._start(listener)
        for name, listener in current.items():
            changed = changed_fields(listener.tunnel, wanted[name])
            if changed:
                listener.tunnel = wanted[name]
                changes.append(f"tunnel {name}: {', '.join(changed)} changed for new connections")
        self.config = config
        return changes

    def describe(self) -> str:
        return f"{len(self._listeners)} listeners"

    def close_listeners(self) -> None:
        """Stop accepting; live tunnels carry on."""
        for listener in self._listeners.values():
            listener.close()
        self._listeners.clear()

    def _start(self, listener: _Listener) -> None:
        tunnel = listener.tunnel
        threading.Thread(target=self._accept_loop, args=(listener,), name=f"accept-{tunnel.name}", daemon=True).start()
        log.info("tunnel %s: listening on %s -> %s", tunnel.name, _bound(listener.sock), redact_url(tunnel.url))

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
            try:
                threading.Thread(target=self._serve, args=(tunnel, client, peer), daemon=True).start()
            except RuntimeError as exc:  # "can't start new thread": out of threads
                log.error("tunnel %s: cannot serve %s: %s", tunnel.name, _peer(peer), exc)
                reset_on_close(client)
                client.close()

    def _serve(self, tunnel: FrontendTunnel, client: socket.socket, peer: tuple[str, int]) -> None:
        tunnel_id = new_tunnel_id()
        with contextlib.suppress(OSError):  # a client already gone fails later, in the pump
            client.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            ws = dial(tunnel, self.secrets)
        except DialError as exc:
            log.warning("tunnel %s [%s]: cannot open %s for %s: %s",
                        tunnel_id, tunnel.name, redact_url(tunnel.url), _peer(peer), exc)
            reset_on_close(client)
            client.close()
            return
        pump = Tunnel(
            client,
            ClientChannel(ws, tunnel.options.max_message_bytes),
            label=tunnel.name,
            peer=_peer(peer),
            destination=redact_url(tunnel.url),
            options=tunnel.options,
            tcp_role="client",
            tunnel_id=tunnel_id,
        )
        self.registry.run(pump)


def _bind_all(tunnels: dict[str, FrontendTunnel]) -> dict[str, _Listener]:
    """Bind a listener per tunnel, or none: on the first failure close the others and raise."""
    bound: dict[str, _Listener] = {}
    try:
        for name, tunnel in tunnels.items():
            bound[name] = _Listener(tunnel, bind_listener(tunnel.listen, f"tunnel {name!r}"))
    except ListenError:
        for listener in bound.values():
            listener.close()
        raise
    return bound


def _peer(peer: tuple[str, int] | tuple[str, int, int, int]) -> str:
    return str(Address(peer[0], peer[1]))


def _bound(sock: socket.socket) -> str:
    return _peer(sock.getsockname())
