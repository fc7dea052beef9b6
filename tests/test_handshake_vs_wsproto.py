"""Our opening handshake (bridge.handshake, the backend's 101) against an independent implementation, wsproto.

Both ways: our upgrade request is one wsproto's server accepts, with the path, host and headers we
meant; wsproto's 101 completes our client's handshake, and the backend's 101 completes wsproto's.
Then the 101 is mutated, alone and in random combinations (hypothesis), and both clients judge it:
each mutation alone gets the same verdict from both, and whatever combination wsproto refuses, we
refuse too.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Event, Message, Request, TextMessage
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from bridge import handshake
from bridge.protocol import BRIDGE_PATH
from bridge.server_end import bridge_upgrade_response
from tests.test_frames import echo_backend

_PATH_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-._~/%=&"
paths = st.text(_PATH_CHARS, max_size=40).map(lambda tail: "/" + tail)
hosts = st.sampled_from(["example.com", "127.0.0.1:8080", "[::1]:443", "bridge.internal"])
header_names = st.from_regex(r"X-[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True)
header_values = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30)
extra_headers = st.lists(st.tuples(header_names, header_values), max_size=4)


def wsproto_server_events(request: bytes) -> list[Event]:
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(request)
    return list(server.events())


@settings(max_examples=200, deadline=None)
@given(path=paths, host=hosts, extra=extra_headers)
def test_our_upgrade_request_is_one_wsproto_accepts_as_meant(path: str, host: str,
                                                             extra: list[tuple[str, str]]) -> None:
    key = handshake.new_key()
    request = handshake.upgrade_request(path, host, key, [f"{name}: {value}" for name, value in extra])
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(request)
    events = list(server.events())
    assert len(events) == 1 and isinstance(events[0], Request)
    got = events[0]
    assert (got.target, got.host, got.subprotocols, got.extensions) == (path, host, [], [])
    sent = {(name.lower().encode(), value.encode()) for name, value in extra}
    assert sent <= set(got.extra_headers)
    # And wsproto's answer completes our side of the handshake.
    answer = server.send(AcceptConnection())
    split = handshake.split_head(answer)
    assert split is not None and split[1] == b""
    handshake.check_switch(handshake.parse_response(split[0]), key)


def wsproto_client() -> tuple[WSConnection, bytes, str]:
    """A wsproto client that sent its upgrade request; the request, and the key in it."""
    client = WSConnection(ConnectionType.CLIENT)
    request = client.send(Request(host="example.com", target="/t"))
    match = re.search(rb"Sec-WebSocket-Key: (\S+)\r\n", request)
    assert match is not None
    return client, request, match.group(1).decode()


def wsproto_verdict(client: WSConnection, answer: bytes) -> bool:
    """Whether wsproto's client takes ``answer`` (a whole response head) as the completed handshake."""
    try:
        client.receive_data(answer)
        return any(isinstance(event, AcceptConnection) for event in client.events())
    except (RemoteProtocolError, LocalProtocolError):
        return False


def our_verdict(answer: bytes, key: str) -> bool:
    split = handshake.split_head(answer)
    assert split is not None
    try:
        handshake.check_switch(handshake.parse_response(split[0]), key)
    except handshake.HandshakeError:
        return False
    return True


@pytest.mark.parametrize("binary", [False, True], ids=["hex", "binary offer taken"])
def test_the_backends_101_completes_wsproto_clients_handshake(binary: bool) -> None:
    client, _, key = wsproto_client()
    assert wsproto_verdict(client, bridge_upgrade_response(key, binary))


def valid_101(key: str) -> list[str]:
    return ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {handshake.accept_token(key)}"]


def drop(name: str) -> Mutation:
    return lambda lines: [line for line in lines if not line.lower().startswith(name.lower() + ":")]


def replace(name: str, value: str) -> Mutation:
    return lambda lines: [(f"{name}: {value}" if line.lower().startswith(name.lower() + ":") else line)
                          for line in lines]


def status(line: str) -> Mutation:
    return lambda lines: [line, *lines[1:]]


def add(line: str) -> Mutation:
    return lambda lines: [*lines, line]


Mutation = Callable[[list[str]], list[str]]
#: Mutations of a valid 101, each of its lines.
MUTATIONS: dict[str, Mutation] = {
    "status 200": status("HTTP/1.1 200 OK"),
    "status 301": status("HTTP/1.1 301 Moved Permanently"),
    "HTTP/1.0": status("HTTP/1.0 101 Switching Protocols"),
    "no Upgrade": drop("Upgrade"),
    "Upgrade: h2c": replace("Upgrade", "h2c"),
    "no Connection": drop("Connection"),
    "Connection: close": replace("Connection", "close"),
    "no accept": drop("Sec-WebSocket-Accept"),
    "another key's accept": replace("Sec-WebSocket-Accept", handshake.accept_token(handshake.new_key())),
    "a second accept": add("Sec-WebSocket-Accept: x3JJHMbDL1EzLkh9GBhXDw=="),
    "an extension not offered": add("Sec-WebSocket-Extensions: permessage-deflate"),
    "header names in capitals": lambda lines: [lines[0], *(line.split(":")[0].upper() + ":" + line.split(":", 1)[1]
                                                           for line in lines[1:])],
    "token values in other case": lambda lines: replace("Connection", "upgrade")(replace("Upgrade", "WebSocket")(
        lines)),
    "Connection with more tokens": replace("Connection", "keep-alive, Upgrade"),
    "a subprotocol not offered": add("Sec-WebSocket-Protocol: chat"),
    "an unrelated header": add("Server: test"),
}
@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_a_mutated_101_is_judged_as_wsproto_judges_it(name: str) -> None:
    client, _, key = wsproto_client()
    answer = ("\r\n".join(MUTATIONS[name](valid_101(key))) + "\r\n\r\n").encode("latin-1")
    assert our_verdict(answer, key) == wsproto_verdict(client, answer)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_whatever_101_wsproto_refuses_we_refuse(data: st.DataObject) -> None:
    """Random combinations of the mutations above: wsproto refusing means we refuse."""
    client, _, key = wsproto_client()
    lines = valid_101(key)
    for name in data.draw(st.lists(st.sampled_from(sorted(MUTATIONS)), max_size=3)):
        lines = MUTATIONS[name](lines)
    answer = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if not wsproto_verdict(client, answer):
        assert not our_verdict(answer, key)


def test_wsproto_as_the_client_of_our_backend_daemon_carries_bytes_both_ways(tmp_path: Path) -> None:
    """The whole conversation with an independent client, over a socket to the real daemon: handshake,
    hex text messages (as the Go frontend sends) echoed by the target, and the close handshake."""
    client = WSConnection(ConnectionType.CLIENT)
    with echo_backend(tmp_path) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(client.send(Request(host=f"127.0.0.1:{port}", target=BRIDGE_PATH)))
        events = receive_events(client, sock, until=AcceptConnection)
        assert isinstance(events[-1], AcceptConnection)
        payload = os.urandom(3000)
        sock.sendall(client.send(Message(data=payload.hex())))
        echoed = ""
        for _ in range(100):
            for event in receive_events(client, sock, until=TextMessage):
                if isinstance(event, TextMessage):
                    echoed += event.data
            if len(echoed) >= 2 * len(payload):
                break
        assert bytes.fromhex(echoed) == payload
        sock.sendall(client.send(CloseConnection(code=1000)))
        closed = receive_events(client, sock, until=CloseConnection)
        assert isinstance(closed[-1], CloseConnection) and closed[-1].code == 1000


def receive_events(client: WSConnection, sock: socket.socket, *, until: type[Event]) -> list[Event]:
    """Read from ``sock`` until wsproto gives an event of type ``until`` (at most 200 reads)."""
    events: list[Event] = []
    for _ in range(200):
        data = sock.recv(65536)
        client.receive_data(data or None)
        events.extend(client.events())
        if any(isinstance(event, until) for event in events) or not data:
            return events
    raise AssertionError(f"no {until.__name__} after 200 reads")
