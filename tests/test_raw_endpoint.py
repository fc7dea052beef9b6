"""The raw endpoint over a real socket pair: the websocket notions as a plain stream carries them."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from bridge import protocol
from bridge.endpoint import Closed, WebSocketDropped
from bridge.raw_endpoint import RawEndpoint
from tests.helpers import recv_all


@pytest.fixture
def pair() -> Iterator[tuple[RawEndpoint, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    theirs.settimeout(10)
    yield RawEndpoint(ours, received=b"early"), theirs
    ours.close()
    theirs.close()


def test_bytes_read_before_come_first_then_what_arrives_then_the_fin(pair: tuple[RawEndpoint, socket.socket]) -> None:
    endpoint, peer = pair
    peer.sendall(b"later")
    assert endpoint.receive() == b"early"
    assert endpoint.receive() == b"later"
    peer.shutdown(socket.SHUT_WR)
    assert endpoint.receive() == protocol.END_OF_STREAM


def test_data_and_our_fin_reach_the_peer_as_a_plain_stream(pair: tuple[RawEndpoint, socket.socket]) -> None:
    endpoint, peer = pair
    endpoint.send_data(b"hello ")
    endpoint.send_data(b"world")
    endpoint.send_end_of_stream()
    assert recv_all(peer) == b"hello world"
    assert endpoint.send_close(1000, "") is True
    with pytest.raises(WebSocketDropped):
        endpoint.send_data(b"after our close")


def read_to_the_peers_fin(endpoint: RawEndpoint, peer: socket.socket) -> None:
    """Take the early bytes, then the peer's FIN as the end-of-stream marker."""
    assert endpoint.receive() == b"early"
    peer.shutdown(socket.SHUT_WR)
    assert endpoint.receive() == protocol.END_OF_STREAM


def test_the_peer_close_comes_only_once_our_side_is_done_too(pair: tuple[RawEndpoint, socket.socket]) -> None:
    """Half-close: after the peer's FIN our direction stays open; the close handshake completes when we close."""
    endpoint, peer = pair
    read_to_the_peers_fin(endpoint, peer)
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(endpoint.receive()), daemon=True)
    reader.start()
    reader.join(0.3)
    assert reader.is_alive(), "the close must wait for our side"
    endpoint.send_data(b"still flowing")
    assert endpoint.send_close(1000, "") is True
    reader.join(5)
    assert got == [Closed(1000)]
    assert recv_all(peer) == b"still flowing"  # and our FIN after it


def test_an_abort_close_asks_for_a_reset_and_sends_nothing(pair: tuple[RawEndpoint, socket.socket]) -> None:
    endpoint, peer = pair
    assert endpoint.send_close(1011, "internal error") is False
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(1)  # no FIN: only the caller's reset may end this stream


def test_a_shutdown_wakes_a_reader_waiting_after_the_fin(pair: tuple[RawEndpoint, socket.socket]) -> None:
    endpoint, peer = pair
    read_to_the_peers_fin(endpoint, peer)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            endpoint.receive()
        except OSError as exc:
            errors.append(exc)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    endpoint.shutdown()
    reader.join(5)
    assert not reader.is_alive() and isinstance(errors[0], WebSocketDropped)


def test_no_pings_and_no_control_messages(pair: tuple[RawEndpoint, socket.socket]) -> None:
    endpoint, _ = pair
    assert endpoint.send_ping() is False
    assert endpoint.flush_control() is True
