"""Property tests (hypothesis): the hex decoder, the bridge path helpers and the config loader.

Every property is bounded (at most 200 examples, no deadline) and derandomized, so a run
is reproducible and the whole file stays within a few seconds.
"""

from __future__ import annotations

import binascii
import contextlib
import string
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bridge import config, protocol
from bridge.config import ConfigError, parse_backend, parse_frontend
from bridge.protocol import END_OF_STREAM, CloseCode, MessageDecoder, ProtocolViolation

BOUNDED = settings(max_examples=200, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SMALL = settings(BOUNDED, max_examples=60)

HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


# ---------------------------------------------------------------------------
# MessageDecoder


def _mixed_case(text: str, upper: list[bool]) -> str:
    return "".join(c.upper() if upper[i % len(upper)] else c for i, c in enumerate(text)) if upper else text


def _cut(text: str, cuts: list[int]) -> list[str]:
    """Split ``text`` at the given (unsorted, possibly repeated) positions: empty pieces are kept."""
    points = sorted(c % (len(text) + 1) for c in cuts)
    pieces, start = [], 0
    for point in points:
        pieces.append(text[start:point])
        start = point
    pieces.append(text[start:])
    return pieces


@st.composite
def fragmented_stream(draw: st.DrawFn) -> tuple[list[bytes | None], list[tuple[str | bytes, bool]]]:
    """Messages (None = an empty message, the end-of-stream marker) and the fragments that carry them."""
    messages: list[bytes | None] = draw(st.lists(st.none() | st.binary(min_size=1, max_size=300), max_size=8))
    fragments: list[tuple[str | bytes, bool]] = []
    for message in messages:
        hex_text = binascii.hexlify(message or b"").decode("ascii")
        hex_text = _mixed_case(hex_text, draw(st.lists(st.booleans(), max_size=16)))
        pieces = _cut(hex_text, draw(st.lists(st.integers(0, 1000), max_size=6)))
        for index, piece in enumerate(pieces):
            as_bytes = draw(st.booleans())  # websocket-client hands bytes, wsproto str
            fragments.append((piece.encode("ascii") if as_bytes else piece, index == len(pieces) - 1))
    return messages, fragments


@BOUNDED
@given(fragmented_stream())
@example(([b"\x00\xff", None, b"hi"], [("00", False), (b"F", False), ("f", True), ("", True),
                                        ("68", False), ("", False), (b"69", True)]))
def test_decoder_returns_exactly_what_was_encoded(case: tuple[list[bytes | None], list[Any]]) -> None:
    """Any bytes, hex in either case, cut anywhere: decoded back exactly; empty messages end the stream."""
    messages, fragments = case
    decoder = MessageDecoder(max_message_bytes=1 << 20)
    events: list[bytes | object] = []
    current = bytearray()
    for payload, finished in fragments:
        result = decoder.feed(payload, binary=False, message_finished=finished)
        if result is END_OF_STREAM:
            assert finished and not current
            events.append(END_OF_STREAM)
            continue
        assert isinstance(result, bytes)
        current += result
        if finished:
            events.append(bytes(current))
            current.clear()
    assert events == [END_OF_STREAM if message is None else message for message in messages]


NON_HEX = st.characters(codec="utf-8").filter(lambda c: c not in HEX_DIGITS)


@st.composite
def invalid_message(draw: st.DrawFn) -> tuple[str, list[str | bytes]]:
    """One message whose text is not valid hex: a bad character somewhere, or an odd length."""
    prefix = binascii.hexlify(draw(st.binary(max_size=200))).decode("ascii")
    if draw(st.booleans()):
        bad = draw(NON_HEX)
        rest = draw(st.text(max_size=40))
        text = prefix + draw(st.sampled_from(["", "a", "0"])) + bad + rest
    else:
        text = prefix + draw(st.sampled_from("0123456789abcdefABCDEF"))  # odd length
    pieces = _cut(text, draw(st.lists(st.integers(0, 1000), max_size=6)))
    fragments: list[str | bytes] = []
    for piece in pieces:
        # A bytes fragment is what websocket-client hands over (raw frame bytes, UTF-8 on the wire).
        fragments.append(piece.encode("utf-8") if draw(st.booleans()) else piece)
    return text, fragments


def _valid_prefix(text: str) -> str:
    for index, char in enumerate(text):
        if char not in HEX_DIGITS:
            return text[:index]
    return text


@BOUNDED
@given(invalid_message())
@example(("6869zz", ["68", "69", "zz"]))
@example(("686", ["68", "6"]))
@example(("68\u00e969", ["68", "\u00e969"]))
@example(("68 69", [b"68 69"]))
def test_invalid_hex_raises_1007_and_never_returns_wrong_bytes(case: tuple[str, list[str | bytes]]) -> None:
    text, fragments = case
    decoder = MessageDecoder(max_message_bytes=1 << 20)
    returned = bytearray()
    violation: ProtocolViolation | None = None
    for index, payload in enumerate(fragments):
        try:
            result = decoder.feed(payload, binary=False, message_finished=index == len(fragments) - 1)
        except ProtocolViolation as exc:
            violation = exc
            break
        assert result is not END_OF_STREAM, "a non-empty message is never the end-of-stream marker"
        assert isinstance(result, bytes)
        returned += result
    assert violation is not None, f"{text!r} was accepted"
    assert violation.code == CloseCode.INVALID_DATA
    valid = _valid_prefix(text)
    good = binascii.unhexlify(valid[: len(valid) // 2 * 2])
    assert good.startswith(bytes(returned)), "bytes returned before the violation are not what was sent"


@SMALL
@given(st.integers(1, 400), st.integers(0, 400), st.lists(st.integers(0, 1000), max_size=5))
def test_message_size_limit_is_exact(limit: int, size: int, cuts: list[int]) -> None:
    """A message of more than max_message_bytes hex characters is 1009, however it is fragmented."""
    text = "ab" * (size // 2) + "c" * (size % 2)
    pieces = _cut(text, cuts)
    decoder = MessageDecoder(max_message_bytes=limit)
    try:
        for index, piece in enumerate(pieces):
            decoder.feed(piece, binary=False, message_finished=index == len(pieces) - 1)
    except ProtocolViolation as exc:
        if size > limit:
            assert exc.code == CloseCode.MESSAGE_TOO_BIG
        else:
            assert exc.code == CloseCode.INVALID_DATA and size % 2
        return
    assert size <= limit and size % 2 == 0


@SMALL
@given(st.binary(max_size=64), st.booleans())
def test_binary_messages_are_1003(payload: bytes, finished: bool) -> None:
    decoder = MessageDecoder()
    try:
        decoder.feed(payload, binary=True, message_finished=finished)
    except ProtocolViolation as exc:
        assert exc.code == CloseCode.UNSUPPORTED_DATA
    else:
        raise AssertionError("a binary message was accepted")


# ---------------------------------------------------------------------------
# bridge_url / route_for_path

ROUTE_CHARS = string.ascii_letters + string.digits + "._-"
route_names = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(string.ascii_letters + string.digits),
    st.text(ROUTE_CHARS, max_size=63),
)
segments = st.text(string.ascii_letters + string.digits + "_-~", min_size=1, max_size=8)


@BOUNDED
@given(route_names)
@example("default")
@example("a..")
@example("x" * 64)
def test_route_round_trips_through_its_path(route: str) -> None:
    assert protocol.ROUTE_NAME.fullmatch(route)
    assert protocol.route_for_path(protocol.bridge_path(route)) == route


@BOUNDED
@given(route_names, st.lists(segments, max_size=3), st.booleans(), st.sampled_from(["ws", "wss"]),
       st.sampled_from(["127.0.0.1:8080", "[::1]:1", "host.example", "h:65535"]),
       st.none() | st.text(string.ascii_letters + string.digits + "=&", min_size=1, max_size=12))
def test_bridge_url_keeps_base_and_query_and_routes_back(
    route: str, prefix: list[str], slash: bool, scheme: str, netloc: str, query: str | None
) -> None:
    path = "/" + "/".join(prefix) + ("/" if slash and prefix else "")
    base = f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")
    url = protocol.bridge_url(base, route)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc) == (scheme, netloc)
    assert parts.query == (query or "")
    expected_prefix = "".join(f"/{segment}" for segment in prefix)
    assert parts.path.startswith(expected_prefix + protocol.BRIDGE_PATH)
    # What reaches the backend once a proxy has stripped the prefix:
    assert protocol.route_for_path(parts.path[len(expected_prefix):]) == route


@BOUNDED
@given(st.text(max_size=80))
@example(protocol.BRIDGE_PATH + "/")
@example(protocol.BRIDGE_PATH + "/default")
@example(protocol.BRIDGE_PATH + "/a/b")
@example(protocol.BRIDGE_PATH + "/../x")
def test_route_for_path_only_accepts_valid_names(tail: str) -> None:
    route = protocol.route_for_path(protocol.BRIDGE_PATH + tail)
    if route is None:
        return
    assert route == protocol.DEFAULT_ROUTE or protocol.ROUTE_NAME.fullmatch(route)
    assert protocol.bridge_path(route) == protocol.BRIDGE_PATH + tail


# ---------------------------------------------------------------------------
# Config loader: nothing but ConfigError escapes

KEY_WORDS = ["name", "listen", "backend", "route", "routes", "headers", "basic_auth", "tls", "proxy",
             "max_connections", "half_close", "half_close_timeout", "connect_timeout", "max_message_bytes",
             "ping_interval", "ping_timeout", "idle_timeout", "log_level", "drain_timeout", "tunnels",
             "listeners", "token", "allowed_origins", "max_tunnels", "target", "value", "env", "file",
             "command", "prefix", "cache_seconds", "username", "password", "verify", "ca_file", "cert_file",
             "key_file", "server_name", "default"]
scalars = (
    st.none() | st.booleans()
    | st.integers() | st.sampled_from([0, -1, 1, 65535, 65536, 10**20, 10**400, -(10**400)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(["127.0.0.1:1", "[::1]:8080", "ws://127.0.0.1:1/", "wss://h/p?q", "http://h:1",
                       "env", "none", "info", "DEBUG", "/etc/hostname", "/nonexistent", "HOME", "a b 'c",
                       "x\ny", "", ":", "[::1", "0.0.0.0:0"])
)
dict_keys = st.sampled_from(KEY_WORDS) | st.text(max_size=8) | st.integers(-3, 3) | st.booleans() | st.none()
yaml_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(dict_keys, children, max_size=5),
    max_leaves=20,
)

FRONTEND_TOP = ["backend", "log_level", "drain_timeout", "tunnels", "headers", "basic_auth", "tls", "proxy",
                "max_connections", "half_close", "half_close_timeout", "connect_timeout", "max_message_bytes",
                "ping_interval", "ping_timeout", "idle_timeout"]
FRONTEND_TUNNEL = ["name", "listen", "backend", "route", "headers", "basic_auth", "tls", "proxy",
                   "max_connections", "half_close", "half_close_timeout", "connect_timeout",
                   "max_message_bytes", "ping_interval", "ping_timeout", "idle_timeout"]
BACKEND_TOP = ["listeners", "log_level", "drain_timeout", "half_close", "half_close_timeout", "connect_timeout",
               "max_message_bytes", "ping_interval", "ping_timeout", "idle_timeout"]
BACKEND_LISTENER = ["name", "listen", "routes", "token", "allowed_origins", "max_tunnels", "half_close",
                    "half_close_timeout", "connect_timeout", "max_message_bytes", "ping_interval",
                    "ping_timeout", "idle_timeout"]


def _valid_frontend() -> dict[str, Any]:
    return {"backend": "ws://127.0.0.1:9/", "tunnels": [{"name": "t", "listen": "127.0.0.1:1"}]}


def _valid_backend() -> dict[str, Any]:
    return {"listeners": [{"name": "l", "listen": "127.0.0.1:2", "routes": {"default": "127.0.0.1:3"}}]}


def _only_config_errors(parse: Any, document: object) -> None:
    try:
        parse(document, "prop.yaml")
    except ConfigError as exc:
        assert exc.problems and all(isinstance(problem, str) for problem in exc.problems)


@BOUNDED
@given(st.sampled_from(FRONTEND_TOP + [f"tunnel.{key}" for key in FRONTEND_TUNNEL]), yaml_values)
@example("drain_timeout", 10**400)  # math.isfinite() of a huge int raises OverflowError
@example("tunnel.headers", {"X-A": {1: "x", "y": 2}})  # sorted() of mixed-type unknown keys: TypeError
@example("tls", {1: True, "x": 2})
def test_frontend_values_raise_nothing_but_config_error(key: str, value: object) -> None:
    document = _valid_frontend()
    if key.startswith("tunnel."):
        document["tunnels"][0][key.removeprefix("tunnel.")] = value
    else:
        document[key] = value
    _only_config_errors(parse_frontend, document)


@BOUNDED
@given(st.sampled_from(BACKEND_TOP + [f"listener.{key}" for key in BACKEND_LISTENER] + ["route", "route.long"]),
       yaml_values)
@example("listener.idle_timeout", -(10**400))
@example("route.long", {"target": "127.0.0.1:3", "token": {"nope": 1, 2: "x"}})
def test_backend_values_raise_nothing_but_config_error(key: str, value: object) -> None:
    document = _valid_backend()
    listener = document["listeners"][0]
    if key == "route":
        listener["routes"]["default"] = value
    elif key == "route.long":
        listener["routes"]["default"] = value if isinstance(value, dict) else {"target": value}
    elif key.startswith("listener."):
        listener[key.removeprefix("listener.")] = value
    else:
        document[key] = value
    _only_config_errors(parse_backend, document)


@BOUNDED
@given(yaml_values)
def test_whole_documents_raise_nothing_but_config_error(document: object) -> None:
    _only_config_errors(parse_frontend, document)
    _only_config_errors(parse_backend, document)
    _only_config_errors(parse_frontend, {"tunnels": [document], "backend": "ws://h/"})
    _only_config_errors(parse_backend, {"listeners": [document]})


# -- valid generated configs, through real files --------------------------------

names = st.from_regex(config.NAME, fullmatch=True)
ports = st.integers(1, 65535)
hosts = st.sampled_from(["127.0.0.1", "::1", "localhost", "10.1.2.3"])


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _load_text(text: str) -> config.Config:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "generated.yaml"
        path.write_text(text)
        return config.load(path)


@SMALL
@given(st.lists(st.tuples(names, ports, hosts, st.none() | route_names), min_size=1, max_size=6,
                unique_by=(lambda t: t[0], lambda t: t[1])))
def test_generated_frontend_configs_load_and_round_trip(tunnels: list[tuple[str, int, str, str | None]]) -> None:
    document = {"backend": "ws://127.0.0.1:8080/prefix/", "tunnels": [
        {"name": name, "listen": _address(host, port), **({"route": route} if route else {})}
        for name, port, host, route in tunnels]}
    loaded = _load_text(yaml.safe_dump(document, sort_keys=False))
    assert isinstance(loaded, config.FrontendConfig)
    assert [(t.name, t.listen.port, t.listen.host, t.route) for t in loaded.tunnels] == [
        (name, port, host, route or protocol.DEFAULT_ROUTE) for name, port, host, route in tunnels]
    for tunnel in loaded.tunnels:
        assert protocol.route_for_path(urlsplit(tunnel.url).path.removeprefix("/prefix")) == tunnel.route


@SMALL
@given(st.lists(st.tuples(names, ports, st.dictionaries(route_names, st.tuples(hosts, ports), min_size=1,
                                                        max_size=4)),
                min_size=1, max_size=5, unique_by=(lambda t: t[0], lambda t: t[1])))
def test_generated_backend_configs_load_and_round_trip(
    listeners: list[tuple[str, int, dict[str, tuple[str, int]]]]
) -> None:
    document = {"listeners": [
        {"name": name, "listen": port, "routes": {route: _address(*target) for route, target in routes.items()}}
        for name, port, routes in listeners]}
    loaded = _load_text(yaml.safe_dump(document, sort_keys=False))
    assert isinstance(loaded, config.BackendConfig)
    assert [(lst.name, lst.listen.port, lst.listen.host) for lst in loaded.listeners] == [
        (name, port, config.DEFAULT_HOST) for name, port, _ in listeners]
    for lst, (_, _, routes) in zip(loaded.listeners, listeners, strict=True):
        assert {route: (a.host, a.port) for route, a in lst.routes.items()} == routes


@SMALL
@given(yaml_values)
def test_arbitrary_yaml_files_raise_nothing_but_config_error(document: object) -> None:
    text = yaml.safe_dump(document, sort_keys=False)
    for wrapped in (text, yaml.safe_dump({"tunnels": [document]}, sort_keys=False),
                    yaml.safe_dump({"listeners": [document]}, sort_keys=False)):
        with contextlib.suppress(ConfigError):
            _load_text(wrapped)
