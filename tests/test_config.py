"""YAML configuration: parsing into dataclasses, defaults, and every reported problem."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from bridge import config, protocol
from bridge.config import (
    Address,
    BackendConfig,
    ConfigError,
    FrontendConfig,
    FrontendTunnel,
    Listener,
    TunnelOptions,
    check_backend_url,
    load,
    parse_address,
    parse_backend,
    parse_frontend,
    redact_url,
)
from bridge.service import START_TIME_KEYS

ROOT = Path(__file__).resolve().parent.parent
SRC = "f.yaml"


def frontend_problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_frontend(data, SRC)
    assert info.value.problems
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def backend_problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_backend(data, SRC)
    assert info.value.problems
    return info.value.problems


def file_problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value.problems


def find(problems: list[str], *fragments: str) -> str:
    """The one problem line that contains every fragment (and starts with the file name)."""
    matches = [p for p in problems if all(f in p for f in fragments)]
    assert matches, f"no problem with {fragments} in:\n" + "\n".join(problems)
    return matches[0]


def tunnel(**extra: Any) -> dict[str, Any]:
    return {"name": "t", "listen": "127.0.0.1:7000", **extra}


def front(*tunnels: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"backend": "ws://127.0.0.1:8080/", **top, "tunnels": list(tunnels) or [tunnel()]}


def listener(**extra: Any) -> dict[str, Any]:
    return {"name": "main", "listen": "127.0.0.1:8080", "routes": {"default": "127.0.0.1:22"}, **extra}


def back(*listeners: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {**top, "listeners": list(listeners) or [listener()]}


# ---------------------------------------------------------------------------
# parse_address, check_backend_url, redact_url


@pytest.mark.parametrize(("text", "expected"), [
    ("[::1]:80", Address("::1", 80)),
    ("[::]:8080", Address("::", 8080)),
    ("[2001:db8::1]:443", Address("2001:db8::1", 443)),
    ("80", Address("127.0.0.1", 80)),
    (80, Address("127.0.0.1", 80)),
    ("65535", Address("127.0.0.1", 65535)),
    ("1", Address("127.0.0.1", 1)),
    ("127.0.0.1:17000", Address("127.0.0.1", 17000)),
    ("0.0.0.0:22", Address("0.0.0.0", 22)),
    ("localhost:22", Address("localhost", 22)),
    ("example.com:443", Address("example.com", 443)),
    ("my-host.internal:8080", Address("my-host.internal", 8080)),
    (" 127.0.0.1:9 ", Address("127.0.0.1", 9)),
])
def test_parse_address(text: object, expected: Address) -> None:
    assert parse_address(text) == expected


def test_parse_address_bare_port_uses_the_given_default_host() -> None:
    assert parse_address("22", default_host="localhost") == Address("localhost", 22)
    assert parse_address(22, default_host="::1") == Address("::1", 22)


@pytest.mark.parametrize("text", [
    "::1:80",            # IPv6 without brackets
    "::1",
    "2001:db8::1:443",
    "[::1]",             # no port
    "[::1:80",
    "[zz]:80",           # not an IPv6 address in the brackets
    "[127.0.0.1]:80",
    "127.0.0.1:",        # missing port
    ":80",               # missing host
    "localhost",         # a host, but no port
    "h:0",
    "h:70000",
    "0",
    "70000",
    "-1",
    "h:-1",
    "h:http",
    "h:8 0",
    "",
    True,
    False,
    None,
    8.5,
    ["127.0.0.1", 80],
    {"host": "h"},
])
def test_parse_address_rejects(text: object) -> None:
    with pytest.raises(ValueError, match=r".+"):
        parse_address(text)


def test_parse_address_messages_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="bracket"):
        parse_address("::1:80")
    with pytest.raises(ValueError, match="70000"):
        parse_address("h:70000")
    with pytest.raises(ValueError, match="out of range"):
        parse_address("h:0")


def test_address_str_brackets_ipv6() -> None:
    assert str(Address("::1", 80)) == "[::1]:80"
    assert str(Address("127.0.0.1", 80)) == "127.0.0.1:80"
    assert str(Address("example.com", 1)) == "example.com:1"


@pytest.mark.parametrize("url", [
    "ws://h", "ws://h:1/", "wss://h/prefix/", "ws://[::1]:8080/", "wss://u:p@h:443/x?token=1", "WS://H/",
])
def test_check_backend_url_accepts(url: str) -> None:
    assert check_backend_url(url) == url


@pytest.mark.parametrize("url", [
    "http://h/", "https://h/", "h:8080", "ftp://h/", "ws:/h", "ws://", "ws:///path", "ws://h:0/",
    "ws://h:70000/", "ws://h:port/", "ws://::1:8080/", "ws://[::1/", "ws://h/#frag", "", None, 5, True,
])
def test_check_backend_url_rejects(url: object) -> None:
    with pytest.raises(ValueError, match=r".+"):
        check_backend_url(url)


@pytest.mark.parametrize(("url", "expected"), [
    ("wss://user:secret@h:443/p?token=abc", "wss://h:443/p"),
    ("ws://user@h/", "ws://h/"),
    ("ws://h:1/a/b?x=1&y=2", "ws://h:1/a/b"),
    ("wss://u:p@[::1]:9/x?tok=1", "wss://[::1]:9/x"),
    ("ws://h:1/", "ws://h:1/"),
    ("ws://h", "ws://h"),
])
def test_redact_url(url: str, expected: str) -> None:
    redacted = redact_url(url)
    assert redacted == expected
    assert "secret" not in redacted
    assert "token" not in redacted


# ---------------------------------------------------------------------------
# Frontend: parsing and defaults


def test_frontend_minimal_defaults() -> None:
    cfg = parse_frontend({"tunnels": [{"name": "t", "listen": 7000, "backend": "ws://h:1/"}]}, SRC)
    assert cfg == FrontendConfig(
        tunnels=(FrontendTunnel(name="t", listen=Address("127.0.0.1", 7000), backend="ws://h:1/"),),
        log_level="info", drain_timeout=10.0, source=SRC,
    )
    t = cfg.tunnels[0]
    assert t.route == "default"
    assert t.headers == ()
    assert t.options == TunnelOptions(half_close=True, half_close_timeout=60.0, connect_timeout=10.0,
                                      max_message_bytes=protocol.DEFAULT_MAX_MESSAGE_BYTES)
    assert t.url == "ws://h:1" + protocol.BRIDGE_PATH


def test_frontend_every_key() -> None:
    cfg = parse_frontend({
        "backend": "wss://proxy.example.com/prefix/",
        "headers": {"X-Token": "top", "X-Top": 1},
        "log_level": "DEBUG",
        "drain_timeout": 3,
        "half_close": False,
        "half_close_timeout": 0,
        "connect_timeout": 2.5,
        "max_message_bytes": 65536,
        "tunnels": [
            {"name": "inherits", "listen": "[::1]:7001"},
            {"name": "overrides", "listen": "0.0.0.0:7002", "backend": "ws://other:9/", "route": "ssh",
             "headers": {"X-Token": "mine", "X-Own": "own"},
             "half_close": True, "half_close_timeout": 5.5, "connect_timeout": 1, "max_message_bytes": 200000},
        ],
    }, SRC)
    assert cfg.log_level == "debug"
    assert cfg.drain_timeout == 3.0
    assert cfg.source == SRC
    inherits, overrides = cfg.tunnels
    assert inherits.name == "inherits"
    assert inherits.listen == Address("::1", 7001)
    assert inherits.backend == "wss://proxy.example.com/prefix/"
    assert inherits.route == "default"
    assert literal_headers(inherits) == {"X-Token": "top", "X-Top": "1"}
    assert inherits.options == TunnelOptions(half_close=False, half_close_timeout=0.0, connect_timeout=2.5,
                                             max_message_bytes=65536)
    assert inherits.url == "wss://proxy.example.com/prefix" + protocol.BRIDGE_PATH

    assert overrides.listen == Address("0.0.0.0", 7002)
    assert overrides.backend == "ws://other:9/"
    assert overrides.route == "ssh"
    assert literal_headers(overrides) == {"X-Token": "mine", "X-Top": "1", "X-Own": "own"}
    assert overrides.options == TunnelOptions(half_close=True, half_close_timeout=5.5, connect_timeout=1.0,
                                              max_message_bytes=200000)
    assert overrides.url == "ws://other:9" + protocol.BRIDGE_PATH + "/ssh"


def literal_headers(tunnel_: FrontendTunnel) -> dict[str, str | None]:
    return {name: value.value for name, value in tunnel_.headers}


def test_frontend_option_values_are_typed() -> None:
    t = parse_frontend(front(tunnel(half_close_timeout=7, connect_timeout=3)), SRC).tunnels[0]
    assert isinstance(t.options.half_close_timeout, float)
    assert isinstance(t.options.connect_timeout, float)


def test_frontend_partial_override_keeps_other_top_level_options() -> None:
    cfg = parse_frontend(front(tunnel(connect_timeout=1), connect_timeout=4, half_close=False), SRC)
    assert cfg.tunnels[0].options.connect_timeout == 1.0
    assert cfg.tunnels[0].options.half_close is False
    assert cfg.tunnels[0].options.half_close_timeout == 60.0


def test_frontend_header_override_is_case_insensitive() -> None:
    """A tunnel's header replaces the top-level one of the same (case-insensitive) name, not duplicates it."""
    cfg = parse_frontend(front(tunnel(headers={"x-token": "tunnel"}), headers={"X-Token": "top"}), SRC)
    tokens = [value.value for name, value in cfg.tunnels[0].headers if name.lower() == "x-token"]
    assert tokens == ["tunnel"]


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error", "Warning"])
def test_log_levels(level: str) -> None:
    assert parse_frontend(front(log_level=level), SRC).log_level == level.lower()
    assert parse_backend(back(log_level=level), SRC).log_level == level.lower()


def test_timeouts_zero_allowed_where_it_means_never() -> None:
    cfg = parse_frontend(front(half_close_timeout=0, drain_timeout=0), SRC)
    assert cfg.tunnels[0].options.half_close_timeout == 0.0
    assert cfg.drain_timeout == 0.0


def test_tunnel_without_name_label_is_its_index() -> None:
    problems = frontend_problems(front(tunnel(), {"listen": 7001}))
    find(problems, SRC, "tunnels[1]", "missing 'name'")


# ---------------------------------------------------------------------------
# Backend: parsing and defaults


def test_backend_minimal_defaults() -> None:
    cfg = parse_backend({"listeners": [{"name": "main", "listen": 8080, "routes": {"default": 22}}]}, SRC)
    assert cfg == BackendConfig(
        listeners=(Listener(name="main", listen=Address("127.0.0.1", 8080),
                            routes={"default": Address("localhost", 22)}),),
        log_level="info", drain_timeout=10.0, source=SRC,
    )
    assert cfg.listeners[0].options == TunnelOptions()


def test_backend_every_key() -> None:
    cfg = parse_backend({
        "log_level": "warning",
        "drain_timeout": 1.5,
        "half_close": False,
        "half_close_timeout": 30,
        "connect_timeout": 4,
        "max_message_bytes": 100000,
        "listeners": [
            {"name": "a", "listen": "0.0.0.0:8080",
             "routes": {"default": "127.0.0.1:22", "ssh": "[::1]:22", "web": "example.com:80", "bare": 9000}},
            {"name": "b.2", "listen": "[::1]:8081", "routes": {"echo": "localhost:7"},
             "half_close": True, "half_close_timeout": 0, "connect_timeout": 0.5, "max_message_bytes": 65536},
        ],
    }, SRC)
    assert cfg.log_level == "warning"
    assert cfg.drain_timeout == 1.5
    a, b = cfg.listeners
    assert a.name == "a"
    assert a.listen == Address("0.0.0.0", 8080)
    assert dict(a.routes) == {
        "default": Address("127.0.0.1", 22), "ssh": Address("::1", 22),
        "web": Address("example.com", 80), "bare": Address("localhost", 9000),
    }
    assert a.options == TunnelOptions(half_close=False, half_close_timeout=30.0, connect_timeout=4.0,
                                      max_message_bytes=100000)
    assert b.name == "b.2"
    assert b.listen == Address("::1", 8081)
    assert b.options == TunnelOptions(half_close=True, half_close_timeout=0.0, connect_timeout=0.5,
                                      max_message_bytes=65536)


# ---------------------------------------------------------------------------
# Problems: each names the file, the tunnel/listener and the field


@pytest.mark.parametrize(("key", "suggestion"), [
    ("nmae", "name"), ("lisen", "listen"), ("halfclose", "half_close"), ("rout", "route"),
    ("connect_timout", "connect_timeout"), ("header", "headers"), ("backnd", "backend"),
])
def test_unknown_tunnel_key_suggests(key: str, suggestion: str) -> None:
    problem = find(frontend_problems(front(tunnel(**{key: 1}))), f"unknown key {key!r}")
    assert problem.startswith(SRC + ":")
    assert "tunnels[0] 't'" in problem
    assert f"did you mean {suggestion!r}" in problem


def test_unknown_key_without_close_match_lists_allowed_keys() -> None:
    problem = find(frontend_problems(front(tunnel(zzzzzz=1))), "unknown key 'zzzzzz'")
    assert "name" in problem
    assert "listen" in problem


def test_unknown_top_level_key_suggests() -> None:
    find(frontend_problems(front(tunel=[])), SRC, "unknown key 'tunel'", "did you mean 'tunnels'")
    find(frontend_problems(front(log_levle="info")), SRC, "unknown key 'log_levle'", "did you mean 'log_level'")
    find(backend_problems(back(listener=[])), SRC, "unknown key 'listener'", "did you mean 'listeners'")


def test_frontend_only_keys_rejected_in_backend() -> None:
    problems = backend_problems(back(listener(route="x"), backend="ws://h/"))
    find(problems, "unknown key 'backend'")
    find(problems, "listeners[0] 'main'", "unknown key 'route'", "did you mean 'routes'")


def test_unknown_listener_key_suggests() -> None:
    find(backend_problems(back(listener(rutes={}))), SRC, "listeners[0] 'main'", "unknown key 'rutes'",
         "did you mean 'routes'")


@pytest.mark.parametrize("missing", ["name", "listen"])
def test_tunnel_missing_required(missing: str) -> None:
    entry = tunnel()
    del entry[missing]
    find(frontend_problems(front(entry)), SRC, "tunnels[0]", f"missing {missing!r}")


@pytest.mark.parametrize("missing", ["name", "listen", "routes"])
def test_listener_missing_required(missing: str) -> None:
    entry = listener()
    del entry[missing]
    find(backend_problems(back(entry)), SRC, "listeners[0]", f"missing {missing!r}")


def test_tunnel_without_any_backend() -> None:
    find(frontend_problems({"tunnels": [tunnel()]}), SRC, "tunnels[0] 't'", "backend")


@pytest.mark.parametrize("value", [None, [], {}, "x", 5])
def test_tunnels_must_be_a_non_empty_list(value: object) -> None:
    find(frontend_problems({"backend": "ws://h/", "tunnels": value}), SRC, "tunnels", "non-empty list")


@pytest.mark.parametrize("value", [None, [], {}, "x"])
def test_listeners_must_be_a_non_empty_list(value: object) -> None:
    find(backend_problems({"listeners": value}), SRC, "listeners", "non-empty list")


@pytest.mark.parametrize("entry", ["t", 5, None, ["name", "t"]])
def test_tunnel_entry_must_be_a_mapping(entry: object) -> None:
    find(frontend_problems(front(tunnel(), entry)), SRC, "tunnels[1]", "mapping")


@pytest.mark.parametrize("data", [None, [], "text", 5])
def test_document_must_be_a_mapping(data: object) -> None:
    find(frontend_problems(data), SRC, "mapping")
    find(backend_problems(data), SRC, "mapping")


def test_duplicate_tunnel_names() -> None:
    problems = frontend_problems(front(tunnel(name="a", listen=7001), tunnel(name="a", listen=7002)))
    problem = find(problems, "duplicate name 'a'")
    assert problem.startswith(SRC + ":")
    assert "tunnels[1]" in problem
    assert "tunnels[0]" in problem


def test_duplicate_listener_names() -> None:
    problems = backend_problems(back(listener(name="x", listen=8001), listener(name="x", listen=8002)))
    find(problems, SRC, "listeners[1]", "duplicate name 'x'")


@pytest.mark.parametrize(("first", "second"), [
    ("127.0.0.1:7000", "127.0.0.1:7000"),
    (7000, "127.0.0.1:7000"),            # bare port means 127.0.0.1
    ("0.0.0.0:7000", "127.0.0.1:7000"),   # wildcard vs a specific host
    ("127.0.0.1:7000", "0.0.0.0:7000"),
    ("0.0.0.0:7000", "192.0.2.1:7000"),
    ("[::]:7000", "[::1]:7000"),
    ("[::1]:7000", "[::]:7000"),
    ("[::1]:7000", "[::1]:7000"),
])
def test_duplicate_listen_ports(first: object, second: object) -> None:
    problems = frontend_problems(front(tunnel(name="a", listen=first), tunnel(name="b", listen=second)))
    problem = find(problems, "tunnels[1] 'b'", "listen", "7000")
    assert problem.startswith(SRC + ":")
    assert "tunnels[0] 'a'" in problem
    problems = backend_problems(back(listener(name="a", listen=first), listener(name="b", listen=second)))
    find(problems, SRC, "listeners[1] 'b'", "listen", "listeners[0] 'a'")


@pytest.mark.parametrize(("first", "second"), [
    ("127.0.0.1:7000", "127.0.0.1:7001"),
    ("127.0.0.1:7000", "127.0.0.2:7000"),
    ("[::1]:7000", "127.0.0.1:7000"),
])
def test_distinct_listen_addresses_accepted(first: str, second: str) -> None:
    cfg = parse_frontend(front(tunnel(name="a", listen=first), tunnel(name="b", listen=second)), SRC)
    assert len(cfg.tunnels) == 2


@pytest.mark.parametrize("url", ["http://h/", "https://h/", "tcp://h:1", "h:8080"])
def test_bad_backend_scheme(url: str) -> None:
    find(frontend_problems(front(tunnel(backend=url))), SRC, "tunnels[0] 't'", "backend", "scheme")
    find(frontend_problems({"backend": url, "tunnels": [tunnel()]}), SRC, "backend", "scheme")


@pytest.mark.parametrize("url", ["ws://h:0/", "ws://h:70000/", "ws://::1:8080/"])
def test_bad_backend_port_or_host(url: str) -> None:
    find(frontend_problems(front(tunnel(backend=url))), SRC, "tunnels[0] 't'", "backend")


@pytest.mark.parametrize(("listen", "fragment"), [
    ("127.0.0.1:0", "out of range"),
    ("127.0.0.1:70000", "70000"),
    (0, "out of range"),
    (70000, "70000"),
    ("::1:8080", "bracket"),
    ("[::1:8080", "bracket"),
    ("127.0.0.1:", "port"),
    (True, "bool"),
    ([1], "list"),
])
def test_bad_listen(listen: object, fragment: str) -> None:
    find(frontend_problems(front(tunnel(listen=listen))), SRC, "tunnels[0] 't'", "listen", fragment)
    find(backend_problems(back(listener(listen=listen))), SRC, "listeners[0] 'main'", "listen", fragment)


@pytest.mark.parametrize("target", ["h:0", "h:70000", "::1:22", "", True, None, "h:x"])
def test_bad_route_target(target: object) -> None:
    find(backend_problems(back(listener(routes={"ssh": target}))), SRC, "listeners[0] 'main'", "routes", "'ssh'")


@pytest.mark.parametrize("route", ["", "a/b", "..", ".x", "-x", "_x", "a b", "x" * 65, "é", 5, True, None])
def test_bad_route_names(route: object) -> None:
    find(frontend_problems(front(tunnel(route=route))), SRC, "tunnels[0] 't'", "route")
    find(backend_problems(back(listener(routes={route: "127.0.0.1:22"}))), SRC, "listeners[0] 'main'", "routes")


@pytest.mark.parametrize("routes", [{}, None, [], "default: 22"])
def test_routes_must_be_a_non_empty_mapping(routes: object) -> None:
    find(backend_problems(back(listener(routes=routes))), SRC, "listeners[0] 'main'", "routes")


@pytest.mark.parametrize("name", ["", "a b", "-a", "a/b", "x" * 65, 5, True, None, "ü"])
def test_bad_names(name: object) -> None:
    find(frontend_problems(front(tunnel(name=name))), SRC, "tunnels[0]", "name")
    find(backend_problems(back(listener(name=name))), SRC, "listeners[0]", "name")


@pytest.mark.parametrize("header", [
    "Host", "host", "Upgrade", "Connection", "Sec-WebSocket-Key", "sec-websocket-key", "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions", "Sec-WebSocket-Accept", "Content-Length", "Transfer-Encoding",
    "X-Tcpbridge-Resume", "x-tcpbridge-session",
])
def test_reserved_headers_rejected(header: str) -> None:
    find(frontend_problems(front(tunnel(headers={header: "x"}))), SRC, "tunnels[0] 't'", "headers", header)
    find(frontend_problems(front(headers={header: "x"})), SRC, "headers", header)


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\0b", "\r\n"])
def test_header_values_with_line_breaks_rejected(value: str) -> None:
    find(frontend_problems(front(tunnel(headers={"X-Token": value}))), SRC, "tunnels[0] 't'", "headers",
         "X-Token")
    find(frontend_problems(front(headers={"X-Token": value})), SRC, "headers", "X-Token")


@pytest.mark.parametrize("name", ["X Bad", "X:Y", "", "X\r\nY", "Ü"])
def test_bad_header_names_rejected(name: str) -> None:
    find(frontend_problems(front(tunnel(headers={name: "v"}))), SRC, "tunnels[0] 't'", "headers")


@pytest.mark.parametrize("headers", [["X-A: b"], "X-A: b", 5])
def test_headers_must_be_a_mapping(headers: object) -> None:
    find(frontend_problems(front(tunnel(headers=headers))), SRC, "tunnels[0] 't'", "headers")


@pytest.mark.parametrize("value", [[1], {"a": 1}, None, True])
def test_header_value_must_be_text(value: object) -> None:
    find(frontend_problems(front(tunnel(headers={"X-A": value}))), SRC, "tunnels[0] 't'", "headers", "X-A")


def test_header_with_ordinary_value_accepted() -> None:
    t = parse_frontend(front(tunnel(headers={"Authorization": "Bearer abc", "X-N": 5})), SRC).tunnels[0]
    assert literal_headers(t) == {"Authorization": "Bearer abc", "X-N": "5"}


@pytest.mark.parametrize("value", [65535, 1024, 0, -1])
def test_max_message_bytes_below_go_frontend_size(value: int) -> None:
    find(frontend_problems(front(tunnel(max_message_bytes=value))), SRC, "tunnels[0] 't'", "max_message_bytes",
         "65536")
    find(frontend_problems(front(max_message_bytes=value)), SRC, "max_message_bytes", "65536")
    find(backend_problems(back(listener(max_message_bytes=value))), SRC, "listeners[0] 'main'",
         "max_message_bytes")


def test_resume_is_on_with_a_4_mib_buffer_unless_configured() -> None:
    t = parse_frontend(front(tunnel()), SRC).tunnels[0]
    assert (t.options.resume, t.options.resume_buffer) == (True, 4 * 1024 * 1024)
    t = parse_frontend(front(tunnel(resume=False), resume_buffer=65536), SRC).tunnels[0]
    assert (t.options.resume, t.options.resume_buffer) == (False, 65536)
    t = parse_frontend(front(tunnel(resume=True), resume=False), SRC).tunnels[0]
    assert t.options.resume  # the tunnel's own setting wins
    t = parse_frontend(front(tunnel(), resume=False), SRC).tunnels[0]
    assert not t.options.resume  # the top-level setting is every tunnel's default
    listener_options = parse_backend(back(listener(resume=False, resume_buffer=1 << 30, resume_timeout=5)),
                                     SRC).listeners[0].options
    assert (listener_options.resume, listener_options.resume_buffer) == (False, 1 << 30)
    assert listener_options.resume_timeout == 5.0 and t.options.resume_timeout == 60.0
    assert parse_backend(back(listener()), SRC).listeners[0].options.resume


@pytest.mark.parametrize("value", [65535, 0, -1, (1 << 30) + 1, "4MiB", 1.5, True])
def test_resume_buffer_out_of_range_names_the_range(value: object) -> None:
    expected = "64 KiB" if isinstance(value, int) and not isinstance(value, bool) else "whole number of bytes"
    find(frontend_problems(front(tunnel(resume_buffer=value))), SRC, "tunnels[0] 't'", "resume_buffer", expected)
    find(backend_problems(back(listener(resume_buffer=value))), SRC, "listeners[0] 'main'", "resume_buffer")


def test_resume_must_be_true_or_false() -> None:
    find(frontend_problems(front(resume="yes please")), SRC, "resume", "true or false")


@pytest.mark.parametrize("key", ["half_close_timeout", "connect_timeout"])
@pytest.mark.parametrize("value", [-1, -0.5])
def test_negative_timeouts(key: str, value: float) -> None:
    find(frontend_problems(front(tunnel(**{key: value}))), SRC, "tunnels[0] 't'", key)
    find(frontend_problems(front(**{key: value})), SRC, key)
    find(backend_problems(back(listener(**{key: value}))), SRC, "listeners[0] 'main'", key)


def test_connect_timeout_zero_rejected() -> None:
    find(frontend_problems(front(tunnel(connect_timeout=0))), SRC, "tunnels[0] 't'", "connect_timeout")


@pytest.mark.parametrize("key", ["half_close_timeout", "connect_timeout"])
def test_nan_timeout_rejected(key: str) -> None:
    """NaN is not 'a number of seconds >= 0'; a NaN deadline never compares true."""
    find(frontend_problems(front(**{key: float("nan")})), SRC, key)
    find(frontend_problems(front(tunnel(**{key: float("nan")}))), SRC, "tunnels[0] 't'", key)


@pytest.mark.parametrize("value", [-1, -0.1, "10", True])
def test_bad_top_level_drain_timeout(value: object) -> None:
    find(frontend_problems(front(drain_timeout=value)), SRC, "drain_timeout")
    find(backend_problems(back(drain_timeout=value)), SRC, "drain_timeout")


@pytest.mark.parametrize("value", ["loud", "trace", "", 5, True, None])
def test_bad_log_level(value: object) -> None:
    find(frontend_problems(front(log_level=value)), SRC, "log_level")
    find(backend_problems(back(log_level=value)), SRC, "log_level")


@pytest.mark.parametrize(("key", "value"), [
    ("half_close", "true"),
    ("half_close", "yes"),
    ("half_close", 1),
    ("half_close", None),
    ("half_close_timeout", "60"),
    ("half_close_timeout", True),
    ("connect_timeout", "10s"),
    ("connect_timeout", [1]),
    ("max_message_bytes", "65536"),
    ("max_message_bytes", 65536.0),
    ("max_message_bytes", True),
    ("max_message_bytes", "1MiB"),
])
def test_wrong_types(key: str, value: object) -> None:
    find(frontend_problems(front(tunnel(**{key: value}))), SRC, "tunnels[0] 't'", key)
    find(backend_problems(back(listener(**{key: value}))), SRC, "listeners[0] 'main'", key)
    find(frontend_problems(front(**{key: value})), SRC, key)


def test_several_problems_in_one_file_all_reported() -> None:
    problems = frontend_problems({
        "backend": "http://h/",
        "colour": "blue",
        "connect_timeout": -1,
        "tunnels": [
            {"name": "a", "listen": "127.0.0.1:0", "half_close": "yes"},
            {"name": "b", "listen": "127.0.0.1:7001", "backend": "ws://h/", "headers": {"Host": "x"}},
            {"name": "b", "listen": "127.0.0.1:7001", "backend": "ws://h/", "max_message_bytes": 10},
            {"listen": "::1:7003", "backend": "ws://h/"},
        ],
    })
    find(problems, "backend", "scheme")
    find(problems, "unknown key 'colour'")
    find(problems, "connect_timeout")
    find(problems, "tunnels[0] 'a'", "listen")
    find(problems, "tunnels[0] 'a'", "half_close")
    find(problems, "tunnels[1] 'b'", "headers", "Host")
    find(problems, "tunnels[2] 'b'", "duplicate name 'b'")
    find(problems, "tunnels[2] 'b'", "listen", "already used")
    find(problems, "tunnels[2] 'b'", "max_message_bytes")
    find(problems, "tunnels[3]", "missing 'name'")
    find(problems, "tunnels[3]", "listen", "bracket")
    assert len(problems) >= 11
    assert all(p.startswith(SRC + ": ") for p in problems)


def test_several_backend_problems_all_reported() -> None:
    problems = backend_problems({
        "listeners": [
            {"name": "a", "listen": 8080, "routes": {"ssh": "h:0", "bad/name": 22}},
            {"name": "a", "listen": "127.0.0.1:8080", "routes": {}},
            {"name": "c", "listen": 8082},
        ],
        "half_close": "no",
    })
    find(problems, "listeners[0] 'a'", "routes", "'ssh'")
    find(problems, "listeners[0] 'a'", "routes", "bad/name")
    find(problems, "listeners[1] 'a'", "duplicate name")
    find(problems, "listeners[1] 'a'", "already used")
    find(problems, "listeners[1] 'a'", "routes")
    find(problems, "listeners[2] 'c'", "missing 'routes'")
    find(problems, "half_close")


# ---------------------------------------------------------------------------
# Files


def write(tmp_path: Path, text: str, name: str = "conf.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


FRONTEND_TEXT = """\
backend: ws://127.0.0.1:8080/
tunnels:
  - name: a
    listen: 127.0.0.1:7000
"""


def test_load_dispatches_on_tunnels_or_listeners(tmp_path: Path) -> None:
    f = load(write(tmp_path, FRONTEND_TEXT, "f.yaml"))
    assert isinstance(f, FrontendConfig)
    assert f.source == str(tmp_path / "f.yaml")
    b = load(write(tmp_path, "listeners:\n  - {name: m, listen: 8080, routes: {default: 22}}\n", "b.yaml"))
    assert isinstance(b, BackendConfig)
    assert b.listeners[0].routes == {"default": Address("localhost", 22)}


@pytest.mark.parametrize("text", [
    "", "# only a comment\n", "{}\n", "backend: ws://h/\n", "- a\n- b\n", "just text\n",
    "tunnels: []\nlisteners: []\n",
])
def test_neither_frontend_nor_backend(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    (problem,) = file_problems(path)
    assert problem.startswith(f"{path}: ")
    assert "tunnels" in problem
    assert "listeners" in problem


@pytest.mark.parametrize(("text", "line"), [
    ("backend: ws://h/\ntunnels:\n  - name: a: b\n", 3),
    ("tunnels:\n\t- name: a\n", 2),
    ('backend: "ws://h/\ntunnels: []\n', None),
    ("backend: ws://h/\ntunnels:\n  - name: a\n    listen: [1\n", None),
])
def test_yaml_syntax_errors_name_file_line_col(tmp_path: Path, text: str, line: int | None) -> None:
    path = write(tmp_path, text)
    (problem,) = file_problems(path)
    match = re.match(rf"{re.escape(str(path))}:(\d+):(\d+): .*YAML", problem)
    assert match, problem
    if line is not None:
        assert int(match.group(1)) == line


@pytest.mark.parametrize(("text", "key", "line"), [
    ("backend: ws://h/\nbackend: ws://other/\ntunnels: []\n", "backend", 2),
    ("backend: ws://h/\ntunnels:\n  - name: a\n    listen: 1\n    listen: 2\n", "listen", 5),
    ("listeners:\n  - name: m\n    listen: 1\n    routes:\n      ssh: 22\n      ssh: 23\n", "ssh", 6),
])
def test_duplicate_yaml_keys_rejected(tmp_path: Path, text: str, key: str, line: int) -> None:
    path = write(tmp_path, text)
    (problem,) = file_problems(path)
    assert problem.startswith(f"{path}:{line}:")
    assert "duplicate" in problem
    assert repr(key) in problem


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    (problem,) = file_problems(path)
    assert problem.startswith(str(path))
    assert "cannot read" in problem


def test_not_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"backend: ws://h/\n# caf\xe9\n")
    (problem,) = file_problems(path)
    assert problem.startswith(str(path))
    assert "UTF-8" in problem


def test_file_problems_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FRONTEND_TEXT + "    nmae: x\n")
    problem = find(file_problems(path), "unknown key 'nmae'")
    assert problem.startswith(f"{path}: tunnels[0] 'a'")


def test_load_frontend_and_load_backend_on_the_wrong_file(tmp_path: Path) -> None:
    f = write(tmp_path, FRONTEND_TEXT, "f.yaml")
    with pytest.raises(ConfigError) as info:
        config.load_backend(f)
    find(info.value.problems, str(f), "listeners")
    assert isinstance(config.load_frontend(f), FrontendConfig)


def test_shipped_frontend_conf_loads() -> None:
    cfg = load(ROOT / "conf" / "frontend.yaml")
    assert isinstance(cfg, FrontendConfig)
    names = [t.name for t in cfg.tunnels]
    assert "echo" in names
    assert len(set(names)) == len(names)
    for t in cfg.tunnels:
        assert t.listen.host == "127.0.0.1"  # never all interfaces by default
        assert t.url.startswith("ws://")
        prefix = urlsplit(t.backend).path.rstrip("/")
        assert protocol.route_for_path(urlsplit(t.url).path[len(prefix):]) == t.route


def test_shipped_backend_conf_loads() -> None:
    cfg = load(ROOT / "conf" / "backend.yaml")
    assert isinstance(cfg, BackendConfig)
    assert cfg.listeners
    for listener_ in cfg.listeners:
        assert listener_.listen.host == "127.0.0.1"
        assert listener_.routes


def test_shipped_confs_fit_together() -> None:
    """Every shipped frontend tunnel reaches a route the shipped backend serves, on its port."""
    front_cfg = load(ROOT / "conf" / "frontend.yaml")
    back_cfg = load(ROOT / "conf" / "backend.yaml")
    assert isinstance(front_cfg, FrontendConfig)
    assert isinstance(back_cfg, BackendConfig)
    served = {(str(lst.listen), route) for lst in back_cfg.listeners for route in lst.routes}
    for t in front_cfg.tunnels:
        netloc = urlsplit(t.backend).netloc
        assert (netloc, t.route) in served, (t.name, netloc, t.route, served)


# ---------------------------------------------------------------------------
# workers and cpu_affinity (top level, both daemons)

WORKERS_RULE = "expected a whole number from 1 to 256, or auto (one worker per CPU this daemon may run on)"
AFFINITY_RULE = "auto (pin each of several workers to its own CPU), false (never pin) or a list of CPU numbers"


def both(**top: Any) -> list[FrontendConfig | BackendConfig]:
    """The same top-level keys parsed as a frontend and as a backend file."""
    return [parse_frontend(front(**top), SRC), parse_backend(back(**top), SRC)]


def both_problems(**top: Any) -> list[list[str]]:
    return [frontend_problems(front(**top)), backend_problems(back(**top))]


def test_workers_and_cpu_affinity_defaults() -> None:
    for cfg in both():
        assert cfg.workers == "auto"
        assert cfg.cpu_affinity == "auto"
    assert FrontendConfig(tunnels=()).workers == "auto"
    assert BackendConfig(listeners=()).cpu_affinity == "auto"


def test_workers_and_cpu_affinity_are_service_keys_of_both_daemons() -> None:
    assert {"workers", "cpu_affinity"} <= set(config._SERVICE_KEYS)
    assert {"workers", "cpu_affinity"} <= set(config._FRONTEND_KEYS) & set(config._BACKEND_KEYS)
    for key in ("workers", "cpu_affinity"):  # top level only: not a per-tunnel or per-listener option
        assert key not in config._TUNNEL_KEYS
        assert key not in config._LISTENER_KEYS
        find(frontend_problems(front(tunnel(**{key: 2}))), "tunnels[0] 't'", f"unknown key {key!r}")
        find(backend_problems(back(listener(**{key: 2}))), "listeners[0] 'main'", f"unknown key {key!r}")


def test_misspelt_workers_key_suggests() -> None:
    find(frontend_problems(front(worker=2)), SRC, "unknown key 'worker'", "did you mean 'workers'")
    find(backend_problems(back(cpu_afinity=[0])), SRC, "unknown key 'cpu_afinity'", "did you mean 'cpu_affinity'")


@pytest.mark.parametrize(("value", "expected"), [
    (1, 1), (2, 2), (256, 256), ("auto", "auto"), ("AUTO", "auto"), ("Auto", "auto"),
])
def test_workers_accepted(value: object, expected: object) -> None:
    for cfg in both(workers=value):
        assert cfg.workers == expected
        assert type(cfg.workers) is type(expected)


@pytest.mark.parametrize(("value", "kind"), [
    (0, "int 0"), (-1, "int -1"), (257, "int 257"), (10**30, f"int {10**30}"),
    (True, "bool True"), (False, "bool False"),   # YAML true is not 1, false not 0
    (2.0, "float 2.0"), ("4", "str '4'"), ("", "str ''"), ("many", "str 'many'"), ("auto ", "str 'auto '"),
    (None, "nothing"), ([2], "list"), ({"count": 2}, "dict"),
])
def test_bad_workers(value: object, kind: str) -> None:
    for problems in both_problems(workers=value):
        assert problems == [f"{SRC}: workers: {WORKERS_RULE}, got {kind}"]


@pytest.mark.parametrize(("value", "expected"), [
    ("auto", "auto"), ("AUTO", "auto"), (False, False),
    ([0], (0,)), ([3, 1], (3, 1)), ([0, 1, 2, 3], (0, 1, 2, 3)), ([1023], (1023,)),
])
def test_cpu_affinity_accepted(value: object, expected: object) -> None:
    for cfg in both(cpu_affinity=value):
        assert cfg.cpu_affinity == expected
        assert type(cfg.cpu_affinity) is type(expected)


@pytest.mark.parametrize(("value", "message"), [
    (True, f"true is not accepted: write {AFFINITY_RULE}, like [0, 1]"),
    ([], "expected at least one CPU number, like [0, 1] (false: never pin)"),
    ([0, 0], "CPU 0 is listed twice; list each CPU once (worker i is pinned to the i-th CPU of the list, in turn)"),
    ([1, 2, 1], "CPU 1 is listed twice; list each CPU once (worker i is pinned to the i-th CPU of the list, "
                "in turn)"),
    ([-1], "CPU -1 is negative; CPUs are numbered from 0"),
    ([0, -2], "CPU -2 is negative; CPUs are numbered from 0"),
    (["a"], "expected a list of CPU numbers (whole numbers >= 0), but it holds str 'a'"),
    ([0, 1.0], "expected a list of CPU numbers (whole numbers >= 0), but it holds float 1.0"),
    ([True], "expected a list of CPU numbers (whole numbers >= 0), but it holds bool True"),
    ([None], "expected a list of CPU numbers (whole numbers >= 0), but it holds nothing"),
    ([[0]], "expected a list of CPU numbers (whole numbers >= 0), but it holds list"),
    (0, f"expected {AFFINITY_RULE}, like [0, 1], got int 0"),
    ("0-3", f"expected {AFFINITY_RULE}, like [0, 1], got str '0-3'"),
    ("false", f"expected {AFFINITY_RULE}, like [0, 1], got str 'false'"),
    (None, f"expected {AFFINITY_RULE}, like [0, 1], got nothing"),
    ({"cpus": [0]}, f"expected {AFFINITY_RULE}, like [0, 1], got dict"),
])
def test_bad_cpu_affinity(value: object, message: str) -> None:
    for problems in both_problems(cpu_affinity=value):
        assert problems == [f"{SRC}: cpu_affinity: {message}"]


def test_bad_workers_and_cpu_affinity_reported_with_the_other_problems() -> None:
    problems = frontend_problems(front(tunnel(half_close="yes"), workers=0, cpu_affinity=[0, 0], drain_timeout=-1))
    assert len(problems) == 4, problems
    find(problems, "workers", "got int 0")
    find(problems, "cpu_affinity", "CPU 0 is listed twice")
    find(problems, "tunnels[0] 't'", "half_close")
    find(problems, "drain_timeout")


@pytest.mark.parametrize(("text", "workers", "cpu_affinity"), [
    ("workers: 4\ncpu_affinity: [0, 2]\n", 4, (0, 2)),
    ("workers: auto\ncpu_affinity: false\n", "auto", False),
    ("workers: 1\ncpu_affinity: no\n", 1, False),   # YAML 1.1: no is false
    ("cpu_affinity: [ 3 ]\n", "auto", (3,)),
    ("cpu_affinity: auto\n", "auto", "auto"),
])
def test_workers_and_cpu_affinity_from_yaml_files(tmp_path: Path, text: str, workers: object,
                                                 cpu_affinity: object) -> None:
    f = load(write(tmp_path, text + FRONTEND_TEXT, "f.yaml"))
    b = load(write(tmp_path, text + "listeners:\n  - {name: m, listen: 8080, routes: {default: 22}}\n", "b.yaml"))
    for cfg in (f, b):
        assert (cfg.workers, cfg.cpu_affinity) == (workers, cpu_affinity)


@pytest.mark.parametrize(("text", "fragment"), [
    ("workers: true\n", "workers: " + WORKERS_RULE + ", got bool True"),
    ("workers: '2'\n", "workers: " + WORKERS_RULE + ", got str '2'"),
    ("workers: 0\n", "workers: " + WORKERS_RULE + ", got int 0"),
    ("cpu_affinity: true\n", "cpu_affinity: true is not accepted"),
    ("cpu_affinity: yes\n", "cpu_affinity: true is not accepted"),
    ("cpu_affinity: [0, 0]\n", "cpu_affinity: CPU 0 is listed twice"),
    ("cpu_affinity: [-1]\n", "cpu_affinity: CPU -1 is negative"),
    ("cpu_affinity: []\n", "cpu_affinity: expected at least one CPU number"),
    ("cpu_affinity: 0-3\n", "cpu_affinity: expected auto"),
])
def test_bad_workers_and_cpu_affinity_in_yaml_files(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text + FRONTEND_TEXT, "f.yaml")
    (problem,) = file_problems(path)
    assert problem.startswith(f"{path}: {fragment}"), problem


@pytest.mark.parametrize(("value", "expected"), [
    (1, 1), (256, 256), ("auto", "auto"), ("AuTo", "auto"),
])
def test_parse_workers(value: object, expected: object) -> None:
    assert config.parse_workers(value) == expected


@pytest.mark.parametrize("value", [0, 257, -3, True, False, 1.0, "1", "", None])
def test_parse_workers_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=re.escape(WORKERS_RULE)):
        config.parse_workers(value)


def test_parse_cpu_affinity_keeps_the_order_written() -> None:
    assert config.parse_cpu_affinity([5, 0, 3]) == (5, 0, 3)
    assert config.parse_cpu_affinity("auto") == "auto"
    assert config.parse_cpu_affinity(False) is False


# worker_cpus: which CPU each worker is pinned to (None: not pinned)

@pytest.mark.parametrize(("affinity", "workers", "available", "expected"), [
    # auto: one worker is never pinned; several take the available CPUs in ascending order, in turn
    ("auto", 1, [0, 1, 2, 3], [None]),
    ("auto", 2, [0, 1, 2, 3], [0, 1]),
    ("auto", 4, [3, 1, 2, 0], [0, 1, 2, 3]),
    ("auto", 5, [2, 5], [2, 5, 2, 5, 2]),
    ("auto", 3, [7], [7, 7, 7]),
    ("auto", 3, {6, 4}, [4, 6, 4]),            # a set, as os.sched_getaffinity returns
    ("auto", 3, [1, 1, 0], [0, 1, 0]),         # repeats do not count twice
    # false: never pinned
    (False, 1, [0, 1], [None]),
    (False, 4, [0, 1], [None, None, None, None]),
    (False, 2, [], [None, None]),
    # a list: worker i gets entry i % len, also a single worker, whatever is available
    ((3,), 1, [0, 1, 2, 3], [3]),
    ((2, 0), 1, [0, 1, 2], [2]),
    ((2, 0), 5, [0, 1, 2], [2, 0, 2, 0, 2]),
    ((0, 1, 2, 3), 2, [0, 1, 2, 3], [0, 1]),
    ((9,), 2, [], [9, 9]),
])
def test_worker_cpus(affinity: config.CpuAffinity, workers: int, available: Any, expected: list[int | None]) -> None:
    assert config.worker_cpus(affinity, workers, available) == expected


def test_worker_cpus_from_parsed_values() -> None:
    cfg = parse_backend(back(workers=3, cpu_affinity=[1, 0]), SRC)
    assert isinstance(cfg.workers, int)
    assert config.worker_cpus(cfg.cpu_affinity, cfg.workers, [0, 1]) == [1, 0, 1]


@pytest.mark.parametrize(("affinity", "workers", "available", "fragment"), [
    ("auto", 0, [0], "workers must be at least 1, got 0"),
    (False, -1, [0], "workers must be at least 1, got -1"),
    ("auto", 2, [], "needs at least one available CPU"),
    ((), 2, [0], "empty list of CPUs"),
])
def test_worker_cpus_rejects(affinity: config.CpuAffinity, workers: int, available: list[int], fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        config.worker_cpus(affinity, workers, available)


# ---------------------------------------------------------------------------
# log_target (top level, both daemons)

LOG_TARGET_RULE = "expected auto (the journal with fields when stderr is the journal, else stderr), journal or stderr"


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("journal", "journal"), ("STDERR", "stderr")])
def test_log_target_accepted(value: object, expected: str) -> None:
    for cfg in both(log_target=value):
        assert cfg.log_target == expected


def test_log_target_defaults_to_auto_and_is_a_top_level_start_time_key() -> None:
    for cfg in both():
        assert cfg.log_target == "auto"
    assert "log_target" in set(config._FRONTEND_KEYS) & set(config._BACKEND_KEYS)
    assert "log_target" not in config._TUNNEL_KEYS and "log_target" not in config._LISTENER_KEYS
    assert "log_target" in START_TIME_KEYS


@pytest.mark.parametrize(("value", "kind"), [("syslog", "str 'syslog'"), (True, "bool True"), (None, "nothing")])
def test_bad_log_target(value: object, kind: str) -> None:
    for problems in both_problems(log_target=value):
        assert problems == [f"{SRC}: log_target: {LOG_TARGET_RULE}, got {kind}"]


@pytest.mark.parametrize("value", [0, -1, "a minute"])
def test_resume_timeout_must_be_seconds_above_zero(value: object) -> None:
    find(frontend_problems(front(tunnel(resume_timeout=value))), SRC, "tunnels[0] 't'", "resume_timeout", "seconds")
    find(backend_problems(back(listener(resume_timeout=value))), SRC, "listeners[0] 'main'", "resume_timeout")
