"""The rules a request head must pass on the backend, beyond what its HTTP parser checks.

Request smuggling lives in the gaps between two readings of one request: a front proxy (the
inverting proxy's agent, nginx) frames it one way, the backend or the passthrough origin another,
and the bytes one of them takes for a body the other takes for a second request. The backend's
listeners refuse every request whose reading is ambiguous, before anything is routed, dialled or
passed through, with ``400 Bad Request`` and a closed connection (RFC 9112 section 11.2):

* a line that ends in a bare LF, or a bare CR anywhere (RFC 9112 section 2.2 allows a recipient to
  accept a bare LF; a proxy in front that does not would frame differently);
* obsolete line folding, a header line that starts with whitespace (section 5.2);
* whitespace between a field name and its colon, or a name that is not a token (section 5.1);
* a control character other than HTAB in a field value (RFC 9110 section 5.5);
* ``Content-Length`` that is not a decimal count, or several that disagree (section 6.3);
* ``Content-Length`` together with ``Transfer-Encoding`` (section 6.1 lets a server refuse it; the
  standard library's parser and h11 both let ``Transfer-Encoding`` win instead);
* an HTTP/1.1 request without exactly one ``Host`` (RFC 9112 section 3.2).

This module only reads bytes: :func:`check_head` takes the head as it arrived, from the request line
to the empty line that ends it, and says what is wrong with it.
"""

from __future__ import annotations

import re
from typing import Final

#: A field name: an RFC 9110 token.
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: A control character that may not appear in a field value (HTAB may).
_CONTROL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BARE_LF: Final = re.compile(rb"(?<!\r)\n")
_BARE_CR: Final = re.compile(rb"\r(?!\n)")
_DIGITS: Final = re.compile(rb"[0-9]{1,18}")


def check_head(head: bytes) -> str | None:
    """Why a request head must be refused with 400, or None when it passes these rules.

    ``head`` runs from the request line through the empty line that ends the header block. The
    reason names the rule and the field, never a field's value (it is logged and sent back).
    """
    if _BARE_LF.search(head):
        return "a line ends in a bare LF: HTTP/1.1 lines end in CRLF"
    if _BARE_CR.search(head):
        return "a bare CR in the request head"
    request_line, _, block = head.partition(b"\r\n")
    fields: list[tuple[bytes, bytes]] = []
    for line in block.split(b"\r\n"):
        if not line:
            continue
        problem = _field_problem(line)
        if problem:
            return problem
        name, _, value = line.partition(b":")
        fields.append((name.lower(), value.strip(b" \t")))
    return _framing_problem(fields) or _host_problem(request_line, fields)


def _field_problem(line: bytes) -> str | None:
    if line[:1] in (b" ", b"\t"):
        return "obsolete line folding: a header line starts with whitespace"
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        return f"header name {_shown(name)} is not a token (or has whitespace before its colon)"
    if _CONTROL.search(value):
        return f"a control character in the value of {_shown(name)}"
    return None


def _framing_problem(fields: list[tuple[bytes, bytes]]) -> str | None:
    lengths = {item.strip(b" \t") for name, value in fields if name == b"content-length"
               for item in value.split(b",")}
    if any(not _DIGITS.fullmatch(length) for length in lengths):
        return "Content-Length is not a decimal count"
    if len(lengths) > 1:
        return "conflicting Content-Length values"
    if lengths and any(name == b"transfer-encoding" for name, _ in fields):
        return "both Transfer-Encoding and Content-Length: the body's length is ambiguous"
    return None


def _host_problem(request_line: bytes, fields: list[tuple[bytes, bytes]]) -> str | None:
    if not request_line.endswith(b" HTTP/1.1"):
        return None
    hosts = sum(1 for name, _ in fields if name == b"host")
    if hosts == 0:
        return "an HTTP/1.1 request without Host"
    if hosts > 1:
        return "more than one Host header"
    return None


def _shown(name: bytes) -> str:
    """A field name for a message: printable ASCII only, at most 40 characters."""
    text = name[:40].decode("ascii", "replace")
    return repr("".join(c if c.isprintable() else "?" for c in text))
