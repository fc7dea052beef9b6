"""Listening sockets for both daemons, with bind errors that say what to fix.

A daemon binds through a :data:`Binder`: :func:`bind_fresh` in a single process; a worker
process of :mod:`bridge.arbiter` is handed the sockets its main process bound for it
(:func:`bind_slots`: one ``SO_REUSEPORT`` socket per worker on the same port, so the kernel
spreads connections over the workers and each worker accepts and shuts down its own).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

from bridge.config import Address
from bridge.sockets import describe_error

#: Connections the kernel queues before accept(); bursts of hundreds must not be refused.
LISTEN_BACKLOG = 1024


class ListenError(Exception):
    """A listening socket could not be bound; the message names the tunnel or listener and address."""


#: How a daemon gets the listening socket of a tunnel or listener: (name, address, what) -> socket.
#: ``what`` names it in error messages ("tunnel 'ssh'"); ListenError when it cannot be had.
Binder = Callable[[str, Address, str], socket.socket]


def bind_fresh(name: str, address: Address, what: str) -> socket.socket:
    """The single-process :data:`Binder`: bind a new socket for ``address``."""
    return bind_listener(address, what)


def bind_listener(address: Address, what: str, *, reuse_port: bool = False) -> socket.socket:
    """Bind a listening TCP socket; raise ListenError naming ``what`` and the address."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        return socket.create_server((address.host, address.port), family=family, backlog=LISTEN_BACKLOG,
                                    reuse_port=reuse_port)
    except socket.gaierror as exc:
        raise ListenError(f"{what}: cannot listen on {address}: unknown host ({exc.strerror})") from None
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = " (another process is listening there: stop it or change 'listen')"
        elif exc.errno == errno.EADDRNOTAVAIL:
            hint = " (no interface of this machine has that address)"
        elif exc.errno == errno.EACCES:
            hint = " (ports below 1024 need privileges)"
        raise ListenError(f"{what}: cannot listen on {address}: {describe_error(exc)}{hint}") from None


def bind_slots(address: Address, what: str, count: int) -> list[socket.socket]:
    """``count`` ``SO_REUSEPORT`` sockets listening on one port, or none: ListenError on the first failure.

    Port 0 means one free port for all of them. A process bound there without
    ``SO_REUSEPORT`` (or under another user) still makes the first bind fail.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            port = sockets[0].getsockname()[1] if sockets else address.port
            sockets.append(bind_listener(Address(address.host, port), what, reuse_port=True))
    except ListenError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
