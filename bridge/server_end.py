"""The server end of a tunnel's websocket: the endpoint over an upgraded connection, the 101, a re-attach.

The client end is :class:`bridge.frontend.ClientEndpoint`; both are :class:`bridge.endpoint.Endpoint`.
"""

from __future__ import annotations

import socket
import time

from bridge import frames, protocol
from bridge.endpoint import Closed, Endpoint
from bridge.handshake import upgrade_response
from bridge.protocol import CloseCode, ProtocolViolation
from bridge.tunnel import Tunnel

#: What a refused re-attach's close frame says.
NO_SUCH_SESSION = "no resumable tunnel has that session (unknown, ended or past resume_timeout)"
#: How long a refused re-attach waits for the frontend's close reply, and how many messages it reads.
REFUSAL_WAIT = 5.0
REFUSAL_MESSAGES = 16


class ServerEndpoint(Endpoint):
    """The server end of a tunnel's websocket, over the socket of an upgraded request.

    ``received``: what the client sent after its request. ``binary_consented``:
    our 101 consented to binary messages, so the frontend's switch marker is
    accepted; on receiving it the endpoint sends its own marker after what it
    sent so far, and binary messages from then on (:mod:`bridge.protocol`).
    """

    def __init__(self, sock: socket.socket, received: bytes, max_message_bytes: int, *,
                 binary_consented: bool = False, resume: bool = False) -> None:
        super().__init__(sock, frames.FrameParser(max_message_bytes, masked=True), max_message_bytes,
                         switch_allowed=binary_consented, received=received, resume=resume)

    def _frame_bytes(self, opcode: int, payload: bytes) -> bytes:
        return frames.frame_header(opcode, len(payload)) + payload

    def _write_frame(self, opcode: int, payload: bytes) -> None:
        if len(payload) < _JOIN_BELOW:
            self._sock.sendall(self._frame_bytes(opcode, payload))
        else:
            _send_all(self._sock, [frames.frame_header(opcode, len(payload)), payload])

    def _peer_switched(self) -> None:
        """Answer with our own switch marker, without waiting (this is the reading thread).

        The marker goes out when the send lock and room for it are there (see
        :mod:`bridge.endpoint`); :attr:`binary` turns true only once it is on the
        wire, so what we send until then stays hex, as the peer expects.
        """
        self._queue_control(switch=True)


#: Below this many bytes a frame's header and payload are joined and sent with one ``sendall``
#: (cheaper than a gather); above, copying the payload would cost more.
_JOIN_BELOW = 16 * 1024


def _send_all(sock: socket.socket, parts: list[bytes]) -> None:
    """``sendall`` of several buffers without joining them (``sendmsg`` gathers them)."""
    views = [memoryview(part) for part in parts if part]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


# ---------------------------------------------------------------------------
# The HTTP front door


def bridge_upgrade_response(key: str, binary: bool) -> bytes:
    """The 101 that accepts a bridge upgrade (consenting to binary messages if ``binary``)."""
    return upgrade_response(key, [f"{protocol.CONSENT_HEADER}: {protocol.CONSENT_BINARY}"] if binary else [])


def refuse_reattach(endpoint: ServerEndpoint) -> None:
    """Refuse a re-attach in band, over the websocket just upgraded: an announced close
    :attr:`~bridge.protocol.CloseCode.NO_SUCH_SESSION`, then the frontend's close reply (within
    :data:`REFUSAL_WAIT`), then the connection is closed.

    Why upgrade only to refuse: the inverting proxy's agent answers anything but a 101 with a 500 that
    names no status, which a frontend must take for a backend not up yet and redial until
    ``resume_timeout``. An announced close crosses the shim (text messages do), so the frontend ends
    the tunnel at once wherever the refusal comes from.
    """
    endpoint.announce_close = True
    deadline = time.monotonic() + REFUSAL_WAIT
    try:
        endpoint.sock.settimeout(REFUSAL_WAIT)
        if endpoint.send_close(CloseCode.NO_SUCH_SESSION, NO_SUCH_SESSION, wait=REFUSAL_WAIT):
            for _ in range(REFUSAL_MESSAGES):  # the frontend's resumed message, then its close
                if time.monotonic() > deadline or isinstance(endpoint.receive(), Closed):
                    break
    except (OSError, ProtocolViolation):
        pass  # the frontend left first: it has what it needs, or will redial
    finally:
        endpoint.close()


def reattach(tunnel: Tunnel, endpoint: ServerEndpoint) -> None:
    """Give ``endpoint`` (upgraded) to ``tunnel`` and hold its connection while it is the tunnel's: the
    calling thread's return would let its server close it. Closed here if the tunnel cannot take it."""
    if tunnel.attach(endpoint):
        tunnel.hold(endpoint)
    else:
        endpoint.close()
