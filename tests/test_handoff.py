"""Handing a re-attaching connection between worker processes (bridge.handoff): the ids each worker
gives out, and a real socket passed over a real datagram pair with its record."""

from __future__ import annotations

import socket

import pytest

from bridge import resume
from bridge.handoff import Handoff, HandoffFailed, Reattach, socket_pairs
from tests.helpers import recv_exactly


def worker_sides(count: int) -> list[Handoff]:
    pairs = socket_pairs(count)
    senders = [sender for _, sender in pairs]
    return [Handoff(slot, receiver, senders) for slot, (receiver, _) in enumerate(pairs)]


@pytest.mark.parametrize("count", [1, 2, 3, 7, 64])
def test_every_id_a_worker_gives_out_is_its_own_and_well_formed(count: int) -> None:
    sides = worker_sides(count)
    for side in sides:
        ids = {side.new_session_id() for _ in range(200)}
        assert len(ids) == 200
        assert all(resume.is_session_id(i) and side.owner(i) == side.slot for i in ids)
        assert all(other.owner(i) == side.slot for other in sides for i in list(ids)[:5])


def test_a_slot_out_of_range_is_refused() -> None:
    receiver, sender = socket_pairs(1)[0]
    with pytest.raises(ValueError, match="slot 1 out of 1"):
        Handoff(1, receiver, [sender])


def test_a_connection_reaches_the_owner_with_its_record_and_still_works() -> None:
    first, second = worker_sides(2)
    session = second.new_session_id()
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=5)
        accepted, _ = server.accept()
    record = Reattach("main", "default", "dGhlIHNhbXBsZSBub25jZQ==", True, session, "127.0.0.1:1")
    first.send(record, accepted)
    accepted.close()  # the sender lets go of its descriptor; the connection lives on in the owner
    got, sock = second.receive()
    assert got == record
    sock.sendall(b"from the owner")
    assert recv_exactly(client, 14) == b"from the owner"
    client.sendall(b"to the owner")
    assert recv_exactly(sock, 12) == b"to the owner"
    sock.close(), client.close()


def test_an_owner_that_takes_nothing_makes_the_sender_fail_instead_of_block() -> None:
    first, second = worker_sides(2)
    record = Reattach("main", "default", "k", False, second.new_session_id(), "p")
    left, right = socket.socketpair()
    with pytest.raises(HandoffFailed):
        for _ in range(10_000):  # the owner's queue holds far fewer
            first.send(record, left)
    left.close(), right.close()
