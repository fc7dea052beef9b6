"""HTTP passthrough on the backend: every request that is not a bridge upgrade goes to an HTTP origin.

Behind the inverting proxy the agent sends *all* of a VM's HTTP traffic to one
port, so the backend stands in front of the real application (a notebook server,
say), as the Go backend does with ``httputil.NewSingleHostReverseProxy``. This
module is that reverse proxy, run on the connection thread that read the request
(:class:`Client`, the backend's request handler):

* the request line, ``Host`` (as the client sent it, like Go's default Director)
  and the end-to-end headers go to the origin over HTTP/1.1; hop-by-hop headers
  (``Connection`` and those it names, ``Keep-Alive``, ``Proxy-*``, ``TE`` except
  ``trailers``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``) are dropped both
  ways (RFC 9110 section 7.6.1); ``X-Forwarded-For`` gets the client's address
  appended, ``X-Forwarded-Host``/``-Proto`` are added unless present;
* bodies stream both ways in pieces of at most :data:`PIECE` bytes, never
  buffered whole: ``Content-Length`` bodies are copied, chunked ones re-chunked
  (trailers kept); a request body is sent by a second thread while this one
  reads the answer, so an origin that answers while it reads cannot deadlock;
* each exchange with the origin is framed by h11 in the client role
  (:class:`OriginExchange`): the request it sends, and the answer it reads,
  with its 1xx answers, chunked bodies, trailers, bodies that end at the close,
  and whether the connection may carry another; an answer h11 cannot frame is
  a 502 (a cut connection once its head went out). The client's side is framed
  by h11 too (server role, :class:`_ClientExchange`): the request's body, read
  from the front door's reader no further than its end, and every answer;
* connections to the origin are kept alive and reused through a small
  per-listener :class:`OriginPool`. It is ours: urllib3's pool (the well-kept
  one) hands out ``http.client`` connections that parse answers themselves and
  cannot send a body while an early answer is read, and h11 keeps no sockets;
* an ``Upgrade`` request (a notebook's kernel websocket) goes to the origin too,
  and after the origin's 101 the two sockets are spliced, bytes as-is, by the
  tunnels' own pump (:class:`~bridge.tunnel.Tunnel`, with the origin's connection
  as a :class:`~bridge.raw_endpoint.RawEndpoint`): a FIN passed on as a half-close,
  a reset as a reset, the listener's timeouts, counted under :data:`SPLICED_ROUTE`;
* an unreachable origin gets a 502 whose text names the origin and the reason,
  and one warning line in the log (504 when it accepts but does not answer).

No authentication is applied here, as in Go: the inverting proxy authenticates
users itself, and the listener's ``token`` guards bridge upgrades only.

Why this module is over 450 lines: :class:`Exchange` is one request's whole life (checks, the retry
of a reused connection, the body thread, informational answers, early answers, the splice), and
reads best in one place; the origin's side is :mod:`bridge.origin`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from io import BufferedIOBase
from typing import Protocol, cast
from urllib.parse import urlsplit

import h11

from bridge import http1
from bridge.config import Address, TunnelOptions
from bridge.handshake import header_tokens
from bridge.origin import (
    MAX_LINE,
    ORIGIN_TIMEOUT,
    PIECE,
    Headers,
    NoAnswer,
    OriginAnswer,
    OriginConnection,
    OriginExchange,
    OriginPool,
    PassthroughError,
    answer_of,
    fields,
    origin_of,
)
from bridge.raw_endpoint import RawEndpoint
from bridge.registry import TunnelRegistry
from bridge.sockets import describe_error
from bridge.tunnel import Tunnel

log = logging.getLogger("tcpbridge.passthrough")

#: The route part of a spliced connection's label (``listener/(passthrough)``) in logs, status and
#: metrics; no route name can take this form.
SPLICED_ROUTE = "(passthrough)"
MAX_INFORMATIONAL = 16
#: After the answer, how long a request body still being sent may take before the connection is dropped.
BODY_GRACE_SECONDS = 2.0
#: At most this much of a request body that will not be passed on is read and dropped before closing.
DRAIN_BYTES = 1024 * 1024

HOP_BY_HOP = frozenset({"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"})
#: Not forwarded in a trailer section: framing, routing and hop-by-hop fields.
NOT_IN_TRAILERS = HOP_BY_HOP | {"content-length", "host", "content-type", "content-encoding"}
REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})



class Client(Protocol):
    """The client connection a request arrived on, with its parsed head (the backend's request handler).
    ``close_connection``: set when the connection must not carry another request."""

    command: str
    path: str
    request_version: str
    #: The request's head as it arrived, through its empty line.
    request_head: bytes
    headers: http1.Headers
    close_connection: bool

    @property
    def rfile(self) -> BufferedIOBase: ...

    @property
    def wfile(self) -> BufferedIOBase: ...

    @property
    def connection(self) -> socket.socket: ...

    @property
    def client_address(self) -> tuple[str, int]: ...


class _ClientGone(Exception):
    """The client's connection failed or timed out (nothing more can be told to it)."""


# ---------------------------------------------------------------------------
# Message framing


@dataclass
class _Framing:
    """How a request body is delimited: ``kind`` is "none", "length" or "chunked"."""

    kind: str
    length: int = 0


def _clean(value: str) -> str:
    """A header value as one line (obsolete line folding becomes a space)."""
    return " ".join(value.replace("\r", "\n").split("\n")).strip() if ("\r" in value or "\n" in value) \
        else value.strip()


def _end_to_end(items: list[tuple[str, str]], drop: set[str]) -> Headers:
    """``items`` without hop-by-hop fields, those named in ``Connection``, ``Proxy-*`` and ``drop``."""
    named = set(header_tokens([value for name, value in items if name.lower() == "connection"]))
    kept: Headers = []
    for name, value in items:
        low = name.lower()
        if low in HOP_BY_HOP or low in named or low in drop or low.startswith("proxy-"):
            continue
        kept.append((name, _clean(value)))
    return kept


class _ClientExchange:
    """The client's side of one request, framed by h11 in the server role: the request's body comes in
    (:meth:`body`) while the answer goes out (:meth:`send`), on two threads, so every h11 call is made
    under one lock, never held while waiting on a socket.

    The body is read from the front door's reader no further than its end, so what follows it there (a
    pipelined request) stays for the front door. :meth:`body` raises EOFError for a body cut short and
    ValueError for malformed framing, and fills :attr:`trailers` at the end with those fit to forward.
    """

    def __init__(self, head: bytes, rfile: BufferedIOBase, wfile: BufferedIOBase) -> None:
        self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_LINE)
        self._lock = threading.Lock()
        self._http.receive_data(head)
        if not isinstance(self._http.next_event(), h11.Request):
            raise ValueError("the request head does not parse again")
        # The front door's reader is a BufferedReader: peek() shows what a chunked body's end may share
        # with the next request without taking it.
        self._rfile = cast(io.BufferedReader, rfile)
        self._wfile = wfile
        self._eof = False
        #: Whether any byte of the answer went to the client.
        self.answered = False
        self.trailers: Headers = []

    def send(self, *events: h11.Event) -> None:
        """Send ``events`` to the client: _ClientGone if its connection fails, PassthroughError (502) if h11
        cannot frame them (an answer that contradicts itself)."""
        try:
            with self._lock:
                data = b"".join(self._http.send(event) or b"" for event in events)
        except h11.LocalProtocolError as exc:
            raise PassthroughError(HTTPStatus.BAD_GATEWAY, f"the answer cannot be passed on: {exc}") from None
        try:
            self._wfile.write(data)
        except OSError as exc:
            raise _ClientGone(describe_error(exc)) from None
        self.answered = True

    @property
    def reusable(self) -> bool:
        """Whether the request and its answer are both complete and the connection may carry another."""
        with self._lock:
            return self._http.our_state is h11.DONE and self._http.their_state is h11.DONE

    def finish_bodyless(self) -> None:
        """A request without a body is complete as it stands."""
        with self._lock:
            if not isinstance(self._http.next_event(), h11.EndOfMessage):
                raise ValueError("a request without a body has one")

    def body(self, length: int | None) -> Iterator[bytes]:
        """The body's pieces; ``length``: its Content-Length, None when chunked."""
        left = length
        fed = 0  # bytes h11 holds that are still in the reader (peeked, not taken)
        while True:
            try:
                with self._lock:
                    event = self._http.next_event()
                    trailing = len(self._http.trailing_data[0])
            except h11.RemoteProtocolError as exc:
                raise (EOFError if self._eof else ValueError)(str(exc)) from None
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._rfile.read(fed - trailing)
                fields = ((n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers.raw_items())
                self.trailers[:] = [(name, value) for name, value in fields if name.lower() not in NOT_IN_TRAILERS]
                return
            else:  # NEED_DATA: h11 took everything it was given
                self._rfile.read(fed)
                fed = 0
                if left is not None:  # a length is known: never read past it
                    data = self._rfile.read1(min(left, PIECE)) if left else b""
                    left -= len(data)
                else:
                    data = self._rfile.peek(PIECE)[:PIECE]
                    fed = len(data)
                self._eof = not data
                with self._lock:
                    self._http.receive_data(data)


def _take_buffered(rfile: BufferedIOBase, sock: socket.socket) -> bytes:
    """What ``rfile`` already read from ``sock`` past the message, without waiting for more."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return rfile.read1(PIECE) or b""
    except OSError:
        return b""
    finally:
        sock.settimeout(timeout)


# ---------------------------------------------------------------------------
# One exchange


class _BodySender:
    """Copies the request body from the client to the origin on its own thread."""

    def __init__(self, source: Iterator[bytes], trailers: Headers, exchange: OriginExchange) -> None:
        self._source = source
        self._trailers = trailers
        self._exchange = exchange
        self.complete = False
        self.client_error: str | None = None
        self.origin_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="passthrough-body", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                try:
                    data = next(self._source, None)
                except (OSError, ValueError, EOFError) as exc:
                    self.client_error = str(exc) or type(exc).__name__
                    self._exchange.conn.abort()  # the origin must not take a cut body for a whole one
                    return
                if data is None:
                    break
                self._exchange.send(h11.Data(data=data))
            self._exchange.send(h11.EndOfMessage(headers=fields(self._trailers)))
            self.complete = True
        except OSError as exc:
            self.origin_error = describe_error(exc)
        except h11.LocalProtocolError as exc:
            self.origin_error = str(exc)
            self._exchange.conn.abort()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


class Exchange:
    """One request passed through to the origin, and its answer passed back."""

    def __init__(self, handler: Client, url: str, *, pool: OriginPool, options: TunnelOptions,
                 listener: str, registry: TunnelRegistry) -> None:
        self.handler = handler
        self.registry = registry
        self.rfile = handler.rfile
        self.url = url
        self.origin = origin_of(url)
        self.pool = pool
        self.options = options
        self.listener = listener
        self.client_sock: socket.socket = handler.connection
        #: The client's side of the exchange (h11, server role).
        self.client = _ClientExchange(handler.request_head, handler.rfile, handler.wfile)
        self.sender: _BodySender | None = None

    # -- the request --------------------------------------------------------

    def _request_framing(self) -> _Framing:
        """How the request's body is delimited. The front door admitted only unambiguous framing (one
        agreed Content-Length, or chunked alone: :mod:`bridge.request_rules`, h11), so nothing is left to refuse."""
        headers = self.handler.headers
        if headers.get_all("Transfer-Encoding"):
            return _Framing("chunked")
        lengths = {item.strip() for value in headers.get_all("Content-Length") for item in value.split(",")}
        return _Framing("length", int(lengths.pop())) if lengths else _Framing("none")

    def _target(self) -> str:
        path = self.handler.path
        if path.startswith("/") or (path == "*" and self.handler.command == "OPTIONS"):
            return path
        parts = urlsplit(path)
        if parts.scheme in ("http", "https") and parts.netloc:
            return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        raise PassthroughError(HTTPStatus.BAD_REQUEST, "request target is neither a path nor an absolute URL")

    def _upgrade(self) -> str | None:
        headers = self.handler.headers
        if "upgrade" not in header_tokens(headers.get_all("Connection")):
            return None
        values = headers.get_all("Upgrade")
        return _clean(", ".join(values)) or None

    def _request(self, framing: _Framing, upgrade: str | None) -> h11.Request:
        handler = self.handler
        incoming = list(handler.headers.items())
        drop = {"content-length", "x-forwarded-for"}
        if handler.headers.get("Expect").strip().lower() == "100-continue":
            drop.add("expect")  # the front door has already told the client to go on
        headers = _end_to_end(incoming, drop)
        names = {name.lower() for name, _ in headers}
        if "host" not in names:
            headers.insert(0, ("Host", str(self.origin) if self.origin.port != 80 else self.origin.host))
        prior = [_clean(value) for value in handler.headers.get_all("X-Forwarded-For")]
        headers.append(("X-Forwarded-For", ", ".join([*prior, str(handler.client_address[0])])))
        host = handler.headers.get("Host")
        if "x-forwarded-host" not in names and host:
            headers.append(("X-Forwarded-Host", _clean(host)))
        if "x-forwarded-proto" not in names:
            headers.append(("X-Forwarded-Proto", "http"))
        if "trailers" in header_tokens(handler.headers.get_all("TE")):
            headers.append(("TE", "trailers"))
        if framing.kind == "length":
            headers.append(("Content-Length", str(framing.length)))
        elif framing.kind == "chunked":
            headers.append(("Transfer-Encoding", "chunked"))
        if upgrade:
            headers += [("Connection", "Upgrade"), ("Upgrade", upgrade)]
        try:
            return h11.Request(method=handler.command.encode("ascii"), target=self._target().encode("latin-1"),
                               headers=fields(headers))
        except h11.LocalProtocolError as exc:
            raise PassthroughError(HTTPStatus.BAD_REQUEST, f"cannot be passed on: {exc}") from None

    # -- the answer ---------------------------------------------------------

    # -- the whole exchange -------------------------------------------------

    def run(self) -> None:
        handler = self.handler
        try:
            if handler.command == "CONNECT":
                raise PassthroughError(HTTPStatus.NOT_IMPLEMENTED, "CONNECT is not passed through")
            framing = self._request_framing()
            upgrade = self._upgrade()
            request = self._request(framing, upgrade)
            if framing.kind == "none":
                self.client.finish_bodyless()
        except PassthroughError as exc:
            handler.close_connection = True
            self._refuse(exc, log_level=logging.INFO)
            self._drop_request_body()
            return
        conn: OriginConnection | None = None
        try:
            conn = self._exchange(request, framing, upgrade)
        except PassthroughError as exc:
            if self.client.answered:
                log.warning("listener %s: passthrough %s %s to %s cut short: %s", self.listener, handler.command,
                            self._path(), self.url, exc.reason)
                handler.close_connection = True
            else:
                unread = framing.kind != "none" and not (self.sender is not None and self.sender.complete)
                if unread:  # what is left of the body must not be read as the next request
                    handler.close_connection = True
                self._refuse(exc, log_level=logging.WARNING)
                if unread:
                    self._drop_request_body()
        except _ClientGone as exc:
            log.debug("listener %s: passthrough client %s went away: %s", self.listener, self._peer(), exc)
            handler.close_connection = True
        finally:
            if conn is not None:
                conn.close()
            if not self.client.reusable:
                handler.close_connection = True

    def _drop_request_body(self) -> None:
        """Before a connection with an unread request body closes: read and drop what the client still sends.

        Bounded (:data:`DRAIN_BYTES`, :data:`BODY_GRACE_SECONDS`): closing a socket with unread
        bytes makes the kernel send a reset, which can destroy the answer before the client read it.
        """
        sock = self.client_sock
        if self.sender is not None and not self.sender.join(0):
            with contextlib.suppress(OSError):  # the sender still reads the body: stop it instead
                sock.shutdown(socket.SHUT_RD)
            self.sender.join(BODY_GRACE_SECONDS)
            return
        with contextlib.suppress(OSError, ValueError):
            self.handler.wfile.flush()
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + BODY_GRACE_SECONDS
            left = DRAIN_BYTES
            while left > 0:  # bounded by bytes and by time
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                sock.settimeout(remaining)
                data = self.rfile.read1(min(left, PIECE))
                if not data:
                    break
                left -= len(data)

    def _exchange(self, request: h11.Request, framing: _Framing, upgrade: str | None) -> OriginConnection | None:
        """Run the exchange; return the origin connection if it must be closed, None if it went back to the pool."""
        handler = self.handler
        replayable = handler.command in REPLAYABLE and framing.kind == "none"
        for attempt in range(2):  # one retry: a reused connection the origin had just closed
            conn, reused = self.pool.acquire(self.origin, self.options.connect_timeout)
            exchange = OriginExchange(conn)
            sender: _BodySender | None = None
            try:
                try:
                    exchange.send(request)
                    if framing.kind == "none":
                        exchange.send(h11.EndOfMessage())
                except OSError as exc:
                    raise NoAnswer(HTTPStatus.BAD_GATEWAY, f"connection failed: {describe_error(exc)}") from None
                if framing.kind != "none":
                    pieces = self.client.body(framing.length if framing.kind == "length" else None)
                    sender = self.sender = _BodySender(pieces, self.client.trailers, exchange)
                response = self._final_response(exchange, upgrade, sender)
            except NoAnswer:
                conn.close()
                if sender is not None:
                    sender.join(BODY_GRACE_SECONDS)
                    if sender.client_error is not None:
                        raise _ClientGone(sender.client_error) from None
                if reused and replayable and attempt == 0:
                    continue
                raise
            except BaseException:
                conn.abort()
                if sender is not None:
                    sender.join(BODY_GRACE_SECONDS)
                conn.close()
                raise
            return self._answer(exchange, response, sender, upgrade)
        raise AssertionError("unreachable")

    def _final_response(self, exchange: OriginExchange, upgrade: str | None,
                        sender: _BodySender | None) -> OriginAnswer:
        """Read past informational answers (forwarding 1xx but 100 to HTTP/1.1 clients) to the real one."""
        for _ in range(MAX_INFORMATIONAL):
            try:
                event = self._answer_head(exchange)
            except PassthroughError:
                if sender is not None and sender.client_error is not None:
                    raise _ClientGone(sender.client_error) from None
                raise
            response = answer_of(event)
            if isinstance(event, h11.Response) or response.status == 101:
                return response
            if response.status != 100 and self.handler.request_version == "HTTP/1.1":
                headers = _end_to_end(response.headers.items(), set())
                self.client.send(h11.InformationalResponse(status_code=response.status, headers=fields(headers),
                                                           reason=response.reason.encode("latin-1")))
        raise PassthroughError(HTTPStatus.BAD_GATEWAY, f"more than {MAX_INFORMATIONAL} informational answers")

    @staticmethod
    def _answer_head(exchange: OriginExchange) -> h11.Response | h11.InformationalResponse:
        """The origin's next answer head; NoAnswer if it closed or failed before its first byte."""
        try:
            event = exchange.next_event()
        except TimeoutError:
            raise PassthroughError(HTTPStatus.GATEWAY_TIMEOUT, f"no answer within {ORIGIN_TIMEOUT:g} s") from None
        except OSError as exc:
            error = NoAnswer if not exchange.answered else PassthroughError
            raise error(HTTPStatus.BAD_GATEWAY, f"connection failed: {describe_error(exc)}") from None
        except h11.RemoteProtocolError as exc:
            if not exchange.answered:
                raise NoAnswer(HTTPStatus.BAD_GATEWAY, "closed the connection without answering") from None
            raise PassthroughError(HTTPStatus.BAD_GATEWAY, f"bad answer: {exc}") from None
        if not isinstance(event, (h11.Response, h11.InformationalResponse)):
            raise PassthroughError(HTTPStatus.BAD_GATEWAY, f"bad answer: {type(event).__name__} before its head")
        return event

    def _answer(self, exchange: OriginExchange, response: OriginAnswer, sender: _BodySender | None,
                upgrade: str | None) -> OriginConnection | None:
        handler = self.handler
        conn = exchange.conn
        if response.status == 101:
            return self._switch(exchange, response, sender, upgrade)
        has_body = not (handler.command == "HEAD" or response.status in (204, 304))
        lengths = response.headers.get_all("Content-Length")
        delimited = bool(lengths) and not response.headers.get_all("Transfer-Encoding")
        headers = _end_to_end(response.headers.items(), {"content-length"})
        to_client = "none" if not has_body else "length" if delimited else "stream"
        if to_client == "length" or (to_client == "none" and response.status != 204):
            for value in lengths:
                headers.append(("Content-Length", _clean(value)))
                break
        if handler.request_version != "HTTP/1.1":
            handler.close_connection = True
        if to_client == "stream":  # chunked or until the origin closes: chunked to HTTP/1.1 clients
            if handler.request_version == "HTTP/1.1":
                headers.append(("Transfer-Encoding", "chunked"))
                to_client = "chunked"
            else:
                to_client = "close"
                handler.close_connection = True
        if handler.close_connection:
            headers.append(("Connection", "close"))
        self.client.send(h11.Response(status_code=response.status, headers=fields(headers),
                                      reason=response.reason.encode("latin-1")))
        trailers = self._pass_body(exchange, sender)
        self.client.send(h11.EndOfMessage(headers=fields(trailers) if to_client == "chunked" else []))
        log.debug("listener %s: passthrough %s %s %s -> %d", self.listener, self._peer(), handler.command,
                  self._path(), response.status)
        if sender is not None and not sender.join(BODY_GRACE_SECONDS):
            # The origin answered without reading the whole body: drop both connections.
            handler.close_connection = True
            conn.abort()
            sender.join(BODY_GRACE_SECONDS)
            self._drop_request_body()
            return conn
        if sender is not None and not sender.complete:
            handler.close_connection = True
            self._drop_request_body()
            return conn
        if exchange.reusable:
            self.pool.release(conn)
            return None
        return conn

    def _pass_body(self, exchange: OriginExchange, sender: _BodySender | None) -> Headers:
        """Copy the answer's body to the client; return its trailers."""
        try:
            while True:
                event = exchange.next_event()
                if isinstance(event, h11.Data):
                    self.client.send(h11.Data(data=bytes(event.data)))
                elif isinstance(event, h11.EndOfMessage):
                    return [(name, value) for name, value in
                            ((n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers.raw_items())
                            if name.lower() not in NOT_IN_TRAILERS]
                else:
                    raise h11.RemoteProtocolError(f"{type(event).__name__} inside the answer's body")
        except TimeoutError:
            raise PassthroughError(HTTPStatus.GATEWAY_TIMEOUT, f"body stalled for {ORIGIN_TIMEOUT:g} s") from None
        except (OSError, h11.RemoteProtocolError) as exc:
            if sender is not None and sender.client_error is not None:
                raise _ClientGone(sender.client_error) from None
            raise PassthroughError(HTTPStatus.BAD_GATEWAY, f"answer body failed: {exc}") from None

    def _switch(self, exchange: OriginExchange, response: OriginAnswer, sender: _BodySender | None,
                upgrade: str | None) -> OriginConnection:
        """The origin switched protocols: pass its 101 on and splice the two connections."""
        handler = self.handler
        conn = exchange.conn
        offered = _clean(", ".join(response.headers.get_all("Upgrade")))
        if upgrade is None or offered.lower() != upgrade.lower():
            raise PassthroughError(HTTPStatus.BAD_GATEWAY,
                                   f"switched protocols to {offered!r} when {upgrade!r} was asked for")
        if sender is not None and not (sender.join(BODY_GRACE_SECONDS) and sender.complete):
            raise PassthroughError(HTTPStatus.BAD_GATEWAY, "switched protocols before reading the request body")
        headers = _end_to_end(response.headers.items(), set())
        headers += [("Connection", "Upgrade"), ("Upgrade", offered)]
        self.client.send(h11.InformationalResponse(status_code=101, headers=fields(headers),
                                                   reason=response.reason.encode("latin-1")))
        handler.close_connection = True
        from_client = _take_buffered(self.rfile, self.client_sock)
        from_origin = exchange.after_switch()
        for sock in (self.client_sock, conn.sock):
            sock.settimeout(None)  # the pump's own timeouts apply from now on
        try:
            conn.sock.sendall(from_client)
        except OSError as exc:
            log.debug("listener %s: passthrough %s %s: origin failed before the splice: %s", self.listener,
                      self._peer(), offered, describe_error(exc))
            return conn
        # The same pump as a tunnel's, with the origin's connection as a raw endpoint: no pings (the
        # origin would not answer them), every other rule of the listener's tunnels.
        splice = Tunnel(self.client_sock, RawEndpoint(conn.sock, from_origin),
                        label=f"{self.listener}/{SPLICED_ROUTE}", peer=self._peer(), destination=self.url,
                        options=dataclasses.replace(self.options, ping_interval=0), tcp_role="client")
        self.registry.run(splice)
        return conn

    # -- answers of our own -------------------------------------------------

    def _refuse(self, exc: PassthroughError, *, log_level: int) -> None:
        handler = self.handler
        if exc.status in (HTTPStatus.BAD_GATEWAY, HTTPStatus.GATEWAY_TIMEOUT):
            detail = f"passthrough origin {self.url}: {exc.reason}"
        else:
            detail = f"passthrough: {exc.reason}"
        log.log(log_level, "listener %s: %s %s %s: %d %s", self.listener, self._peer(), handler.command,
                self._path(), exc.status, detail)
        body = http1.refusal_text(exc.status, detail)
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
        if handler.close_connection:
            headers.append(("Connection", "close"))
        events: list[h11.Event] = [h11.Response(status_code=int(exc.status), headers=fields(headers),
                                                reason=exc.status.phrase.encode("ascii"))]
        if handler.command != "HEAD":
            events.append(h11.Data(data=body))
        with contextlib.suppress(_ClientGone, PassthroughError):
            self.client.send(*events, h11.EndOfMessage())

    def _path(self) -> str:
        return urlsplit(self.handler.path).path[:200]

    def _peer(self) -> str:
        host, port = self.handler.client_address[:2]
        return str(Address(str(host), int(port)))


def serve(handler: Client, url: str, *, pool: OriginPool, options: TunnelOptions, listener: str,
          registry: TunnelRegistry) -> None:
    """Pass the request ``handler`` has parsed through to the origin at ``url``, and its answer back; an
    upgrade the origin accepts runs as a tunnel of ``registry`` until both sides are done."""
    Exchange(handler, url, pool=pool, options=options, listener=listener, registry=registry).run()
