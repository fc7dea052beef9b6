"""Listening sockets for both daemons, with bind errors that say what to fix."""

from __future__ import annotations

import errno
import socket

from bridge.config import Address

#: Connections the kernel queues before accept(); bursts of hundreds must not be refused.
LISTEN_BACKLOG = 1024


class ListenError(Exception):
    """A listening socket could not be bound; the message names the tunnel or listener and address."""


def bind_listener(address: Address, what: str) -> socket.socket:
    """Bind a listening TCP socket; raise ListenError naming ``what`` and the address."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        return socket.create_server((address.host, address.port), family=family, backlog=LISTEN_BACKLOG)
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
        reason = exc.strerror.lower() if exc.strerror else str(exc)
        raise ListenError(f"{what}: cannot listen on {address}: {reason}{hint}") from None
