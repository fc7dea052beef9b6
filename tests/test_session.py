"""The resumable session (bridge.session): its rules alone, then two in-process pumps that use it over
real loopback sockets, then our backend's consent as a real process sees it.

The pumps prove what every resumable tunnel does while its websocket lives (keep, acknowledge, wait
at a full buffer) and that a peer that is not ours never sees any of it; then what it does when the
websocket is cut: detach, dial again, trade what each side received, replay exactly the rest.
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
from bridge.config import TunnelOptions
from bridge.endpoint import Closed, Endpoint
from bridge.frames import close_payload
from bridge.frontend import ClientEndpoint
from bridge.outcome import Kind, Outcome
from bridge.protocol import DEFAULT_MAX_MESSAGE_BYTES, ProtocolViolation
from bridge.registry import TunnelRegistry
from bridge.resume import Ack, Consent
from bridge.server_end import ServerEndpoint
from bridge.session import ResumeRefused, Session
from bridge.tunnel import Redial, Tunnel, reset_now
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


def _tunnel(tcp: socket.socket, websocket: Endpoint, role: str, buffer: int, session: Session | None,
            redial: Redial | None = None, resume_timeout: float = 60.0) -> Tunnel:
    options = TunnelOptions(resume_buffer=buffer, ping_interval=0, resume_timeout=resume_timeout)
    return Tunnel(tcp, websocket, label=role, peer="test", destination="test", options=options,
                  tcp_role=role, tcp_first=role == "client", session=session, redial=redial)


class Rewire:
    """The frontend's redial for an in-process bridge: a new loopback websocket whose backend end
    attaches to the backend tunnel on its own thread, as the backend daemon's upgrade would.
    ``refuse``: answer with ResumeRefused instead; ``fail``: this many dials fail first."""

    def __init__(self) -> None:
        self.back: Tunnel | None = None
        self.refuse = False
        self.fail = 0
        self.dials = 0
        self.attached: list[bool] = []

    def __call__(self) -> Endpoint:
        self.dials += 1
        if self.refuse:
            raise ResumeRefused("the backend does not know this session")
        if self.fail:
            self.fail -= 1
            raise ConnectionRefusedError("connection refused")
        front_ws, back_ws = tcp_pair()
        back_end = ServerEndpoint(back_ws, b"", DEFAULT_MAX_MESSAGE_BYTES, resume=True)
        back = self.back
        assert back is not None

        def attach() -> None:
            taken = back.attach(back_end)
            self.attached.append(taken)
            if not taken:
                back_end.close()
        in_thread(attach)
        return ClientEndpoint(front_ws, DEFAULT_MAX_MESSAGE_BYTES, resume=True)


@pytest.fixture
def registry() -> Iterator[TunnelRegistry]:
    made = TunnelRegistry()
    made.start()
    yield made
    made.stop()


def start_bridge(registry: TunnelRegistry, *, buffer: int = SMALL, backend_resumes: bool = True,
                 backend_first: bytes = b"", rewire: Rewire | None = None, resume_timeout: float = 60.0) -> Bridge:
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
    front = _tunnel(front_tcp, front_end, "client", buffer, Session(buffer, consented=False), rewire,
                    resume_timeout)
    back = _tunnel(back_tcp, back_end, "target", buffer, back_session, resume_timeout=resume_timeout)
    if rewire is not None:
        rewire.back = back
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
    assert liar.receive() == resume.Closing(1002)  # a resumable tunnel announces its close frames
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
# Cut websockets: detach, dial again, replay exactly the rest


def cut(tunnel: Tunnel, how: str = "reset") -> None:
    """Cut the tunnel's websocket under it: a RST, or a FIN both ways (what a dying proxy sends)."""
    sock = tunnel._websocket.sock
    if how == "reset":
        reset_now(sock)
    else:
        sock.shutdown(socket.SHUT_RDWR)


def reader_of(sock: socket.socket) -> tuple[threading.Thread, list[bytes]]:
    got: list[bytes] = []
    return in_thread(lambda: got.append(recv_all(sock, timeout=60))), got


def test_both_directions_arrive_whole_through_five_cuts(registry: TunnelRegistry) -> None:
    """8 MiB each way while the websocket is cut five times, by RST and by FIN, from either end: every
    byte arrives exactly once and in order, and the tunnel still ends clean."""
    rewire = Rewire()
    bridge = start_bridge(registry, rewire=rewire)
    up, down = os.urandom(8 << 20), os.urandom(8 << 20)
    download = send_then_shutdown(bridge.target, down)
    target_reader, uploaded = reader_of(bridge.target)
    client_reader, downloaded = reader_of(bridge.client)
    piece = len(up) // 8
    for index in range(8):
        bridge.client.sendall(up[index * piece:(index + 1) * piece])
        if index < 5:
            cut(bridge.front if index % 2 else bridge.back, "reset" if index < 3 else "shutdown")
            resumed = index + 1
            assert wait_until(lambda n=resumed: bridge.front.resumes == n == bridge.back.resumes, timeout=20), \
                f"cut {index + 1} was not resumed"
    bridge.client.shutdown(socket.SHUT_WR)
    target_reader.join(60), client_reader.join(60), download.join(5)
    assert sha256(uploaded[0]) == sha256(up)
    assert sha256(downloaded[0]) == sha256(down)
    bridge.join()
    assert bridge.outcomes["front"].kind is Kind.CLEAN and bridge.outcomes["back"].kind is Kind.CLEAN
    assert rewire.attached == [True] * 5


def test_a_cut_while_the_target_stalls_replays_what_the_backend_had_not_taken(registry: TunnelRegistry) -> None:
    """The target reads nothing: the frontend stops at its buffer, perhaps part of it still in flight. A
    cut loses the bytes in flight; the replay sends exactly those, and memory stays bounded."""
    rewire = Rewire()
    bridge = start_bridge(registry, rewire=rewire)
    data = pattern(8 << 20)
    upload = send_then_shutdown(bridge.client, data)
    front, back = session_of(bridge.front), session_of(bridge.back)
    assert wait_until(lambda: front.waiting and bridge.back._tcp_write_stalled(), timeout=10), \
        "the sender never waited for the stalled target"
    assert front.replay is not None and front.replay.held <= SMALL
    in_flight = front.replay.sent - back.taken  # 0 when the message the backend delivers was the last sent
    cut(bridge.front)
    assert wait_until(lambda: bridge.front.resumes == 1, timeout=20)
    assert bridge.front.bytes_replayed == in_flight
    assert front.replay.held <= SMALL
    assert sha256(recv_all(bridge.target)) == sha256(data)
    upload.join(5)
    bridge.target.shutdown(socket.SHUT_WR)
    assert recv_all(bridge.client) == b""
    bridge.join()
    assert bridge.outcomes["front"].kind is Kind.CLEAN and bridge.outcomes["back"].kind is Kind.CLEAN


@pytest.mark.parametrize("how", ["reset", "shutdown"])
def test_a_cut_after_the_client_half_closed_keeps_the_half_close(registry: TunnelRegistry, how: str) -> None:
    """The client sent everything and its FIN; the target answers after the cut. The marker is not sent
    twice, nor lost: the target sees the end once, and the answer arrives whole."""
    rewire = Rewire()
    bridge = start_bridge(registry, rewire=rewire)
    bridge.client.sendall(b"request")
    bridge.client.shutdown(socket.SHUT_WR)
    assert recv_all(bridge.target) == b"request"  # the target saw the end
    cut(bridge.back, how)
    assert wait_until(lambda: bridge.front.resumes == 1 == bridge.back.resumes, timeout=20)
    answer = pattern(1 << 20)
    bridge.target.sendall(answer)
    bridge.target.shutdown(socket.SHUT_WR)
    assert recv_all(bridge.client) == answer
    bridge.join()
    assert bridge.outcomes["front"].kind is Kind.CLEAN and bridge.outcomes["back"].kind is Kind.CLEAN


def test_a_cut_in_the_middle_of_the_last_answer_after_the_targets_marker(registry: TunnelRegistry) -> None:
    """The target answered and closed while the client was still sending; the websocket is cut before
    the client's end. Both markers go through the re-attached websocket exactly once."""
    rewire = Rewire()
    bridge = start_bridge(registry, rewire=rewire)
    bridge.target.sendall(b"banner")
    bridge.target.shutdown(socket.SHUT_WR)
    assert recv_all(bridge.client) == b"banner"
    cut(bridge.front, "shutdown")
    assert wait_until(lambda: bridge.front.resumes == 1 == bridge.back.resumes, timeout=20)
    bridge.client.sendall(b"late words")
    bridge.client.shutdown(socket.SHUT_WR)
    assert recv_all(bridge.target) == b"late words"
    bridge.join()
    assert bridge.outcomes["front"].kind is Kind.CLEAN and bridge.outcomes["back"].kind is Kind.CLEAN


def test_a_websocket_that_still_looks_alive_is_replaced_by_a_proven_one(registry: TunnelRegistry) -> None:
    """The frontend saw the path die first and dialled again; to the backend the old websocket still
    looks fine. The new one replaces it, and bytes on both keep their order."""
    bridge = start_bridge(registry)  # no redial: this test attaches by hand, both ends still attached
    bridge.client.sendall(b"before ")
    assert recv_exactly(bridge.target, 7) == b"before "
    front_ws, back_ws = tcp_pair()
    back_end = ServerEndpoint(back_ws, b"", DEFAULT_MAX_MESSAGE_BYTES, resume=True)
    attached: list[bool] = []
    backend_attach = in_thread(lambda: attached.append(bridge.back.attach(back_end)))
    assert bridge.front.attach(ClientEndpoint(front_ws, DEFAULT_MAX_MESSAGE_BYTES, resume=True))
    backend_attach.join(10)
    assert attached == [True]
    ends_clean_after(bridge, b"after")


def test_a_pump_whose_report_a_re_attach_overtook_goes_on(registry: TunnelRegistry,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A pump reports its websocket lost, and the redial attaches a new one before the report returns
    (the pump's thread was descheduled). The report must still say "go on": it once read the
    lifecycle again afterwards, found it attached and not detached, and the pump stopped as if the
    tunnel had ended, hanging it or ending it early with a FIN (seen under load)."""
    rewire = Rewire()
    bridge = start_bridge(registry, rewire=rewire)
    assert wait_until(lambda: session_of(bridge.front).replayable, timeout=5)
    detach = bridge.front._detach

    def detach_then_let_the_redial_win(dropped: Endpoint) -> None:
        detach(dropped)
        assert wait_until(lambda: bridge.front.resumes == 1 == bridge.back.resumes, timeout=10)
    monkeypatch.setattr(bridge.front, "_detach", detach_then_let_the_redial_win)
    assert bridge.front._report_lost(0, Outcome(Kind.WEBSOCKET_DROPPED, "abort: websocket dropped (test)"))
    ends_clean_after(bridge, b"after")


def test_both_pumps_stopping_while_the_tunnel_runs_is_an_abort_never_a_clean_end(
        registry: TunnelRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety net for a bug like the one above: a tunnel whose pumps both returned while its
    lifecycle still runs resets its TCP side (a FIN would tell the client everything arrived)."""
    client, front_tcp = tcp_pair()
    front_ws, back_ws = tcp_pair()
    front = _tunnel(front_tcp, ClientEndpoint(front_ws, DEFAULT_MAX_MESSAGE_BYTES), "client", SMALL, None)
    monkeypatch.setattr(front, "_ws_to_tcp", lambda: None)  # a reader that stops for no reason
    outcome: list[Outcome] = []
    runner = in_thread(lambda: outcome.append(registry.run(front)))
    client.shutdown(socket.SHUT_WR)  # the sender sends our marker and returns; nothing else ends it
    assert_reset(client)
    runner.join(10)
    assert outcome[0].kind is Kind.INTERNAL_ERROR
    back_ws.close()


def ends_clean_after(bridge: Bridge, last: bytes) -> None:
    """The client sends ``last`` and its FIN, the target its FIN: both arrive and both tunnels end clean."""
    bridge.client.sendall(last)
    bridge.client.shutdown(socket.SHUT_WR)
    assert recv_all(bridge.target) == last
    bridge.target.shutdown(socket.SHUT_WR)
    assert recv_all(bridge.client) == b""
    bridge.join()
    assert bridge.outcomes["front"].kind is Kind.CLEAN and bridge.outcomes["back"].kind is Kind.CLEAN


def inject(tunnel: Tunnel, *frames: tuple[int, bytes]) -> None:
    """Write whole frames into ``tunnel``'s websocket as a relay on the path would (the tunnel is idle)."""
    websocket = tunnel._websocket
    websocket.sock.sendall(b"".join(websocket._frame_bytes(opcode, payload) for opcode, payload in frames))


def test_a_close_the_peer_did_not_announce_is_a_relays_and_is_resumed(registry: TunnelRegistry) -> None:
    """Through the shim, a drop becomes a bare close 1000: not the peer's end, so the tunnel resumes."""
    rewire = Rewire()
    bridge = start_bridge(registry, rewire=rewire)
    assert wait_until(lambda: session_of(bridge.front).replayable, timeout=5)
    bridge.client.sendall(b"before")
    assert recv_exactly(bridge.target, 6) == b"before"
    inject(bridge.back, (0x8, close_payload(1000, "")))
    assert wait_until(lambda: bridge.front.resumes == 1 == bridge.back.resumes, timeout=20)
    ends_clean_after(bridge, b"after")


def test_an_announced_code_wins_over_the_one_a_relay_delivers(registry: TunnelRegistry) -> None:
    """The shim delivers every close as 1000: the peer's announced 1011 still makes it an abort."""
    bridge = start_bridge(registry)
    assert wait_until(lambda: session_of(bridge.front).replayable, timeout=5)
    inject(bridge.back, (0x1, resume.encode(resume.Closing(1011)).encode()), (0x8, close_payload(1000, "")))
    assert_reset(bridge.client)
    assert wait_until(lambda: "front" in bridge.outcomes, timeout=10)
    outcome = bridge.outcomes["front"]
    assert outcome.kind is Kind.ABORTED_BY_PEER and "1011" in outcome.detail
    bridge.back.abort(Outcome(Kind.SHUTDOWN, "abort: test over"))
    bridge.join()


def assert_reset(sock: socket.socket) -> None:
    with pytest.raises(ConnectionResetError):
        recv_all(sock, timeout=20)


def test_a_tunnel_not_resumed_within_resume_timeout_ends_as_an_abort(registry: TunnelRegistry) -> None:
    rewire = Rewire()
    rewire.fail = 1000  # the backend stays unreachable
    bridge = start_bridge(registry, rewire=rewire, resume_timeout=1.0)
    assert wait_until(lambda: session_of(bridge.front).replayable, timeout=5)
    bridge.client.sendall(b"hello")
    assert recv_exactly(bridge.target, 5) == b"hello"
    cut(bridge.front)
    assert_reset(bridge.client)
    assert_reset(bridge.target)
    bridge.join()
    for name in ("front", "back"):
        outcome = bridge.outcomes[name]
        assert outcome.kind is Kind.WEBSOCKET_DROPPED and "not resumed within 1 s" in outcome.detail
    assert 2 <= rewire.dials <= 20  # backing off, not spinning


def test_a_refused_resume_ends_the_frontend_at_once(registry: TunnelRegistry) -> None:
    rewire = Rewire()
    rewire.refuse = True
    bridge = start_bridge(registry, rewire=rewire, resume_timeout=30.0)
    assert wait_until(lambda: session_of(bridge.front).replayable, timeout=5)  # the consent came
    cut(bridge.front)
    assert_reset(bridge.client)
    assert wait_until(lambda: "front" in bridge.outcomes, timeout=5)
    outcome = bridge.outcomes["front"]
    assert outcome.kind is Kind.WEBSOCKET_DROPPED and "refused" in outcome.detail
    assert rewire.dials == 1  # a refusal is final: no dial after it
    bridge.back.abort(Outcome(Kind.SHUTDOWN, "abort: test over"))
    bridge.join()


def detached_backend(registry: TunnelRegistry, target_sends: bytes) -> tuple[Tunnel, socket.socket, list[Outcome]]:
    """A backend tunnel whose target sent ``target_sends`` to a websocket peer that read none of it and
    dropped; the tunnel waits for a new websocket. Returns it, its target's socket, its outcome."""
    back_tcp, target = tcp_pair()
    front_ws, back_ws = tcp_pair()
    back_end = ServerEndpoint(back_ws, b"", DEFAULT_MAX_MESSAGE_BYTES, resume=True)
    back = _tunnel(back_tcp, back_end, "target", SMALL, Session(SMALL, consented=True, session_id=SESSION_ID))
    outcome: list[Outcome] = []
    in_thread(lambda: outcome.append(registry.run(back)))
    target.sendall(target_sends)
    assert wait_until(lambda: back.bytes_to_ws == len(target_sends), timeout=10)
    front_ws.close()  # the first websocket drops, its bytes unread
    assert wait_until(lambda: back._lifecycle.detached, timeout=10)
    return back, target, outcome


def reattach_by_hand(back: Tunnel, said: resume.Resumed) -> tuple[ClientEndpoint, threading.Thread, list[bool]]:
    """Attach a new websocket to ``back`` from a hand-driven frontend end that says ``said`` first."""
    ours, theirs = tcp_pair()
    peer = ClientEndpoint(ours, DEFAULT_MAX_MESSAGE_BYTES, resume=True)
    peer.send_control(said)
    attached: list[bool] = []
    attach = in_thread(lambda: attached.append(back.attach(ServerEndpoint(theirs, b"", DEFAULT_MAX_MESSAGE_BYTES,
                                                                           resume=True))))
    return peer, attach, attached


def test_a_reattached_peer_is_told_what_we_took_and_gets_exactly_what_it_lacked(registry: TunnelRegistry) -> None:
    back, target, _ = detached_backend(registry, b"0123456789")
    peer, attach, attached = reattach_by_hand(back, resume.Resumed(4))  # "I had 4 of your bytes"
    assert peer.receive() == resume.Resumed(0)  # the backend had taken nothing from us
    assert peer.receive() == b"456789"
    attach.join(10)
    assert attached == [True] and back.bytes_replayed == 6 and back.resumes == 1
    peer.send_data(b"up")
    assert recv_exactly(target, 2) == b"up"
    target.close()
    peer.sock.close()


def test_a_resumed_message_claiming_bytes_never_sent_ends_the_tunnel(registry: TunnelRegistry) -> None:
    back, target, outcome = detached_backend(registry, b"twelve bytes")
    peer, attach, attached = reattach_by_hand(back, resume.Resumed(13))
    attach.join(10)
    assert attached == [False]
    assert wait_until(lambda: bool(outcome), timeout=10)
    assert outcome[0].kind is Kind.BAD_FRAME and "resuming" in outcome[0].detail
    target.close()
    peer.sock.close()


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
