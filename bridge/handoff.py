"""Handing a re-attaching connection to the worker process that holds its session.

With ``workers: N`` the kernel spreads new connections over the workers' sockets (``SO_REUSEPORT``),
so a frontend re-attaching to a resumable tunnel reaches any worker, while the tunnel lives in one.
The session id says which (:meth:`Handoff.owner`, the id modulo N), since each worker gives out only
ids it owns (:meth:`Handoff.new_session_id`: 128 random bits with their residue set, so an id keeps
128 - log2(N) bits of chance).

A worker that gets a re-attach for another's session passes the accepted connection on, with what
its checks found (:class:`Reattach`), over the owner's datagram socket pair, which main made before
forking and keeps across worker restarts (:func:`socket_pairs`); SCM_RIGHTS carries the descriptor.
The owner answers it as if it had accepted it itself. Only the processes of one daemon hold these
sockets, so a record needs no authentication of its own: the sending worker already checked the
request's Origin and token.
"""

from __future__ import annotations

import array
import json
import secrets
import socket
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

#: The largest record: a few names, the websocket key, an id and an address.
MAX_RECORD = 4096


@dataclass(frozen=True)
class Reattach:
    """A re-attaching upgrade that passed the checks of the worker that accepted it."""

    listener: str
    route: str
    #: The request's Sec-WebSocket-Key, for the 101 the owner sends.
    key: str
    #: Whether the 101 consents to binary messages.
    binary: bool
    session_id: str
    #: The client's address as the accepting worker saw it (for log lines).
    peer: str


class HandoffFailed(OSError):
    """The owner's socket could not take the connection (its queue is full: the worker is gone or stuck)."""


def socket_pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    """One (receiving, sending) datagram pair per worker slot, made by main before forking."""
    return [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(count)]


class Handoff:
    """One worker's side: its ``slot``, the receiving end of its own pair, and the sending ends of all."""

    def __init__(self, slot: int, receiver: socket.socket, senders: list[socket.socket]) -> None:
        if not 0 <= slot < len(senders):
            raise ValueError(f"slot {slot} out of {len(senders)}")
        self.slot = slot
        self._receiver = receiver
        self._senders = senders

    @property
    def slots(self) -> int:
        return len(self._senders)

    def owner(self, session_id: str) -> int:
        """The slot of the worker that gave out ``session_id`` (a well-formed id)."""
        return int(session_id, 16) % self.slots

    def new_session_id(self) -> str:
        """A fresh session id that :meth:`owner` maps to this worker."""
        value = secrets.randbits(128)
        value -= value % self.slots
        value += self.slot if value + self.slot < 1 << 128 else self.slot - self.slots
        return f"{value:032x}"

    def send(self, reattach: Reattach, sock: socket.socket) -> None:
        """Pass ``sock`` (the caller then closes its own descriptor) with ``reattach`` to the owner of its
        session. Never blocks: HandoffFailed when the owner's queue is full."""
        record = json.dumps(asdict(reattach)).encode()
        fds = array.array("i", [sock.fileno()])
        try:
            self._senders[self.owner(reattach.session_id)].sendmsg(
                [record], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], socket.MSG_DONTWAIT)
        except BlockingIOError:
            raise HandoffFailed("the worker that holds the session does not take connections now") from None

    def receive(self) -> tuple[Reattach, socket.socket]:
        """The next connection handed to this worker (blocks). OSError once the socket is closed."""
        while True:
            record, ancillary, _flags, _address = self._receiver.recvmsg(
                MAX_RECORD, socket.CMSG_SPACE(array.array("i", [0]).itemsize))
            sock = _passed_socket(ancillary)
            if sock is None:
                continue  # a record without its descriptor: nothing to answer on
            try:
                return Reattach(**json.loads(record)), sock
            except (ValueError, TypeError):
                sock.close()

    def close(self) -> None:
        self._receiver.close()


def _passed_socket(ancillary: list[tuple[int, int, bytes]]) -> socket.socket | None:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    for extra in fds[1:]:
        socket.close(extra)
    return socket.socket(fileno=fds[0]) if fds else None


@runtime_checkable
class TakesHandoff(Protocol):
    """A daemon whose workers hand connections to each other (the backend): main gives each worker its side."""

    def use_handoff(self, handoff: Handoff) -> None: ...
