"""HTTP/1.1 request heads on the backend's listeners: framed here, checked, parsed by h11.

The backend's front door reads one request head at a time from the connection's buffered reader:
the request line (at most :data:`MAX_REQUEST_LINE` bytes, else 414) and the header lines up to the
empty line (at most ``max_header_bytes``, else 431). The head as it arrived must pass
:mod:`bridge.request_rules` (400 otherwise: the smuggling patterns h11 accepts), and is then parsed
by h11, which enforces the grammar, a single ``Host`` and agreeing ``Content-Length`` values (400),
and refuses transfer codings other than ``chunked`` (501).

The head is framed here rather than by h11's own buffer because what follows it stays in the same
buffered reader, where the daemon finds it: a passthrough body, the next kept-alive request, or the
first websocket frames after a 101.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass, field
from http import HTTPStatus
from io import BufferedIOBase

import h11

from bridge import request_rules
from bridge.handshake import header_tokens

#: Longest request line (method, target, version) accepted: 414 beyond.
MAX_REQUEST_LINE = 64 * 1024


class RequestError(Exception):
    """A request head that cannot be served: answered with ``status``, then the connection is closed.

    ``smuggling``: it broke one of :mod:`bridge.request_rules` (worth a warning, where a malformed
    request is worth a debug line).
    """

    def __init__(self, status: HTTPStatus, detail: str, *, smuggling: bool = False) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.smuggling = smuggling


@dataclass(frozen=True)
class Headers:
    """A request's header fields in order, names as sent, values decoded as ISO-8859-1 (so encoding a
    value back gives the bytes on the wire). Names compare case-insensitively."""

    fields: list[tuple[str, str]] = field(default_factory=list)

    def get_all(self, name: str) -> list[str]:
        low = name.lower()
        return [value for key, value in self.fields if key.lower() == low]

    def get(self, name: str, default: str = "") -> str:
        """The first value of ``name``, or ``default``."""
        values = self.get_all(name)
        return values[0] if values else default

    def items(self) -> list[tuple[str, str]]:
        return list(self.fields)


@dataclass(frozen=True)
class Request:
    """One parsed request head. ``version`` is as on the request line (``HTTP/1.1``)."""

    method: str
    target: str
    version: str
    headers: Headers
    #: The head as it arrived, through its empty line.
    head: bytes

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request after this one (RFC 9112 section 9.3)."""
        tokens = header_tokens(self.headers.get_all("Connection"))
        if "close" in tokens:
            return False
        return self.version == "HTTP/1.1" or "keep-alive" in tokens

    @property
    def expects_continue(self) -> bool:
        """An HTTP/1.1 request waiting for ``100 Continue`` before it sends its body."""
        return self.version == "HTTP/1.1" and self.headers.get("Expect").strip().lower() == "100-continue"


def read_request(rfile: BufferedIOBase, max_header_bytes: int) -> Request | None:
    """The next request head from ``rfile``; None if the client closed (or sent an empty line) before
    one began. RequestError for one that cannot be served; OSError (a timeout included) from reading."""
    request_line = rfile.readline(MAX_REQUEST_LINE + 1)
    if len(request_line) > MAX_REQUEST_LINE:
        raise RequestError(HTTPStatus.REQUEST_URI_TOO_LONG, f"request line longer than {MAX_REQUEST_LINE} bytes")
    if not request_line.strip():
        return None
    head = bytearray(request_line)
    left = max_header_bytes
    while True:
        line = rfile.readline(left + 1)
        left -= len(line)
        if left < 0:
            raise RequestError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                               f"request header block larger than {max_header_bytes} bytes")
        if not line:
            raise RequestError(HTTPStatus.BAD_REQUEST, "the connection ended inside the request head")
        head += line
        if line in (b"\r\n", b"\n"):
            break
    problem = request_rules.check_head(bytes(head))
    if problem:
        raise RequestError(HTTPStatus.BAD_REQUEST, problem, smuggling=True)
    return parse_head(bytes(head))


def parse_head(head: bytes) -> Request:
    """Parse a complete request head (through its empty line) with h11; RequestError if it is malformed."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=len(head) + 1)
    connection.receive_data(head)
    try:
        event = connection.next_event()
    except h11.RemoteProtocolError as exc:
        raise RequestError(HTTPStatus(exc.error_status_hint), str(exc)[:200]) from None
    if not isinstance(event, h11.Request):
        raise RequestError(HTTPStatus.BAD_REQUEST, "incomplete request head")
    version = event.http_version.decode("ascii")
    if not version.startswith("1."):
        raise RequestError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"HTTP/{version} is not supported")
    fields = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers.raw_items()]
    return Request(event.method.decode("ascii"), event.target.decode("latin-1"), f"HTTP/{version}", Headers(fields),
                   head)


def refusal_text(status: HTTPStatus, detail: str) -> bytes:
    """The text/plain body of every refusal of ours: ``<status> <phrase>: <detail>``."""
    return f"{int(status)} {status.phrase}: {detail}\n".encode()


def plain_answer(status: HTTPStatus, detail: str, headers: list[tuple[str, str]], *, server: str,
                 head_only: bool = False) -> bytes:
    """A refusal of ours: :func:`refusal_text` as a text/plain body (only its head if ``head_only``)."""
    body = refusal_text(status, detail)
    fields = [*headers, ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    return answer(status, fields, b"" if head_only else body, server=server)


def answer(status: HTTPStatus, headers: list[tuple[str, str]], body: bytes = b"", *, server: str) -> bytes:
    """A complete answer of ours: status line, ``Server``, ``Date``, ``headers``, then ``body``."""
    lines = [f"HTTP/1.1 {int(status)} {status.phrase}", f"Server: {server}",
             f"Date: {email.utils.formatdate(usegmt=True)}", *(f"{name}: {value}" for name, value in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1") + body
