"""The opening handshake without I/O: the request we send and what we accept in answer."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from bridge import handshake, protocol
from bridge.handshake import HandshakeError, Response

VECTORS = Path(__file__).parent / "vectors"
#: RFC 6455 section 1.3's example key and its accept token.
RFC_KEY, RFC_ACCEPT = "dGhlIHNhbXBsZSBub25jZQ==", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def response(*header_lines: str, status: str = "101 Switching Protocols") -> Response:
    head = "\r\n".join([f"HTTP/1.1 {status}", *header_lines]).encode("latin-1")
    return handshake.parse_response(head)


def switch(*extra: str, accept: str = RFC_ACCEPT, status: str = "101 Switching Protocols") -> Response:
    return response("Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Accept: {accept}", *extra,
                    status=status)


def test_accept_token_is_rfc_6455s_example() -> None:
    assert handshake.accept_token(RFC_KEY) == RFC_ACCEPT


def test_keys_are_16_random_bytes_each_time() -> None:
    keys = {handshake.new_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(len(base64.b64decode(key, validate=True)) == 16 for key in keys)


@pytest.mark.parametrize(("host", "port", "secure", "expected"), [
    ("example.com", 80, False, "example.com"),
    ("example.com", 443, True, "example.com"),
    ("example.com", 443, False, "example.com:443"),
    ("example.com", 80, True, "example.com:80"),
    ("127.0.0.1", 8080, False, "127.0.0.1:8080"),
    ("::1", 8080, False, "[::1]:8080"),
    ("::1", 443, True, "[::1]"),
])
def test_host_header(host: str, port: int, secure: bool, expected: str) -> None:
    assert handshake.host_header(host, port, secure=secure) == expected


def test_upgrade_request_has_what_rfc_6455_requires_and_no_origin() -> None:
    request = handshake.upgrade_request("/p?q=1", "h:1", RFC_KEY, ["Authorization: Bearer x", "X-A: b"])
    assert request.endswith(b"\r\n\r\n")
    lines = request.decode("latin-1").split("\r\n")[:-2]
    assert lines[0] == "GET /p?q=1 HTTP/1.1"
    headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
    assert headers == [("Host", "h:1"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
                       ("Sec-WebSocket-Key", RFC_KEY), ("Sec-WebSocket-Version", "13"),
                       ("Authorization", "Bearer x"), ("X-A", "b")]


def test_split_head_waits_for_the_blank_line_and_keeps_what_follows() -> None:
    assert handshake.split_head(b"") is None
    assert handshake.split_head(b"HTTP/1.1 101 OK\r\nA: b\r\n") is None
    head = b"HTTP/1.1 101 OK\r\nA: b"
    assert handshake.split_head(head + b"\r\n\r\n\x82\x01x") == (head, b"\x82\x01x")


@pytest.mark.parametrize("data", [b"x" * (handshake.MAX_RESPONSE_HEAD + 1),
                                  b"x" * (handshake.MAX_RESPONSE_HEAD + 1) + b"\r\n\r\n"])
def test_split_head_refuses_an_endless_head(data: bytes) -> None:
    with pytest.raises(HandshakeError, match="larger than"):
        handshake.split_head(data)


def test_parse_response_keeps_order_names_and_repeats() -> None:
    parsed = response("Upgrade: websocket", "upgrade:  h2c ", "X-Empty:", status="101 Switching Protocols")
    assert (parsed.status, parsed.reason) == (101, "Switching Protocols")
    assert parsed.headers == [("Upgrade", "websocket"), ("upgrade", "h2c"), ("X-Empty", "")]
    assert parsed.get_all("UPGRADE") == ["websocket", "h2c"]
    assert parsed.get("x-empty") == "" and parsed.get("absent") is None
    assert parsed.tokens("Upgrade") == {"websocket", "h2c"}


def test_parse_response_joins_folded_lines_and_allows_no_reason() -> None:
    parsed = handshake.parse_response(b"HTTP/1.0 404\r\nX-Long: a\r\n  b")
    assert (parsed.status, parsed.reason, parsed.get("X-Long")) == (404, "", "a b")


@pytest.mark.parametrize("head", [
    b"SSH-2.0-OpenSSH_9.6", b"HTTP/2 101", b"HTTP/1.1 1O1 Switching", b"http/1.1 101 x",
    b"HTTP/1.1 101 OK\r\nno colon here", b"HTTP/1.1 101 OK\r\nbad name: x", b"HTTP/1.1 101 OK\r\n: empty name",
])
def test_parse_response_refuses_what_is_not_http(head: bytes) -> None:
    with pytest.raises(HandshakeError):
        handshake.parse_response(head)


def test_check_switch_accepts_the_go_backends_recorded_101() -> None:
    recorded = (VECTORS / "backend_handshake_response.bin").read_bytes()
    split = handshake.split_head(recorded)
    assert split is not None
    parsed = handshake.parse_response(split[0])
    handshake.check_switch(parsed, RFC_KEY)  # its repeated Upgrade and Connection lines included
    # ... and it echoed our own request headers: an echo never consents to binary frames
    assert not protocol.binary_accepted([name for name, _ in parsed.headers], parsed.headers)


def test_check_switch_accepts_tokens_in_any_case_and_lists() -> None:
    handshake.check_switch(response("upgrade: WebSocket", "connection: keep-alive, Upgrade",
                                    f"sec-websocket-accept: {RFC_ACCEPT}"), RFC_KEY)


@pytest.mark.parametrize(("parsed", "message"), [
    (switch(accept=handshake.accept_token("AAAAAAAAAAAAAAAAAAAAAA==")), "Sec-WebSocket-Accept"),
    (switch(f"Sec-WebSocket-Accept: {RFC_ACCEPT}"), "Sec-WebSocket-Accept"),
    (switch(accept=RFC_ACCEPT.lower()), "Sec-WebSocket-Accept"),
    (response("Connection: Upgrade", f"Sec-WebSocket-Accept: {RFC_ACCEPT}"), "Upgrade: websocket"),
    (response("Upgrade: h2c", "Connection: Upgrade", f"Sec-WebSocket-Accept: {RFC_ACCEPT}"), "Upgrade: websocket"),
    (response("Upgrade: websocket", f"Sec-WebSocket-Accept: {RFC_ACCEPT}"), "Connection: Upgrade"),
    (response("Upgrade: websocket", "Connection: Upgrade"), "Sec-WebSocket-Accept"),
    (switch("Sec-WebSocket-Extensions: permessage-deflate"), "extension"),
    (switch("Sec-WebSocket-Protocol: chat"), "subprotocol"),
    (switch(status="200 OK"), "expected HTTP 101"),
])
def test_check_switch_refuses(parsed: Response, message: str) -> None:
    with pytest.raises(HandshakeError, match=message):
        handshake.check_switch(parsed, RFC_KEY)


@pytest.mark.parametrize(("parsed", "body", "summary"), [
    (response(status="404 Not Found"), b"404 Not Found: no route 'x'\nmore",
     "HTTP 404 Not Found (404 Not Found: no route 'x')"),
    (response(status="401 Unauthorized"), b"", "HTTP 401 Unauthorized"),
    (response(status="502 Bad Gateway"), b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body>",
     "HTTP 502 Bad Gateway (502 Bad Gateway)"),
    (response("Location: https://example.com/new", status="301 Moved Permanently"), b"moved",
     "HTTP 301 Moved Permanently (redirects to https://example.com/new)"),
    (response(status="500 Internal Server Error"), b"\n\n  \n", "HTTP 500 Internal Server Error"),
    (response(status="403 Forbidden"), b"x" * 500, f"HTTP 403 Forbidden ({'x' * 200})"),
])
def test_refusal_summary_is_one_line_from_status_and_body(parsed: Response, body: bytes, summary: str) -> None:
    assert handshake.refusal_summary(parsed, body) == summary


def test_refusal_summary_never_shows_other_headers() -> None:
    parsed = response("Authorization: Bearer secret-token", "Content-Length: 0", status="401 Unauthorized")
    assert "secret" not in handshake.refusal_summary(parsed, b"")


@pytest.mark.parametrize(("lines", "expected"), [
    (["Content-Length: 12"], 12), ([], None), (["Content-Length: x"], None),
    (["Content-Length: 1", "Content-Length: 1"], None), (["Content-Length: -1"], None),
])
def test_content_length(lines: list[str], expected: int | None) -> None:
    assert response(*lines, status="404 Not Found").content_length() == expected
