"""Request heads as the backend reads them: framed in the buffered reader, checked, parsed by h11."""

from __future__ import annotations

import io
from http import HTTPStatus

import pytest

from bridge import http1
from bridge.http1 import Headers, RequestError, read_request

LIMIT = 1024


def reader(data: bytes) -> io.BufferedReader:
    return io.BufferedReader(io.BytesIO(data))  # type: ignore[arg-type]


def test_a_request_is_parsed_and_what_follows_it_stays_in_the_reader() -> None:
    rfile = reader(b"POST /a?b=1 HTTP/1.1\r\nHost: h\r\nX-Token: \xff\xfe\r\nContent-Length: 5\r\n\r\nhello"
                   b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    request = read_request(rfile, LIMIT)
    assert request is not None
    assert (request.method, request.target, request.version) == ("POST", "/a?b=1", "HTTP/1.1")
    assert request.headers.get("x-token").encode("latin-1") == b"\xff\xfe"  # the bytes as sent
    assert rfile.read(5) == b"hello"
    following = read_request(rfile, LIMIT)
    assert following is not None and following.target == "/next"
    assert read_request(rfile, LIMIT) is None  # the client closed between requests


def test_headers_keep_order_and_case_and_match_names_in_any_case() -> None:
    headers = Headers([("Host", "h"), ("X-A", "1"), ("x-a", "2")])
    assert headers.get_all("X-a") == ["1", "2"]
    assert headers.get("X-A") == "1"
    assert headers.get("missing") == "" and headers.get("missing", "d") == "d"
    assert headers.items() == [("Host", "h"), ("X-A", "1"), ("x-a", "2")]


@pytest.mark.parametrize(("head", "keep_alive"), [
    (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Close\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade, close\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
])
def test_keep_alive_follows_the_version_and_the_connection_header(head: bytes, keep_alive: bool) -> None:
    request = read_request(reader(head), LIMIT)
    assert request is not None and request.keep_alive is keep_alive


def test_only_an_http_1_1_request_expects_100_continue() -> None:
    asks = read_request(reader(b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\n\r\n"), LIMIT)
    old = read_request(reader(b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n"), LIMIT)
    assert asks is not None and asks.expects_continue
    assert old is not None and not old.expects_continue


@pytest.mark.parametrize(("data", "status", "smuggling"), [
    (b"GET /" + b"a" * http1.MAX_REQUEST_LINE + b" HTTP/1.1\r\n\r\n", HTTPStatus.REQUEST_URI_TOO_LONG, False),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * LIMIT + b"\r\n\r\n",
     HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, False),
    (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: y\r\n" * 300 + b"\r\n", HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, False),
    (b"GET / HTTP/1.1\r\nHost: h\r\n", HTTPStatus.BAD_REQUEST, False),  # the connection ended inside the head
    (b"GARBAGE\r\n\r\n", HTTPStatus.BAD_REQUEST, False),
    (b"GET / HTTP/x.y\r\n\r\n", HTTPStatus.BAD_REQUEST, False),
    (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, False),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", HTTPStatus.NOT_IMPLEMENTED, False),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
     HTTPStatus.BAD_REQUEST, True),
    (b"GET / HTTP/1.1\nHost: h\n\n", HTTPStatus.BAD_REQUEST, True),
])
def test_a_head_that_cannot_be_served_says_how_to_answer(data: bytes, status: HTTPStatus, smuggling: bool) -> None:
    with pytest.raises(RequestError) as refused:
        read_request(reader(data), LIMIT)
    assert (refused.value.status, refused.value.smuggling) == (status, smuggling)


def test_a_header_block_of_exactly_the_limit_is_taken_and_one_byte_more_is_not() -> None:
    def block(size: int) -> bytes:
        prefix = b"Host: h\r\nX: "
        return prefix + b"a" * (size - len(prefix) - 4) + b"\r\n\r\n"
    assert len(block(LIMIT)) == LIMIT
    assert read_request(reader(b"GET / HTTP/1.1\r\n" + block(LIMIT)), LIMIT) is not None
    with pytest.raises(RequestError):
        read_request(reader(b"GET / HTTP/1.1\r\n" + block(LIMIT + 1)), LIMIT)


def test_our_answers_carry_server_date_and_the_given_headers() -> None:
    raw = http1.answer(HTTPStatus.NOT_FOUND, [("Content-Length", "2")], b"no", server="tcpbridge/test")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 404 Not Found"
    assert lines[1] == "Server: tcpbridge/test" and lines[2].startswith("Date: ") and lines[2].endswith(" GMT")
    assert lines[3:] == ["Content-Length: 2"] and body == b"no"
