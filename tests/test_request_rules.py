"""The request-head rules, as bytes in and a reason out (the daemon-level table is in test_smuggling.py)."""

from __future__ import annotations

import pytest

from bridge.request_rules import check_head

GOOD = (b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nX-Tab:\tvalue with\ttabs \r\n\r\n")


def test_a_plain_request_passes() -> None:
    assert check_head(GOOD) is None
    assert check_head(b"GET / HTTP/1.0\r\n\r\n") is None  # HTTP/1.0 needs no Host
    assert check_head(b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n") is None
    assert check_head(b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n") is None


@pytest.mark.parametrize(("head", "reason"), [
    (b"GET / HTTP/1.1\nHost: h\r\n\r\n", "bare LF"),
    (b"GET / HTTP/1.1\r\nHost: h\n\r\n", "bare LF"),
    (b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n", "bare CR"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b\r\n c\r\n\r\n", "line folding"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b\r\n\tc\r\n\r\n", "line folding"),
    (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", "not a token"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nNo colon here\r\n\r\n", "not a token"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX[1]: y\r\n\r\n", "not a token"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b\x00c\r\n\r\n", "control character"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b\x7f\r\n\r\n", "control character"),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", "conflicting"),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 6\r\n\r\n", "conflicting"),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\n", "not a decimal"),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x5\r\n\r\n", "not a decimal"),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n\r\n", "not a decimal"),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1234567890123456789\r\n\r\n", "not a decimal"),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\ncontent-length: 5\r\n\r\n", "both"),
    (b"GET / HTTP/1.1\r\nX: y\r\n\r\n", "without Host"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host"),
])
def test_each_ambiguous_head_is_refused_naming_its_rule(head: bytes, reason: str) -> None:
    problem = check_head(head)
    assert problem is not None and reason in problem, problem


def test_the_reason_names_the_field_but_never_echoes_a_value() -> None:
    problem = check_head(b"GET / HTTP/1.1\r\nHost: h\r\nX-Secret: token\x01value\r\n\r\n")
    assert problem is not None
    assert "X-Secret" in problem and "token" not in problem
    problem = check_head(b"GET / HTTP/1.1\r\nHost: h\r\nBad\x1bName\xff" + b"n" * 100 + b": v\r\n\r\n")
    assert problem is not None and "\x1b" not in problem and len(problem) < 120
