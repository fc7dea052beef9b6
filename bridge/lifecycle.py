"""The life of one tunnel as a state machine: no sockets, no threads, no clock (the h11 way).

:class:`Lifecycle` holds the state of one tunnel's ending; :class:`bridge.tunnel.Tunnel` feeds it
what its two pump threads and its housekeeper saw, under one lock, and carries out the
:class:`Action` s each event returns, in order, outside the lock. Nothing here blocks or fails.

State: the **up** direction (our TCP side towards the websocket peer) is ``OPEN``, ``ENDING`` (its
end-of-stream marker is being written) or ``ENDED`` (the marker is on the wire); the **down**
direction (the peer towards our TCP side) is ``OPEN`` or ``ENDED`` (its marker came); the
**phase** is ``RUNNING``, ``CLOSING`` (our close 1000 is decided: we still deliver what the peer
sent before it saw it) or ``DONE`` (no more bytes move). ``close_sent``: we decided on a close
frame of ours (a close 1000, or the answer to the peer's). ``detached``: a resumable tunnel's
websocket dropped and it waits for a new one (:mod:`bridge.resume`). ``confirm_marker`` (resumable
tunnels): a clean close also waits until the peer acknowledged our marker (``marker_confirmed``), since
a relay may end the websocket right after our close frame (the inverting proxy's agent echoes it at
once): the peer must then lack nothing of ours. The outcome is set when the end is decided and fixed
once the phase is ``DONE``.

==========================  ====================================  =====================================================
event                       when                                  actions, then state
==========================  ====================================  =====================================================
``tcp_ended``               phase not RUNNING, or up not OPEN     none
                            ``half_close`` off                    as ``close(clean)``
                            detached                              none; up ENDING (``attached`` sends the marker)
                            down ENDED (the last marker), not     SEND_END_OF_STREAM_AND_CLOSE, SHUT_TCP_READ;
                            ``confirm_marker``                    up ENDING, CLOSING, outcome clean
                            otherwise                             SEND_END_OF_STREAM; up ENDING
``end_of_stream_sent``      (after SEND_END_OF_STREAM)            up ENDED; then as ``close(clean)`` if down ENDED
                                                                  and our marker is confirmed (or need not be)
``end_of_stream_received``  down ENDED already, or DONE           none
                            otherwise                             SHUT_TCP_WRITE; down ENDED; then as
                                                                  ``close(clean)`` if up ENDED and our marker is
                                                                  confirmed (or need not be)
``marker_acknowledged``     RUNNING, attached, both ENDED         marker confirmed; as ``close(clean)``
                            otherwise                             marker confirmed; none
``close_received(code)``    code not 1000/1005, no close sent     as ``abort(aborted_by_peer)``, answered with 1000
                            DONE                                  none
                            close sent (the peer's answer)        SHUT_TCP_BOTH; DONE
                            otherwise                             ANSWER_CLOSE, SHUT_TCP_BOTH; DONE, close sent,
                                                                  outcome clean if up not OPEN, else closed_by_peer
``websocket_dropped``       DONE                                  none
                            resumable, detached                   none (the other pump saw the same drop)
                            resumable (RUNNING or CLOSING)        DETACH; detached
                            close sent (the end we asked for)     none
                            otherwise                             as ``abort(websocket_dropped)``
``attached(peer_has_marker)``  DONE, or not detached              none
                            (any of the rows below)               marker confirmed if ``peer_has_marker``
                            CLOSING, up not OPEN, the peer        SEND_END_OF_STREAM_AND_CLOSE; not detached
                            lacks our marker
                            CLOSING otherwise                     SEND_CLOSE (again); not detached, up ENDED
                                                                  unless OPEN
                            up OPEN                               none; not detached
                            up not OPEN, the peer lacks our       SEND_END_OF_STREAM (again; then
                            marker                                ``end_of_stream_sent``); not detached
                            up not OPEN, the peer has it          not detached; as ``end_of_stream_sent``
``close(outcome)``          DONE, or close sent                   none
                            detached (no websocket to close)      as ``abort(websocket_dropped)``, outcome's detail
                            otherwise                             SEND_CLOSE, SHUT_TCP_READ; CLOSING, close sent
``abort(outcome, code)``    DONE                                  none
                            otherwise                             RESET_TCP, SEND_ABORT_CLOSE (unless a close was
                                                                  sent), SHUT_WEBSOCKET; DONE, aborted
==========================  ====================================  =====================================================

``resumable`` is the caller's: the session can take a new websocket, and the peer may lack something
(the tunnel says no once the peer acknowledged our marker and our close is sent, since nothing of ours
can be missing then). A close of ours that went down with its websocket goes again on the next one.

So a close frame of ours is decided at most once per websocket, a clean close never overtakes our own
end-of-stream marker (it waits for ``end_of_stream_sent``, or goes in the same write; a timeout's
close may be decided while the marker is still being written, and the websocket's send lock then
puts it on the wire after the marker), the TCP side is never shut cleanly after an abort (it is
reset), and ``DONE`` is final. A tunnel that ends while detached ends as an abort: whatever the
peer had not received is lost with the websocket, so it must never look clean.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from bridge.outcome import CLEAN, CLOSED_BY_PEER, Kind, Outcome

#: Close codes that end a tunnel deliberately: 1000, and a close frame without a code (1005).
NORMAL_CLOSE_CODES = frozenset({1000, 1005})
#: The close code of an abort's close frame unless the caller gives another (1011, internal error).
ABORT_CODE = 1011


class Up(enum.Enum):
    OPEN = "open"
    ENDING = "ending"
    ENDED = "ended"


class Down(enum.Enum):
    OPEN = "open"
    ENDED = "ended"


class Phase(enum.Enum):
    RUNNING = "running"
    CLOSING = "closing"
    DONE = "done"


class Action(enum.Enum):
    """What the tunnel must do, in the order given."""

    #: Send our end-of-stream marker (then report ``end_of_stream_sent``).
    SEND_END_OF_STREAM = "send end-of-stream"
    #: Send our end-of-stream marker and close 1000 in one write (the last marker of the tunnel).
    SEND_END_OF_STREAM_AND_CLOSE = "send end-of-stream and close"
    #: Send close 1000 without waiting (a close that cannot go now stays pending).
    SEND_CLOSE = "send close"
    #: Answer the peer's close with close 1000, waiting a bounded time for room; reset the websocket if it cannot go.
    ANSWER_CLOSE = "answer close"
    #: Tell the peer with a close frame of the abort's code and the outcome's detail.
    SEND_ABORT_CLOSE = "send abort close"
    SHUT_TCP_READ = "shut TCP read side"
    SHUT_TCP_WRITE = "shut TCP write side"
    SHUT_TCP_BOTH = "shut TCP both sides"
    #: Reset the TCP side (RST, never a FIN: a cut stream must not look complete).
    RESET_TCP = "reset TCP"
    #: Shut the websocket's connection down, waking threads blocked on it.
    SHUT_WEBSOCKET = "shut websocket"
    #: The websocket is gone and the tunnel resumable: let go of it and wait for a new one.
    DETACH = "detach"


@dataclass(frozen=True)
class Step:
    """The actions one event asks for; ``code`` is the close code of a SEND_ABORT_CLOSE."""

    actions: tuple[Action, ...] = ()
    code: int = ABORT_CODE

    def __contains__(self, action: object) -> bool:
        return action in self.actions

    def __add__(self, other: Step) -> Step:
        return Step(self.actions + other.actions, other.code if Action.SEND_ABORT_CLOSE in other else self.code)


NOTHING = Step()


class Lifecycle:
    """The ending of one tunnel (see the module docstring). Not thread-safe: the caller holds a lock."""

    def __init__(self, *, half_close: bool = True) -> None:
        self.half_close = half_close
        self.up = Up.OPEN
        self.down = Down.OPEN
        self.phase = Phase.RUNNING
        self.close_sent = False
        self.aborted = False
        self.detached = False
        #: A resumable tunnel's clean close waits until the peer has our marker (:meth:`marker_acknowledged`).
        self.confirm_marker = False
        self.marker_confirmed = False
        self.outcome: Outcome | None = None

    # -- what the pumps and the housekeeper ask --------------------------------

    @property
    def done(self) -> bool:
        """No more bytes move (the peer's close came, or the tunnel was aborted)."""
        return self.phase is Phase.DONE

    @property
    def running(self) -> bool:
        """Bytes from our TCP side are still wanted (no close decided, not done)."""
        return self.phase is Phase.RUNNING

    @property
    def half_closed(self) -> bool:
        """Exactly one direction has ended (what ``half_close_timeout`` watches)."""
        return (self.up is not Up.OPEN) != (self.down is Down.ENDED)

    # -- events ----------------------------------------------------------------

    def tcp_ended(self) -> Step:
        """Our TCP side sent its FIN (its read returned nothing)."""
        if self.phase is not Phase.RUNNING or self.up is not Up.OPEN:
            return NOTHING
        if not self.half_close:
            return self.close(CLEAN)
        self.up = Up.ENDING  # before the marker leaves: the peer may answer it at once
        if self.detached:
            return NOTHING  # the marker is owed: attached() sends it on the new websocket
        if self.down is Down.ENDED and not self.confirm_marker:
            self._start_closing(CLEAN)
            return Step((Action.SEND_END_OF_STREAM_AND_CLOSE, Action.SHUT_TCP_READ))
        return Step((Action.SEND_END_OF_STREAM,))

    def end_of_stream_sent(self) -> Step:
        """Our marker (from SEND_END_OF_STREAM) is on the wire."""
        self.up = Up.ENDED
        return self.close(CLEAN) if self.down is Down.ENDED and self._peer_has_marker() else NOTHING

    def end_of_stream_received(self) -> Step:
        """The peer's end-of-stream marker arrived."""
        if self.down is Down.ENDED or self.phase is Phase.DONE:
            return NOTHING
        self.down = Down.ENDED
        shut = Step((Action.SHUT_TCP_WRITE,))
        # Our close frame must follow our marker, never overtake it: only once it is on the wire.
        return shut + self.close(CLEAN) if self.up is Up.ENDED and self._peer_has_marker() else shut

    def marker_acknowledged(self) -> Step:
        """The peer acknowledged our end-of-stream marker (resumable tunnels)."""
        self.marker_confirmed = True
        if self.phase is not Phase.RUNNING or self.detached or self.up is not Up.ENDED or self.down is not Down.ENDED:
            return NOTHING
        return self.close(CLEAN)

    def close_received(self, code: int, reason: str = "") -> Step:
        """The peer's close frame arrived (``code`` 1005 when it carried none)."""
        if code not in NORMAL_CLOSE_CODES and not self.close_sent:
            said = f": {reason}" if reason else ""
            return self.abort(Outcome(Kind.ABORTED_BY_PEER, f"abort: peer closed the websocket with {code}{said}"),
                              1000)
        if self.phase is Phase.DONE:
            return NOTHING
        self.phase = Phase.DONE
        if self.close_sent:
            return Step((Action.SHUT_TCP_BOTH,))
        self.close_sent = True
        self.outcome = CLEAN if self.up is not Up.OPEN else CLOSED_BY_PEER
        return Step((Action.ANSWER_CLOSE, Action.SHUT_TCP_BOTH))

    def websocket_dropped(self, outcome: Outcome, *, resumable: bool = False) -> Step:
        """The websocket failed or ended without a close frame; ``outcome`` says how. ``resumable``: the
        tunnel's session can take a new websocket and the peer may lack something, so it detaches
        instead of ending (even after our close: the close goes again on the new websocket)."""
        if self.phase is Phase.DONE:
            return NOTHING
        if resumable:
            if self.detached:
                return NOTHING
            self.detached = True
            return Step((Action.DETACH,))
        if self.close_sent:
            return NOTHING  # after our close frame, a hang-up is the end we asked for
        return self.abort(outcome)

    def attached(self, peer_has_marker: bool) -> Step:
        """A new websocket replaced the dropped one; ``peer_has_marker``: the peer's Resumed says our
        end-of-stream marker reached it. A marker we decided on and the peer lacks goes again, and so
        does our close if we were closing."""
        if self.phase is Phase.DONE or not self.detached:
            return NOTHING
        self.detached = False
        self.marker_confirmed = self.marker_confirmed or peer_has_marker
        if self.phase is Phase.CLOSING:
            if self.up is not Up.OPEN and not peer_has_marker:
                return Step((Action.SEND_END_OF_STREAM_AND_CLOSE,))
            if self.up is Up.ENDING:
                self.up = Up.ENDED
            return Step((Action.SEND_CLOSE,))
        if self.up is Up.OPEN:
            return NOTHING
        if not peer_has_marker:
            self.up = Up.ENDING
            return Step((Action.SEND_END_OF_STREAM,))
        return self.end_of_stream_sent()

    def close(self, outcome: Outcome) -> Step:
        """End gracefully with ``outcome``: close 1000, stop reading TCP; the peer's data still comes."""
        if self.phase is Phase.DONE or self.close_sent:
            return NOTHING
        if self.detached:
            return self.abort(Outcome(Kind.WEBSOCKET_DROPPED, f"abort: websocket dropped and not resumed "
                                                              f"before the end ({outcome.detail})"))
        self._start_closing(outcome)
        return Step((Action.SEND_CLOSE, Action.SHUT_TCP_READ))

    def abort(self, outcome: Outcome, code: int = ABORT_CODE) -> Step:
        """End now with ``outcome``: reset TCP, tell the peer with close ``code`` unless a close went already."""
        if self.phase is Phase.DONE:
            return NOTHING
        self.phase = Phase.DONE
        self.aborted = True
        self.outcome = outcome
        tell = (Action.SEND_ABORT_CLOSE,) if not self.close_sent else ()
        return Step((Action.RESET_TCP, *tell, Action.SHUT_WEBSOCKET), code)

    def _peer_has_marker(self) -> bool:
        return self.marker_confirmed or not self.confirm_marker

    def _start_closing(self, outcome: Outcome) -> None:
        self.phase = Phase.CLOSING
        self.close_sent = True
        self.outcome = outcome
