"""Endpoint's pending control frames, over a socketpair (no daemons): a reader never waits on a writer.

A pong or the backend's switch marker is written by the reading thread only if
the send lock is free and the socket has room right now; otherwise it stays
pending and goes out first with the next frame anyone writes, or when
``flush_control`` (the housekeeper) finds room. Only the latest ping is answered.
Every wait here is bounded; every socket is closed and every thread joined.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from bridge import frames, protocol, resume
from bridge.endpoint import Closed, Endpoint, Received, WebSocketDropped
from bridge.frames import OPCODE_BINARY, OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG, OPCODE_TEXT, FrameParser
from bridge.frontend import ClientEndpoint
from bridge.protocol import ProtocolViolation
from bridge.server_end import ServerEndpoint
from bridge.sockets import writable

MAX = 1 << 20
BOUND = 5.0  # seconds anything here may take at most


@dataclass
class Link:
    """A channel under test on one end of a socketpair; the test plays its websocket peer on the other."""

    channel: Endpoint
    peer: socket.socket
    masked_to_channel: bool  # the peer is a client: what it sends is masked
    parser: FrameParser = field(init=False)
    threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        # What the channel writes is masked when the channel is the client (the peer is then a server).
        self.parser = FrameParser(MAX, masked=not self.masked_to_channel)
        self.peer.settimeout(BOUND)

    def send(self, opcode: int, payload: bytes) -> None:
        """One frame from the peer to the channel."""
        if self.masked_to_channel:
            key = os.urandom(4)
            self.peer.sendall(frames.frame_header(opcode, len(payload), key) + frames.mask(payload, key))
        else:
            self.peer.sendall(frames.frame_header(opcode, len(payload)) + payload)

    def read_frames(self, count: int) -> list[frames.Frame]:
        """The next ``count`` frames the channel wrote (raises on timeout)."""
        got: list[frames.Frame] = []
        deadline = time.monotonic() + BOUND
        while len(got) < count:
            frame = self.parser.next_frame()
            if frame is not None:
                got.append(frame)
                continue
            assert time.monotonic() < deadline, f"only {len(got)} of {count} frames arrived"
            data = self.peer.recv(1 << 16)
            assert data, "the channel's end closed"
            self.parser.feed(data)
        return got

    def nothing_more(self) -> bool:
        """No further frame was written (checked without waiting)."""
        if self.parser.next_frame() is not None:
            return False
        self.peer.setblocking(False)
        try:
            data = self.peer.recv(1 << 16)
        except BlockingIOError:
            return True
        finally:
            self.peer.settimeout(BOUND)
        self.parser.feed(data)
        return self.parser.next_frame() is None

    def in_thread(self, action: Callable[[], object]) -> list[object]:
        """Run ``action`` on a thread and return the list its result will be put in."""
        result: list[object] = []
        thread = threading.Thread(target=lambda: result.append(action()), daemon=True)
        self.threads.append(thread)
        thread.start()
        return result

    def receive_now(self) -> Received:
        """``channel.receive()``, which must return within BOUND (it never waits on a writer)."""
        result = self.in_thread(self.channel.receive)
        self.threads[-1].join(BOUND)
        assert result, "receive() blocked"
        value = result[0]
        assert isinstance(value, (bytes, Closed)) or value is protocol.END_OF_STREAM
        return value

    def fill(self) -> int:
        """Fill the channel's socket until a write would block, with whole data frames; return how many.

        The socket's send lock stays free: only room is missing.
        """
        frame = self.channel._frame_bytes(OPCODE_TEXT, protocol.encode(b"filler" * 8))
        sock = self.channel.sock
        for count in range(100_000):
            try:
                sent = sock.send(frame, socket.MSG_DONTWAIT)
            except BlockingIOError:
                assert not writable(sock)
                return count
            assert sent == len(frame), "a partial frame would corrupt the stream"
        raise AssertionError("the socket never filled up")

    def drain(self, count: int) -> None:
        """Read the ``count`` filler frames back."""
        for frame in self.read_frames(count):
            assert frame.opcode == OPCODE_TEXT


def make_link(kind: str, *, binary_consented: bool = False, resume: bool = False) -> Link:
    ours, theirs = socket.socketpair()
    if kind == "server":
        return Link(ServerEndpoint(ours, b"", MAX, binary_consented=binary_consented, resume=resume), theirs, True)
    return Link(ClientEndpoint(ours, MAX, resume=resume), theirs, False)


@pytest.fixture(params=["server", "client"])
def link(request: pytest.FixtureRequest) -> Iterator[Link]:
    made = make_link(request.param)
    yield from closing(made)


@pytest.fixture
def switching() -> Iterator[Link]:
    """A server channel whose 101 consented to binary messages."""
    yield from closing(make_link("server", binary_consented=True))


def closing(link: Link) -> Iterator[Link]:
    try:
        yield link
    finally:
        link.channel.shutdown()
        link.peer.close()
        for thread in link.threads:
            thread.join(BOUND)
        link.channel.close()
        assert not any(thread.is_alive() for thread in link.threads)


def text(data: bytes) -> bytes:
    return protocol.encode(data)


def is_binary(channel: Endpoint) -> bool:
    """Whether the channel's messages are binary now (a call, so that no assertion narrows the attribute)."""
    return channel.binary


# ---------------------------------------------------------------------------
# Pongs


def test_a_ping_while_a_send_is_in_progress_does_not_block_receive(link: Link) -> None:
    """Another thread holds the send lock (a write stuck on a peer that is not reading): the reader
    reads on; the pong goes out first thing with the next frame."""
    with link.channel.send_lock.held():
        link.send(OPCODE_PING, b"are you there")
        link.send(OPCODE_TEXT, text(b"hi"))
        assert link.receive_now() == b"hi"
        assert link.nothing_more()
    link.channel.send_data(b"next")
    pong, data = link.read_frames(2)
    assert (pong.opcode, pong.payload) == (OPCODE_PONG, b"are you there")
    assert (data.opcode, data.payload) == (OPCODE_TEXT, text(b"next"))
    assert link.nothing_more()


def test_pings_coalesce_into_one_pong_with_the_latest_payload(link: Link) -> None:
    with link.channel.send_lock.held():
        for payload in (b"one", b"two", b"three"):
            link.send(OPCODE_PING, payload)
        link.send(OPCODE_TEXT, text(b"data"))
        assert link.receive_now() == b"data"
    link.channel.send_data(b"x")
    got = link.read_frames(2)
    assert [(f.opcode, f.payload) for f in got] == [(OPCODE_PONG, b"three"), (OPCODE_TEXT, text(b"x"))]
    assert link.nothing_more()


def test_a_pong_with_the_lock_free_and_room_goes_out_at_once(link: Link) -> None:
    link.send(OPCODE_PING, b"now")
    link.send(OPCODE_TEXT, text(b"d"))
    assert link.receive_now() == b"d"
    (pong,) = link.read_frames(1)
    assert (pong.opcode, pong.payload) == (OPCODE_PONG, b"now")


def test_a_ping_on_a_full_socket_waits_for_room_not_the_reader(link: Link) -> None:
    """The lock is free but the socket is full: the reader does not write (it would block); the
    housekeeper's flush writes the pong once the peer has read enough."""
    filled = link.fill()
    link.send(OPCODE_PING, b"later")
    link.send(OPCODE_TEXT, text(b"read on"))
    assert link.receive_now() == b"read on"
    assert link.channel.flush_control() is False  # still no room: stays pending, returns at once
    link.drain(filled)
    assert link.channel.flush_control() is True
    (pong,) = link.read_frames(1)
    assert (pong.opcode, pong.payload) == (OPCODE_PONG, b"later")
    assert link.nothing_more()


def test_a_pending_pong_goes_out_with_the_next_ping(link: Link) -> None:
    with link.channel.send_lock.held():
        link.send(OPCODE_PING, b"p")
        link.send(OPCODE_TEXT, text(b"d"))
        assert link.receive_now() == b"d"
    assert link.channel.send_ping() is True
    got = link.read_frames(2)
    assert [(f.opcode, f.payload) for f in got] == [(OPCODE_PONG, b"p"), (OPCODE_PING, b"tcpbridge")]


# ---------------------------------------------------------------------------
# Writes that must not block: pings and close frames from the housekeeper or the reader


def test_ping_and_close_never_block_on_a_full_socket(link: Link) -> None:
    filled = link.fill()
    started = time.monotonic()
    assert link.channel.send_ping() is False
    assert link.channel.send_close(1001, "going away", wait=0) is False
    assert link.channel.send_close(1001, "going away", wait=0.3) is False
    assert time.monotonic() - started < 2.0
    link.send(OPCODE_PING, b"after close")  # not answered: our close frame is decided
    link.send(OPCODE_TEXT, text(b"d"))
    assert link.receive_now() == b"d"
    link.drain(filled)
    assert link.channel.flush_control() is True
    (close,) = link.read_frames(1)
    assert close.opcode == OPCODE_CLOSE
    assert protocol.CloseCode(int.from_bytes(close.payload[:2], "big")) == protocol.CloseCode.GOING_AWAY
    with pytest.raises(WebSocketDropped):
        link.channel.send_data(b"no data after the close frame")
    assert link.nothing_more()


def test_a_close_gives_up_waiting_for_a_stuck_send_within_its_bound(link: Link) -> None:
    with link.channel.send_lock.held():
        started = time.monotonic()
        assert link.channel.send_close(1000, "", wait=0.3) is False
        assert 0.25 < time.monotonic() - started < 2.0
    # The stuck send finished: the pending close goes with the next flush.
    assert link.channel.flush_control() is True
    (close,) = link.read_frames(1)
    assert close.opcode == OPCODE_CLOSE


# ---------------------------------------------------------------------------
# The backend's switch marker


def test_the_switch_marker_waits_for_the_lock_and_data_after_it_is_binary(switching: Link) -> None:
    channel = switching.channel
    with channel.send_lock.held():
        switching.send(OPCODE_BINARY, b"")  # the frontend's marker
        switching.send(OPCODE_BINARY, b"up")
        assert switching.receive_now() == b"up"
        assert not is_binary(channel)  # our marker is not on the wire yet: our data stays hex
        assert switching.nothing_more()
    channel.send_data(b"down")
    marker, data = switching.read_frames(2)
    assert (marker.opcode, marker.payload) == (OPCODE_BINARY, b"")
    assert (data.opcode, data.payload) == (OPCODE_BINARY, b"down")
    assert is_binary(channel)


def test_hex_sent_before_the_marker_stays_hex_and_the_marker_waits_for_room(switching: Link) -> None:
    channel = switching.channel
    channel.send_data(b"early")  # before the frontend's marker: hex
    (early,) = switching.read_frames(1)
    assert (early.opcode, early.payload) == (OPCODE_TEXT, text(b"early"))
    filled = switching.fill()
    switching.send(OPCODE_BINARY, b"")
    switching.send(OPCODE_BINARY, b"up")
    assert switching.receive_now() == b"up"
    assert not is_binary(channel)
    switching.drain(filled)
    assert channel.flush_control() is True
    assert is_binary(channel)
    channel.send_data(b"down")
    marker, data = switching.read_frames(2)
    assert (marker.opcode, marker.payload) == (OPCODE_BINARY, b"")
    assert (data.opcode, data.payload) == (OPCODE_BINARY, b"down")


def test_a_marker_and_a_pong_pending_together_go_out_before_the_next_data(switching: Link) -> None:
    channel = switching.channel
    with channel.send_lock.held():
        switching.send(OPCODE_BINARY, b"")
        switching.send(OPCODE_PING, b"p")
        switching.send(OPCODE_BINARY, b"up")
        assert switching.receive_now() == b"up"
    sender = switching.in_thread(lambda: channel.send_data(b"down"))
    switching.threads[-1].join(BOUND)
    assert sender == [None]
    got = switching.read_frames(3)
    assert [(f.opcode, f.payload) for f in got] == [
        (OPCODE_BINARY, b""), (OPCODE_PONG, b"p"), (OPCODE_BINARY, b"down")]


# ---------------------------------------------------------------------------
# Control messages of resumable tunnels (bridge.resume)


@pytest.fixture(params=["server", "client"])
def resumable(request: pytest.FixtureRequest) -> Iterator[Link]:
    yield from closing(make_link(request.param, resume=True))


def received_within_bound(link: Link) -> object:
    result = link.in_thread(link.channel.receive)
    link.threads[-1].join(BOUND)
    assert result, "receive() blocked"
    return result[0]


def test_control_messages_are_events_of_a_resumable_tunnel_and_data_stays_data(resumable: Link) -> None:
    resumable.send(OPCODE_TEXT, text(b"before"))
    resumable.send(OPCODE_TEXT, b"tcpbridge:ack 6")
    resumable.send(OPCODE_TEXT, text(b"tcpbridge:ack 1"))  # data that looks like a control message, hex-encoded
    resumable.send(OPCODE_TEXT, f"tcpbridge:resume {'ab' * 16} 4096".encode())
    assert received_within_bound(resumable) == b"before"
    assert received_within_bound(resumable) == resume.Ack(6)
    assert received_within_bound(resumable) == b"tcpbridge:ack 1"
    assert received_within_bound(resumable) == resume.Consent("ab" * 16, 4096)


def test_control_messages_pass_after_the_binary_switch_too() -> None:
    for link in closing(make_link("server", binary_consented=True, resume=True)):
        link.send(OPCODE_BINARY, b"")  # the frontend's switch marker
        link.send(OPCODE_BINARY, b"raw")
        link.send(OPCODE_TEXT, b"tcpbridge:resumed 3")
        assert received_within_bound(link) == b"raw"
        assert received_within_bound(link) == resume.Resumed(3)


def test_without_resume_a_control_message_is_what_a_go_peer_sees_not_hex() -> None:
    for link in closing(make_link("server")):
        link.send(OPCODE_TEXT, b"tcpbridge:ack 1")
        with pytest.raises(ProtocolViolation) as raised:
            link.channel.receive()
        assert raised.value.code == 1007


def test_a_malformed_control_message_is_invalid_data(resumable: Link) -> None:
    resumable.send(OPCODE_TEXT, b"tcpbridge:ack one")
    with pytest.raises(ProtocolViolation) as raised:
        resumable.channel.receive()
    assert raised.value.code == 1007


def test_a_fragmented_control_message_is_bad_hex() -> None:
    """We write every control message as one frame; split over two, it is text that is not hex."""
    for link in closing(make_link("client", resume=True)):  # the peer is a server: unmasked frames
        first = frames.frame_header(OPCODE_TEXT, 10)
        link.peer.sendall(bytes([first[0] & 0x7F]) + first[1:] + b"tcpbridge:")  # FIN off
        link.peer.sendall(frames.frame_header(frames.OPCODE_CONTINUATION, 5) + b"ack 1")
        with pytest.raises(ProtocolViolation) as raised:
            link.channel.receive()
        assert raised.value.code == 1007


def test_an_ack_never_waits_for_a_writer_and_only_the_latest_goes(resumable: Link) -> None:
    with resumable.channel.send_lock.held():
        done = resumable.in_thread(lambda: [resumable.channel.queue_ack(resume.Ack(n)) for n in (10, 20, 30)])
        resumable.threads[-1].join(BOUND)
        assert done, "queue_ack blocked on the send lock"
        assert resumable.nothing_more()
    resumable.channel.send_data(b"after")
    ack, data = resumable.read_frames(2)
    assert (ack.opcode, bytes(ack.payload)) == (OPCODE_TEXT, b"tcpbridge:ack 30")
    assert bytes(data.payload) == text(b"after")


def test_an_ack_with_the_lock_free_goes_at_once_and_none_after_our_close(resumable: Link) -> None:
    resumable.channel.queue_ack(resume.Ack(5))
    (frame,) = resumable.read_frames(1)
    assert bytes(frame.payload) == b"tcpbridge:ack 5"
    assert resumable.channel.send_close(1000, "", wait=BOUND)
    resumable.channel.queue_ack(resume.Ack(9))
    (close,) = resumable.read_frames(1)
    assert close.opcode == frames.OPCODE_CLOSE and resumable.nothing_more()


def test_send_control_keeps_its_place_among_data(resumable: Link) -> None:
    resumable.channel.send_data(b"one")
    resumable.channel.send_control(resume.Resumed(123))
    resumable.channel.send_data(b"two")
    got = resumable.read_frames(3)
    assert [bytes(f.payload) for f in got] == [text(b"one"), b"tcpbridge:resumed 123", text(b"two")]
