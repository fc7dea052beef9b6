"""The websocket opening handshake (RFC 6455 section 4), without I/O.

The backend's answer is :func:`upgrade_response`; the frontend's whole client
side is here, as pure functions its dialer drives over a socket:

1. :func:`new_key` and :func:`upgrade_request` make the request;
2. :func:`split_head` says when the response head is complete (and what
   followed it: frames a target sent at once);
3. :func:`parse_response` reads the status line and headers;
4. a 101 goes through :func:`check_switch`; anything else is a refusal, which
   :func:`refusal_summary` turns into one line for the log.

Every malformed or unacceptable answer raises :class:`HandshakeError` whose
message says what was wrong; nothing here ever includes response header values
in a message except ``Location`` (the Go backend echoes request headers,
``Authorization`` included).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

#: RFC 6455 section 1.3: appended to the client's key to make the server's accept token.
WEBSOCKET_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Largest response head (status line and headers) accepted from a backend.
MAX_RESPONSE_HEAD: Final = 16 * 1024
#: Bytes of a refusal's body read for its one-line summary.
MAX_REFUSAL_BODY: Final = 4096

_STATUS_LINE = re.compile(r"HTTP/1\.[01] (\d{3})(?: (.*))?")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TITLE = re.compile(r"<title>([^<]*)</title>", re.IGNORECASE)


def header_tokens(values: Iterable[str]) -> list[str]:
    """The comma-separated tokens of header values (``Connection``, ``Upgrade``, ...), lower-cased, in order."""
    return [token.strip().lower() for value in values for token in value.split(",") if token.strip()]


class HandshakeError(Exception):
    """The backend's answer to the upgrade is not a usable websocket handshake; the message says why."""


@dataclass(frozen=True)
class Response:
    """A parsed response head: status, reason phrase and header lines in order (names as sent)."""

    status: int
    reason: str
    headers: list[tuple[str, str]]

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def get(self, name: str) -> str | None:
        """The first value of header ``name``, or None."""
        values = self.get_all(name)
        return values[0] if values else None

    def tokens(self, name: str) -> set[str]:
        """The lower-cased comma-separated tokens of every ``name`` header."""
        return set(header_tokens(self.get_all(name)))

    def content_length(self) -> int | None:
        """The declared body length, or None if absent or not a single valid number."""
        values = self.get_all("Content-Length")
        if len(values) != 1 or not values[0].strip().isdigit():
            return None
        return int(values[0])


def new_key() -> str:
    """A fresh Sec-WebSocket-Key: 16 random bytes, base64."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def accept_token(key: str) -> str:
    """The Sec-WebSocket-Accept value for a client's Sec-WebSocket-Key (RFC 6455 section 4.2.2)."""
    digest = hashlib.sha1(key.encode("ascii") + WEBSOCKET_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def host_header(host: str, port: int, *, secure: bool) -> str:
    """The Host header's value: IPv6 literals bracketed, the port left out when it is the scheme's default."""
    name = f"[{host}]" if ":" in host else host
    return name if port == (443 if secure else 80) else f"{name}:{port}"


def upgrade_request(path: str, host: str, key: str, extra_lines: list[str]) -> bytes:
    """The GET upgrade request for ``path`` (with its query), ``extra_lines`` ("Name: value") appended.

    No Origin and no extension or subprotocol offer: the Go backend refuses the first
    and we negotiate neither of the others.
    """
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *extra_lines,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def upgrade_response(key: str, extra_lines: list[str]) -> bytes:
    """The 101 that accepts an upgrade whose request carried ``key``, ``extra_lines`` ("Name: value")
    appended. No extension or subprotocol is ever agreed to."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_token(key)}",
        *extra_lines,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def split_head(received: bytes) -> tuple[bytes, bytes] | None:
    """``(head, rest)`` once ``received`` holds a whole response head, else None.

    ``head`` excludes the blank line that ends it; ``rest`` is what followed.
    Raises HandshakeError once more than :data:`MAX_RESPONSE_HEAD` bytes arrived without an end.
    """
    end = received.find(b"\r\n\r\n")
    if end < 0:
        if len(received) > MAX_RESPONSE_HEAD:
            raise HandshakeError(f"response head larger than {MAX_RESPONSE_HEAD} bytes")
        return None
    if end > MAX_RESPONSE_HEAD:
        raise HandshakeError(f"response head larger than {MAX_RESPONSE_HEAD} bytes")
    return received[:end], received[end + 4:]


def parse_response(head: bytes) -> Response:
    """Parse a response head (as :func:`split_head` returns it); HandshakeError if it is not HTTP/1.x."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise HandshakeError(f"not an HTTP/1.1 response: {status_line[:80]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (" ", "\t") and headers:  # obsolete line folding: part of the previous value
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HandshakeError(f"malformed response header line: {line[:80]!r}")
        headers.append((name, value.strip(" \t")))
    return Response(int(match.group(1)), (match.group(2) or "").strip(), headers)


def check_switch(response: Response, key: str) -> None:
    """Accept a 101 only if it completes the handshake for ``key`` (RFC 6455 section 4.1, client steps 2-4).

    Extensions and subprotocols are never offered, so a 101 selecting one is refused too.
    """
    if response.status != 101:
        raise HandshakeError(f"expected HTTP 101, got {response.status}")
    if "websocket" not in response.tokens("Upgrade"):
        raise HandshakeError("the 101 lacks 'Upgrade: websocket'")
    if "upgrade" not in response.tokens("Connection"):
        raise HandshakeError("the 101 lacks 'Connection: Upgrade'")
    accept = response.get_all("Sec-WebSocket-Accept")
    if len(accept) != 1 or not hmac.compare_digest(accept[0].encode("latin-1"), accept_token(key).encode("ascii")):
        raise HandshakeError("wrong Sec-WebSocket-Accept in the 101 (not an answer to our key)")
    for name, what in (("Sec-WebSocket-Extensions", "an extension"), ("Sec-WebSocket-Protocol", "a subprotocol")):
        if response.tokens(name):
            raise HandshakeError(f"the 101 selects {what}, and none was offered")


def refusal_summary(response: Response, body: bytes) -> str:
    """One line for a non-101 answer: ``HTTP 404 Not Found (first line of the body)``.

    An HTML body is summed up by its title; a redirect names its Location.
    """
    status = f"HTTP {response.status} {response.reason}".rstrip()
    location = response.get("Location")
    if 300 <= response.status < 400 and location:
        return f"{status} (redirects to {location[:200]})"
    text = body.decode("utf-8", "replace")
    title = _TITLE.search(text)
    first = title.group(1) if title else next((line for line in text.splitlines() if line.strip()), "")
    return f"{status} ({first.strip()[:200]})" if first.strip() else status
