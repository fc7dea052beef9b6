"""bridge.resume: control messages, the replay buffer, acknowledgements, and a whole resume protocol
run over simulated cuts (no sockets): every byte arrives once, in order."""

from __future__ import annotations

import random
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import resume
from bridge.protocol import ProtocolViolation
from bridge.resume import Ack, Consent, Receipts, ReplayBuffer, ReplayLost, Resumed

SESSION = "0123456789abcdef0123456789abcdef"


# -- control messages --------------------------------------------------------------------------


@pytest.mark.parametrize(("message", "text"), [
    (Consent(SESSION, 4194304), f"tcpbridge:resume {SESSION} 4194304"),
    (Ack(0), "tcpbridge:ack 0"),
    (Ack(123456789012), "tcpbridge:ack 123456789012"),
    (Ack(7, ended=True), "tcpbridge:ack 7 end"),
    (resume.Closing(1011), "tcpbridge:closing 1011"),
    (Resumed(7), "tcpbridge:resumed 7"),
    (Resumed(0, ended=True), "tcpbridge:resumed 0 end"),
])
def test_control_messages_encode_and_decode(message: resume.Control, text: str) -> None:
    assert resume.encode(message) == text
    assert resume.is_control(text.encode())
    assert resume.decode(text) == message


@pytest.mark.parametrize("text", [
    "tcpbridge:", "tcpbridge:ack", "tcpbridge:ack -1", "tcpbridge:ack 01", "tcpbridge:ack 1 2", "tcpbridge:ack x",
    "tcpbridge:ack 9223372036854775808", "tcpbridge:ACK 1", "tcpbridge:resume 1234 5",
    f"tcpbridge:resume {SESSION.upper()} 5", f"tcpbridge:resume {SESSION}", "tcpbridge:resumed", "tcpbridge:hello 1",
    "tcpbridge:ack  1", "tcpbridge:ack 1 ", "tcpbridge:resumed 1 END", "tcpbridge:resumed 1 end end",
    "tcpbridge:resumed end", "tcpbridge:ack 1 END", "tcpbridge:ack end",
    "tcpbridge:closing 999", "tcpbridge:closing 5000", "tcpbridge:closing", "tcpbridge:closing 1000 x",
])
def test_malformed_control_messages_are_invalid_data(text: str) -> None:
    with pytest.raises(ProtocolViolation) as raised:
        resume.decode(text)
    assert raised.value.code == 1007


@given(st.binary(max_size=64))
def test_no_data_message_or_marker_is_a_control_message(data: bytes) -> None:
    for text in (data.hex(), data.hex().upper()):
        assert not resume.is_control(text.encode())


def test_session_ids_are_128_random_bits_compared_in_constant_time() -> None:
    ids = {resume.new_session_id() for _ in range(100)}
    assert len(ids) == 100 and all(resume.is_session_id(i) and len(i) == 32 for i in ids)
    one = next(iter(ids))
    assert resume.same_session(one, one) and not resume.same_session(SESSION, one)
    assert not resume.same_session("é" * 32, one)  # a non-ASCII guess is a wrong guess, not a crash


# -- the replay buffer -------------------------------------------------------------------------


def test_the_buffer_holds_what_was_not_acknowledged() -> None:
    buffer = ReplayBuffer(10)
    buffer.append(b"abcd")
    buffer.append(b"efgh")
    assert (buffer.sent, buffer.held, buffer.room()) == (8, 8, 2)
    with pytest.raises(ValueError, match="do not fit"):
        buffer.append(b"xyz")
    buffer.acknowledge(6)
    assert buffer.replay(6) == [b"gh"]
    assert buffer.room() == 8
    assert buffer.replay(8) == [] and buffer.held == 0


@pytest.mark.parametrize(("acked", "claim"), [(0, 9), (5, 4)])
def test_an_impossible_acknowledgement_is_a_protocol_error(acked: int, claim: int) -> None:
    buffer = ReplayBuffer(16)
    buffer.append(b"12345678")
    buffer.acknowledge(acked)
    with pytest.raises(ProtocolViolation) as raised:
        buffer.acknowledge(claim)
    assert raised.value.code == 1002


@settings(max_examples=300)
@given(st.lists(st.one_of(st.binary(min_size=1, max_size=20).map(lambda b: ("send", b)),
                          st.floats(0, 1).map(lambda f: ("ack", f))), max_size=60))
def test_replay_is_exactly_the_unacknowledged_stream(steps: list[tuple[str, object]]) -> None:
    buffer = ReplayBuffer(64)
    stream = b""
    acked = 0
    for kind, value in steps:
        if kind == "send":
            assert isinstance(value, bytes)
            data = value[:buffer.room()]
            buffer.append(data)
            stream += data
        else:
            assert isinstance(value, float)
            acked = acked + int((len(stream) - acked) * value)
            buffer.acknowledge(acked)
        assert buffer.held == len(stream) - acked <= 64
        assert b"".join(buffer.replay(acked)) == stream[acked:]


def test_an_evicting_append_forgets_the_oldest_bytes_until_the_peer_acknowledges_past_them() -> None:
    buffer = ReplayBuffer(8)
    buffer.append(b"abcdef")
    buffer.append(b"ghij", evict=True)
    assert (buffer.sent, buffer.kept, buffer.held, buffer.room()) == (10, 8, 10, -2)
    assert not buffer.complete
    with pytest.raises(ReplayLost, match="2 bytes"):
        buffer.replay(0)
    buffer.acknowledge(2)
    assert buffer.complete and buffer.replay(2) == [b"cdef", b"ghij"]
    buffer.append(b"klmnopq", evict=True)  # 15 unacknowledged: the first 7 are forgotten
    assert not buffer.complete
    with pytest.raises(ReplayLost):
        buffer.replay(2)
    assert buffer.replay(9) == [b"j", b"klmnopq"]


@settings(max_examples=300)
@given(st.lists(st.one_of(st.binary(min_size=1, max_size=30).map(lambda b: ("send", b)),
                          st.binary(min_size=1, max_size=30).map(lambda b: ("evict", b)),
                          st.floats(0, 1).map(lambda f: ("ack", f))), max_size=60))
def test_evictions_keep_memory_bounded_and_replay_exact_or_refused(steps: list[tuple[str, object]]) -> None:
    buffer = ReplayBuffer(64)
    stream = b""
    acked = 0
    for kind, value in steps:
        if kind in ("send", "evict"):
            assert isinstance(value, bytes)
            data = value if kind == "evict" else value[:max(0, buffer.room())]
            buffer.append(data, evict=kind == "evict")
            stream += data
        else:
            assert isinstance(value, float)
            acked = acked + int((len(stream) - acked) * value)
            buffer.acknowledge(acked)
        assert buffer.kept <= 64 and buffer.held == len(stream) - acked
        assert buffer.complete or buffer.held > 64  # only an eviction loses bytes, and only past the limit
        if buffer.complete:
            assert b"".join(buffer.replay(acked)) == stream[acked:]
        else:
            with pytest.raises(ReplayLost):
                buffer.replay(acked)


def test_an_append_within_room_keeps_what_fits_and_leaves_the_rest_to_append() -> None:
    buffer = ReplayBuffer(10)
    assert buffer.append_within_room(b"abcdef")
    assert not buffer.append_within_room(b"ghijk")  # 11 > 10: nothing recorded
    assert (buffer.sent, buffer.held) == (6, 6)
    buffer.acknowledge(4)
    assert buffer.append_within_room(b"ghijkl") and buffer.replay(4) == [b"ef", b"ghijkl"]
    buffer.append(b"mnopq", evict=True)  # the sender's other way: some bytes are forgotten
    assert not buffer.complete and not buffer.append_within_room(b"r")  # no room after an eviction


def test_appends_without_a_lock_race_acknowledgements_without_losing_a_byte() -> None:
    """The sender's lock-free append (one thread) against acknowledgements on another, with the
    interpreter switching threads as often as it can: every replay is exactly the stream's tail."""
    stream = bytes(random.Random(7).randrange(256) for _ in range(1 << 16))
    buffer = ReplayBuffer(4096)
    done = threading.Event()
    failures: list[str] = []

    def acknowledge() -> None:
        try:
            check_acknowledgements()
        except Exception as exc:  # the assertion below reports it
            failures.append(repr(exc))

    def check_acknowledgements() -> None:
        rng = random.Random(8)
        until = time.monotonic() + 30
        for _ in range(10_000_000):  # for as long as the sender appends (bounded)
            if done.is_set() or time.monotonic() > until:
                return
            acked = buffer.sent if rng.random() < 0.5 else rng.randint(buffer.acknowledged, buffer.sent)
            buffer.acknowledge(acked)
            sent = buffer.sent  # the sender may append more while the replay is read: never less
            kept = b"".join(buffer.replay(acked))
            if len(kept) < sent - acked or not stream.startswith(kept, acked):
                failures.append(f"replay from {acked} is not the stream's next {sent - acked} bytes")

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    acknowledger = threading.Thread(target=acknowledge, daemon=True)
    try:
        acknowledger.start()
        offset, rng, deadline = 0, random.Random(9), time.monotonic() + 30
        while offset < len(stream) and time.monotonic() < deadline:
            chunk = stream[offset:offset + rng.randrange(1, 300)]
            if buffer.append_within_room(chunk):
                offset += len(chunk)
    finally:
        done.set()
        acknowledger.join(30)
        sys.setswitchinterval(previous)
    assert offset == len(stream) and not failures
    assert b"".join(buffer.replay(buffer.acknowledged)) == stream[buffer.acknowledged:]


# -- acknowledgements --------------------------------------------------------------------------


def test_acknowledged_by_size_before_the_sender_can_fill_its_buffer() -> None:
    receipts = Receipts(peer_buffer=400, interval=10)
    assert receipts.add(99, now=0.0) is None
    assert receipts.add(1, now=0.0) == Ack(100)  # a quarter of the peer's buffer
    assert receipts.add(50, now=0.1) is None and receipts.due(0.2) is None


def test_acknowledged_by_time_when_little_arrives() -> None:
    receipts = Receipts(peer_buffer=1 << 20, interval=0.5)
    assert receipts.add(10, now=100.0) is None
    assert receipts.due(100.4) is None
    assert receipts.due(100.5) == Ack(10)
    assert receipts.due(200.0) is None  # nothing new: nothing to say


def test_bytes_counted_while_an_acknowledgement_was_made_get_a_timer_of_their_own() -> None:
    """The reader counts without a lock: its count may land after the housekeeper's :meth:`due` read the
    total and before it cleared the timer. Those bytes then have no timer; the next ``due`` starts one."""
    receipts = Receipts(peer_buffer=1 << 20, interval=0.5)
    assert not receipts.count(10, now=100.0)
    assert receipts.due(100.5) == Ack(10)
    receipts.received += 5  # the reader's count, between due's read and its clearing of the timer
    assert receipts.due(100.6) is None  # the timer starts here
    assert receipts.due(101.0) is None
    assert receipts.due(101.1) == Ack(15)


# -- the whole protocol over simulated cuts ----------------------------------------------------


class Side:
    """One end: sends a stream through its replay buffer, acknowledges what it receives."""

    def __init__(self, stream: bytes, buffer: int) -> None:
        self.stream = stream
        self.offset = 0  # of the next new byte to send
        self.buffer = ReplayBuffer(buffer)
        self.receipts = Receipts(peer_buffer=buffer, interval=0.5)
        self.delivered = b""  # what its TCP side got

    def outgoing(self, chunk: int, now: float) -> list[bytes | resume.Control]:
        out: list[bytes | resume.Control] = []
        size = min(chunk, self.buffer.room(), len(self.stream) - self.offset)
        if size > 0:
            data = self.stream[self.offset:self.offset + size]
            self.offset += size
            self.buffer.append(data)
            out.append(data)
        ack = self.receipts.due(now)
        return [*out, ack] if ack else out

    def incoming(self, message: bytes | resume.Control, now: float) -> list[resume.Control]:
        if isinstance(message, bytes):
            self.delivered += message
            ack = self.receipts.add(len(message), now)
            return [ack] if ack else []
        if isinstance(message, Ack):
            self.buffer.acknowledge(message.received)
        return []

    def reattach(self, peer_received: int) -> list[bytes]:
        return self.buffer.replay(peer_received)


@settings(max_examples=200, deadline=None)
@given(up=st.binary(min_size=1, max_size=3000), down=st.binary(max_size=3000),
       buffer=st.integers(16, 600), chunk=st.integers(1, 200),
       cuts=st.lists(st.integers(0, 80), max_size=6), seed=st.randoms(use_true_random=False))
def test_every_byte_arrives_once_and_in_order_across_cuts(up: bytes, down: bytes, buffer: int, chunk: int,
                                                           cuts: list[int], seed: random.Random) -> None:
    """Messages in flight when a cut comes are lost; each re-attach replays from what the other side says
    it received. The streams that come out are the streams that went in."""
    front, back = Side(up, buffer), Side(down, buffer)
    now, rounds = 0.0, 0
    cuts = sorted(cuts)
    while (front.delivered != down or back.delivered != up) and rounds < 10_000:
        rounds += 1
        now += 0.1
        to_back = [(back, m) for m in front.outgoing(chunk, now)]
        to_front = [(front, m) for m in back.outgoing(chunk, now)]
        # The two directions interleave arbitrarily; each keeps its order (a websocket is a stream).
        picks = sorted([0] * len(to_back) + [1] * len(to_front), key=lambda _: seed.random())
        queues = (iter(to_back), iter(to_front))
        in_flight = [next(queues[pick]) for pick in picks]
        if cuts and rounds >= cuts[0]:
            cuts.pop(0)
            kept = in_flight[:seed.randrange(len(in_flight) + 1)]
            for receiver, message in kept:  # what made it across before the cut
                receiver.incoming(message, now)
            # Re-attach: each side states what it received; the other replays the rest.
            for sender, receiver in ((front, back), (back, front)):
                for data in sender.reattach(receiver.receipts.received):
                    receiver.incoming(data, now)
            continue
        for receiver, message in in_flight:
            for answer in receiver.incoming(message, now):
                (front if receiver is back else back).incoming(answer, now)
    assert back.delivered == up
    assert front.delivered == down
