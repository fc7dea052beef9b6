"""The resumable session (bridge.session): its rules alone, then two in-process pumps that use it over
real loopback sockets, then our backend's consent as a real process sees it.

Detaching and re-attaching are not here yet: these tests prove what every resumable tunnel does while
its websocket lives (keep, acknowledge, wait at a full buffer) and that a peer that is not ours never
sees any of it.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge import resume
from bridge.backend import ServerEndpoint
from bridge.config import TunnelOptions
from bridge.endpoint import Closed, Endpoint
from bridge.frontend import ClientEndpoint
from bridge.outcome import Kind, Outcome
from bridge.protocol import DEFAULT_MAX_MESSAGE_BYTES, ProtocolViolation
from bridge.resume import Ack, Consent
from bridge.session import Session
from bridge.tunnel import Tunnel, TunnelRegistry
from tests.gopeer import OP_TEXT
from tests.helpers import pattern, recv_all, recv_exactly, send_then_shutdown, sha256, wait_until
from tests.test_frames import dial_backend, echo_backend, next_data_frame

SMALL = 64 * 1024  # the smallest resume_buffer: senders wait for acknowledgements all the time
SESSION_ID = "0123456789abcdef0123456789abcdef"


# ---------------------------------------------------------------------------
# The session's rules


def never() -> bool:
    return False


def in_thread(function: object) -> threading.Thread:
    thread = threading.Thread(target=function, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


def test_a_consented_sender_waits_at_a_full_buffer_until_an_acknowledgement() -> None:
    session = Session(SMALL, consented=True, session_id=SESSION_ID)
    assert session.send_room(1 << 20, never) == SMALL
    session.sent(b"x" * SMALL)
    rooms: list[int] = []
    waiter = in_thread(lambda: rooms.append(session.send_room(1 << 20, never)))
    assert wait_until(lambda: session.waiting, timeout=5)
    assert not rooms
    session.acknowledged(Ack(1000))
    waiter.join(5)
    assert rooms == [1000] and not session.waiting


def test_closing_wakes_a_waiting_sender_for_good() -> None:
    session = Session(SMALL, consented=True, session_id=SESSION_ID)
    session.sent(b"x" * SMALL)
    rooms: list[int] = []
    waiter = in_thread(lambda: rooms.append(session.send_room(100, never)))
    assert wait_until(lambda: session.waiting, timeout=5)
    session.close()
    waiter.join(5)
    assert rooms == [0]
    assert session.send_room(100, never) == 0


def test_an_impossible_acknowledgement_is_the_peers_protocol_error() -> None:
    session = Session(SMALL, consented=True, session_id=SESSION_ID)
    session.sent(b"abc")
    with pytest.raises(ProtocolViolation) as raised:
        session.acknowledged(Ack(4))
    assert raised.value.code == 1002


def test_an_offer_keeps_what_it_sends_until_the_backend_consents() -> None:
    session = Session(SMALL, consented=False)
    assert session.active and not session.replayable
    session.sent(b"early")
    assert session.due(now=100.0) is None  # nothing is acknowledged before the consent
    assert session.first_message(Consent(SESSION_ID, 4 * SMALL))
    assert session.replayable and session.id == SESSION_ID
    assert session.replay is not None and session.replay.held == 5
    assert session.receipts.threshold == SMALL  # a quarter of the backend's buffer
    assert session.received(SMALL, now=1.0) == Ack(SMALL)


@pytest.mark.parametrize("first", [b"data", resume.Ack(0), Closed(1000, "")])
def test_any_other_first_message_ends_the_offer(first: object) -> None:
    session = Session(SMALL, consented=False)
    session.sent(b"early")
    assert not session.first_message(first)
    assert not session.active and session.replay is None
    assert session.send_room(100, never) == 100  # never waits: nobody will acknowledge
    assert session.due(now=100.0) is None


def test_an_offer_that_outgrows_its_buffer_before_an_answer_forgets_its_oldest_bytes_without_waiting() -> None:
    session = Session(SMALL, consented=False)
    for _ in range(3):
        assert session.send_room(SMALL // 2, never) == SMALL // 2
        session.sent(b"x" * (SMALL // 2))
    assert session.replay is not None and session.replay.kept == SMALL
    assert session.first_message(Consent(SESSION_ID, SMALL))  # a late consent: acks go on
    assert session.consented and not session.replayable  # until the backend acknowledges past the forgotten
    session.acknowledged(Ack(SMALL // 2))
    assert session.replayable
    assert session.received(SMALL, now=0.0) == Ack(SMALL)


def test_a_sender_stops_waiting_once_its_own_reader_is_stalled() -> None:
    """The peer's acknowledgements may be queued behind data our reader cannot deliver: waiting for them
    would deadlock a client that sends everything before it reads."""
    session = Session(SMALL, consented=True, session_id=SESSION_ID)
    session.sent(b"x" * SMALL)
    stalled = threading.Event()
    rooms: list[int] = []
    waiter = in_thread(lambda: rooms.append(session.send_room(1000, stalled.is_set)))
    assert wait_until(lambda: session.waiting, timeout=5)
    stalled.set()
    waiter.join(5)
    assert rooms == [1000]
    session.sent(b"y" * 1000)
    assert session.replay is not None and session.replay.kept == SMALL and not session.replayable


def test_acknowledgements_fall_due_by_time() -> None:
    session = Session(SMALL, consented=True, session_id=SESSION_ID, peer_buffer=SMALL)
    assert session.received(10, now=100.0) is None
    assert session.due(now=100.0 + resume.ACK_INTERVAL / 2) is None
    assert session.due(now=100.0 + resume.ACK_INTERVAL) == Ack(10)
    assert session.due(now=200.0) is None


# ---------------------------------------------------------------------------
# Two pumps in this process, joined by a loopback websocket


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        one = socket.create_connection(server.getsockname(), timeout=5)
        other, _ = server.accept()
    one.settimeout(None)
    return one, other


@dataclass
class Bridge:
    """A frontend tunnel and a backend tunnel joined by a websocket; ``client`` and ``target`` are the
    application ends of their TCP sides."""

    client: socket.socket
    target: socket.socket
    front: Tunnel
    back: Tunnel
    outcomes: dict[str, Outcome]
    threads: list[threading.Thread]

    def join(self, timeout: float = 30) -> None:
        for thread in self.threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a tunnel did not end"


def _tunnel(tcp: socket.socket, websocket: Endpoint, role: str, buffer: int, session: Session | None) -> Tunnel:
    options = TunnelOptions(resume_buffer=buffer, ping_interval=0)
    return Tunnel(tcp, websocket, label=role, peer="test", destination="test", options=options,
                  tcp_role=role, tcp_first=role == "client", session=session)


@pytest.fixture
def registry() -> Iterator[TunnelRegistry]:
    made = TunnelRegistry()
    made.start()
    yield made
    made.stop()


def start_bridge(registry: TunnelRegistry, *, buffer: int = SMALL, backend_resumes: bool = True,
                 backend_first: bytes = b"") -> Bridge:
    """``backend_resumes=False``: the backend end is not ours (or has ``resume: false``): it neither
    consents nor accepts control messages; ``backend_first`` is data it sends before anything else."""
    client, front_tcp = tcp_pair()
    back_tcp, target = tcp_pair()
    front_ws, back_ws = tcp_pair()
    front_end = ClientEndpoint(front_ws, DEFAULT_MAX_MESSAGE_BYTES, resume=True)
    back_end = ServerEndpoint(back_ws, b"", DEFAULT_MAX_MESSAGE_BYTES, resume=backend_resumes)
    back_session = None
    if backend_resumes:
        back_session = Session(buffer, consented=True, session_id=SESSION_ID, peer_buffer=buffer)
        back_end.send_control(Consent(SESSION_ID, buffer))
    if backend_first:
        back_end.send_data(backend_first)
    front = _tunnel(front_tcp, front_end, "client", buffer, Session(buffer, consented=False))
    back = _tunnel(back_tcp, back_end, "target", buffer, back_session)
    outcomes: dict[str, Outcome] = {}

    def run(name: str, tunnel: Tunnel) -> threading.Thread:
        return in_thread(lambda: outcomes.__setitem__(name, registry.run(tunnel)))

    return Bridge(client, target, front, back, outcomes, [run("front", front), run("back", back)])


def session_of(tunnel: Tunnel) -> Session:
    session = tunnel._session
    assert session is not None
    return session


def test_both_directions_arrive_whole_through_small_replay_buffers(registry: TunnelRegistry) -> None:
    """4 MiB each way at once through 64 KiB buffers, both ends reading all along: 64 times more than
    either side may keep, so every byte past the first 64 KiB moved only because acknowledgements came
    back, and nothing was ever forgotten (each side could have resumed at any moment)."""
    bridge = start_bridge(registry)
    up, down = os.urandom(4 << 20), os.urandom(4 << 20)
    upload = send_then_shutdown(bridge.client, up)
    download = send_then_shutdown(bridge.target, down)
    downloaded: list[bytes] = []
    reader = in_thread(lambda: downloaded.append(recv_all(bridge.client)))
    assert sha256(recv_all(bridge.target)) == sha256(up)
    reader.join(30)
    assert sha256(downloaded[0]) == sha256(down)
    upload.join(5), download.join(5)
    bridge.join()
    assert bridge.outcomes["front"].kind is Kind.CLEAN and bridge.outcomes["back"].kind is Kind.CLEAN
    for tunnel in (bridge.front, bridge.back):
        session = session_of(tunnel)
        assert session.replayable
        assert session.replay is not None and session.replay.sent == 4 << 20
        assert session.replay.acknowledged >= (4 << 20) - SMALL


def test_a_client_that_sends_everything_before_reading_does_not_deadlock(registry: TunnelRegistry) -> None:
    """The target streams 4 MiB back while the client is still sending 4 MiB and reads nothing: the
    backend's acknowledgements of the upload queue behind that download. Through plain TCP this
    completes; through a resumable tunnel it must too, and memory stays bounded."""
    bridge = start_bridge(registry)
    up, down = os.urandom(4 << 20), os.urandom(4 << 20)
    upload = send_then_shutdown(bridge.client, up)
    download = send_then_shutdown(bridge.target, down)
    assert sha256(recv_all(bridge.target)) == sha256(up)
    assert sha256(recv_all(bridge.client)) == sha256(down)
    upload.join(5), download.join(5)
    bridge.join()
    assert bridge.outcomes["front"].kind is Kind.CLEAN and bridge.outcomes["back"].kind is Kind.CLEAN
    for tunnel in (bridge.front, bridge.back):
        replay = session_of(tunnel).replay
        assert replay is not None and replay.sent == 4 << 20 and replay.kept <= SMALL


def test_a_stalled_target_stops_the_sender_at_its_replay_buffer(registry: TunnelRegistry) -> None:
    """The memory bound: with the target not reading, the frontend keeps at most its buffer and stops
    reading its client; once the target reads, everything arrives and the sender goes on."""
    bridge = start_bridge(registry)
    data = pattern(16 << 20)  # far more than the buffer plus what loopback socket buffers hold
    upload = send_then_shutdown(bridge.client, data)
    front = session_of(bridge.front)
    assert wait_until(lambda: front.waiting, timeout=10), "the sender never waited for an acknowledgement"
    assert front.replay is not None and front.replay.held <= SMALL
    assert bridge.front.bytes_to_ws < len(data)
    assert upload.is_alive()  # the client is pushed back, not buffered
    assert hashlib.sha256(recv_all(bridge.target)).hexdigest() == sha256(data)
    bridge.client.shutdown(socket.SHUT_WR)
    upload.join(5)
    bridge.target.shutdown(socket.SHUT_WR)
    assert recv_all(bridge.client) == b""
    bridge.join()
    assert bridge.outcomes["front"].kind is Kind.CLEAN


def test_a_few_bytes_are_acknowledged_by_time(registry: TunnelRegistry) -> None:
    bridge = start_bridge(registry)
    bridge.client.sendall(b"ping")
    assert recv_exactly(bridge.target, 4) == b"ping"
    front = session_of(bridge.front)
    assert wait_until(lambda: front.replay is not None and front.replay.acknowledged == 4,
                      timeout=resume.ACK_INTERVAL + 5)
    bridge.client.close(), bridge.target.close()
    bridge.join()


@pytest.mark.parametrize("first", [b"", b"banner from a Go backend's target\n"], ids=["silent", "speaks first"])
def test_a_backend_that_does_not_consent_never_sees_a_control_message(registry: TunnelRegistry, first: bytes) -> None:
    """The backend end accepts no control message (as a Go backend): an ack reaching it would be a 1007.
    A silent target lets the offer outgrow its buffer: the upload must go on all the same."""
    bridge = start_bridge(registry, backend_resumes=False, backend_first=first)
    data = pattern(1 << 20)  # 16 times the frontend's buffer
    upload = send_then_shutdown(bridge.client, data)
    assert sha256(recv_all(bridge.target)) == sha256(data)
    upload.join(5)
    bridge.target.shutdown(socket.SHUT_WR)
    assert recv_all(bridge.client) == first
    bridge.join()
    assert bridge.outcomes["front"].kind is Kind.CLEAN and bridge.outcomes["back"].kind is Kind.CLEAN
    front = session_of(bridge.front)
    assert not front.active and front.replay is None


def test_an_acknowledgement_of_bytes_never_sent_ends_the_tunnel_as_a_bad_frame(registry: TunnelRegistry) -> None:
    client, front_tcp = tcp_pair()
    back_tcp, target = tcp_pair()
    front_ws, back_ws = tcp_pair()
    liar = ClientEndpoint(front_ws, DEFAULT_MAX_MESSAGE_BYTES, resume=True)
    back_end = ServerEndpoint(back_ws, b"", DEFAULT_MAX_MESSAGE_BYTES, resume=True)
    back_end.send_control(Consent(SESSION_ID, SMALL))
    back = _tunnel(back_tcp, back_end, "target", SMALL, Session(SMALL, consented=True, session_id=SESSION_ID))
    outcome: list[Outcome] = []
    runner = in_thread(lambda: outcome.append(registry.run(back)))
    assert liar.receive() == Consent(SESSION_ID, SMALL)
    liar.send_control(Ack(1000))
    closed = liar.receive()
    assert isinstance(closed, Closed) and closed.code == 1002
    runner.join(10)
    assert outcome[0].kind is Kind.BAD_FRAME
    for sock in (client, front_tcp, target, front_ws):
        sock.close()


def test_a_consent_after_data_is_a_protocol_error(registry: TunnelRegistry) -> None:
    client, front_tcp = tcp_pair()
    front_ws, back_ws = tcp_pair()
    front = _tunnel(front_tcp, ClientEndpoint(front_ws, DEFAULT_MAX_MESSAGE_BYTES, resume=True), "client", SMALL,
                    Session(SMALL, consented=False))
    backend = ServerEndpoint(back_ws, b"", DEFAULT_MAX_MESSAGE_BYTES, resume=True)
    outcome: list[Outcome] = []
    runner = in_thread(lambda: outcome.append(registry.run(front)))
    backend.send_data(b"data first")
    assert recv_exactly(client, 10) == b"data first"
    backend.send_control(Consent(SESSION_ID, SMALL))
    while not isinstance(event := backend.receive(), Closed):
        pass
    assert event.code == 1002
    runner.join(10)
    assert outcome[0].kind is Kind.BAD_FRAME
    client.close(), back_ws.close()


# ---------------------------------------------------------------------------
# Our backend, a real process


RESUME_OFFER = f"{resume.RESUME_HEADER}: {SMALL}"


def consent_of(frame_payload: bytes) -> Consent:
    message = resume.decode(frame_payload.decode("ascii"))
    assert isinstance(message, Consent)
    return message


def test_our_backend_consents_first_with_a_fresh_session_and_acknowledges(tmp_path: Path) -> None:
    with echo_backend(tmp_path, resume=True, resume_buffer=2 * SMALL) as port:
        sessions = set()
        for _ in range(2):
            ws = dial_backend(port, RESUME_OFFER)
            first = next_data_frame(ws)
            assert first.opcode == OP_TEXT
            consent = consent_of(first.payload)
            assert resume.is_session_id(consent.session) and consent.buffer == 2 * SMALL
            sessions.add(consent.session)
            data = pattern(SMALL)  # the offer's buffer: an acknowledgement is due at a quarter of it
            ws.write(data)
            echoed, acks = bytearray(), []
            deadline = time.monotonic() + 10
            while (len(echoed) < len(data) or not acks) and time.monotonic() < deadline:
                frame = next_data_frame(ws)
                if frame.payload.startswith(resume.PREFIX.encode()):
                    acks.append(resume.decode(frame.payload.decode()))
                else:
                    echoed += bytes.fromhex(frame.payload.decode())
            assert bytes(echoed) == data
            assert acks and all(isinstance(ack, Ack) and 0 < ack.received <= len(data) for ack in acks)
            ws.drop()
        assert len(sessions) == 2


@pytest.mark.parametrize("case", ["no offer", "resume: false", "malformed offer", "two offers"])
def test_our_backend_without_a_valid_offer_sends_nothing_new(tmp_path: Path, case: str) -> None:
    options = {"resume": case != "resume: false"}
    headers = {"no offer": [], "resume: false": [RESUME_OFFER], "malformed offer": [f"{resume.RESUME_HEADER}: 4MiB"],
               "two offers": [RESUME_OFFER, RESUME_OFFER]}[case]
    with echo_backend(tmp_path, **options) as port:
        ws = dial_backend(port, *headers)
        ws.write(b"hello")
        frame = next_data_frame(ws)
        assert (frame.opcode, frame.payload) == (OP_TEXT, b"hello".hex().encode())
        ws.send_frame(OP_TEXT, resume.encode(Ack(5)).encode())  # to an end that did not consent: not hex
        while (frame := next_data_frame(ws)).opcode != 0x8:
            pass
        assert int.from_bytes(frame.payload[:2], "big") == 1007
        ws.drop()
