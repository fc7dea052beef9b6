"""The log lines a user can filter on: their fixed message ids and the facts they carry.

A logging call marks its line with ``extra=events.mark(Event.X, facts)``. :mod:`bridge.journal`
writes the mark as journal fields: ``MESSAGE_ID`` (the event's fixed 128-bit id) and one
``TCPBRIDGE_<NAME>`` field per fact (``tunnel`` becomes ``TCPBRIDGE_TUNNEL``). On plain stderr
only the line's text is written, and the text says the same things, so nothing is lost there.

The ids never change (docs/operating.md lists them): ``journalctl MESSAGE_ID=...`` keeps
working across versions. No imports from the rest of the package.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping

#: The attribute of a :class:`logging.LogRecord` that :func:`mark` sets through ``extra``.
ATTRIBUTE = "tcpbridge_event"

Facts = Mapping[str, str | int | float]


class Event(enum.Enum):
    """A kind of log line; the value is its journal ``MESSAGE_ID``."""

    TUNNEL_OPENED = "e33acb59f1de438990917bdfdf5a5177"
    TUNNEL_CLOSED = "ba665e01949948f086ef673b46e5abf4"
    #: A connection that never became a tunnel: the dial or the upgrade failed, or a cap refused it.
    OPEN_FAILED = "dfa895b00b7d4f6f9245eefc5cd1d5b6"
    RELOAD_APPLIED = "08700012ce1c41de89196455d2091924"
    RELOAD_REJECTED = "98c0559298c94f76bd8523dc57777578"
    #: A resumable tunnel's websocket dropped: it waits for a new one (``resume_timeout``).
    TUNNEL_DETACHED = "1346a024aeeb454c94487054b3d6ccf7"
    #: A new websocket took over a detached tunnel (facts: ``waited_s``, ``bytes_replayed``).
    TUNNEL_RESUMED = "213519d5b06445a6baa69854d5770342"


def mark(event: Event | None, facts: Facts | None = None) -> dict[str, object]:
    """The ``extra=`` of a logging call that writes ``event`` (None: no message id) with ``facts``."""
    return {ATTRIBUTE: (event, dict(facts or {}))}


def read(record: logging.LogRecord) -> tuple[Event | None, Facts]:
    """The event and facts a record was marked with (``(None, {})`` for an unmarked line)."""
    marked = getattr(record, ATTRIBUTE, None)
    if marked is None:
        return None, {}
    event, facts = marked
    return event, facts


def tunnel_facts(label: str, tunnel_id: str, peer: str, destination: str) -> dict[str, str]:
    """The facts every tunnel line carries: the tunnel's name (a frontend tunnel, a backend
    ``listener/route``), its id, the TCP or websocket peer it came from, and where it goes."""
    return {"tunnel": label, "tunnel_id": tunnel_id, "peer": peer, "destination": destination}
