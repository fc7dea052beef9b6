"""How a tunnel ended, as a type: what stats, metrics, the log and ``tcpbridge connect`` read.

An :class:`Outcome` is a :class:`Kind` (a closed set, stable: it is what code and dashboards act on)
plus a ``detail`` for humans (the text of the tunnel's "closed" log line). The detail may quote the
peer (a close reason it sent) or the kernel (an errno's text); nothing reads it but a person, so
neither the remote end nor a locale can change a metric label or an exit status.

Each kind belongs to one of the five outcome *classes* that ``tcpbridge_tunnels_closed_total`` and
``tcpbridge status`` have always counted (:data:`CLASSES`, :attr:`Kind.metric_class`), so dashboards
keep working while the log and the journal carry the finer kind.

No I/O and no imports from the rest of the package: every floor may use it.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

#: Outcome classes, in the order ``status`` and the metrics list them.
CLASSES = ("clean", "closed", "timeout", "protocol_error", "abort")


class Kind(enum.StrEnum):
    """Why a tunnel ended. The value is what the journal's ``TCPBRIDGE_OUTCOME`` field holds."""

    #: Both directions finished: each side's end of stream reached the other, then close 1000.
    CLEAN = "clean"
    #: The websocket peer closed (1000, or no code) before both directions had finished.
    CLOSED_BY_PEER = "closed_by_peer"
    #: One direction had finished and the other moved nothing for ``half_close_timeout``.
    HALF_CLOSE_TIMEOUT = "half_close_timeout"
    #: No data either way for ``idle_timeout``.
    IDLE_TIMEOUT = "idle_timeout"
    #: The websocket peer answered no ping for ``ping_timeout`` and its kernel stopped acknowledging.
    PEER_UNRESPONSIVE = "peer_unresponsive"
    #: The websocket peer sent something the protocol forbids (we closed with 1002/1003/1007/1009).
    BAD_FRAME = "bad_frame"
    #: The TCP client (the frontend's accepted connection, ``connect``'s stdio) reset or failed.
    ABORTED_BY_CLIENT = "aborted_by_client"
    #: The TCP target (the backend's outgoing connection) reset or failed.
    ABORTED_BY_TARGET = "aborted_by_target"
    #: The websocket peer closed with a code other than 1000 (it aborted its end).
    ABORTED_BY_PEER = "aborted_by_peer"
    #: The websocket connection failed or ended without a close frame.
    WEBSOCKET_DROPPED = "websocket_dropped"
    #: Our daemon reset the tunnel because it is stopping (or ``connect`` was interrupted by a signal).
    SHUTDOWN = "shutdown"
    #: A bug or a resource limit of ours (no thread could be started).
    INTERNAL_ERROR = "internal_error"

    @property
    def metric_class(self) -> str:
        """The outcome class (one of :data:`CLASSES`) this kind is counted under."""
        return _CLASS_OF.get(self, "abort")


_CLASS_OF = {
    Kind.CLEAN: "clean",
    Kind.CLOSED_BY_PEER: "closed",
    Kind.HALF_CLOSE_TIMEOUT: "timeout",
    Kind.IDLE_TIMEOUT: "timeout",
    Kind.PEER_UNRESPONSIVE: "timeout",
    Kind.BAD_FRAME: "protocol_error",
}


class Outcome(NamedTuple):
    """How one tunnel ended: ``kind`` for code, ``detail`` for people (``str()`` gives the detail)."""

    kind: Kind
    detail: str

    def __str__(self) -> str:
        return self.detail


CLEAN = Outcome(Kind.CLEAN, "clean")
CLOSED_BY_PEER = Outcome(Kind.CLOSED_BY_PEER, "closed by peer")
HALF_CLOSE_TIMEOUT = Outcome(Kind.HALF_CLOSE_TIMEOUT, "half-close timeout")

