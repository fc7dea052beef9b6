"""bridge.lifecycle: every transition of the table, every interleaving of the two directions, and
random event sequences (hypothesis) against the invariants. No sockets, no threads."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from bridge.lifecycle import Action, Down, Lifecycle, Phase, Step, Up
from bridge.outcome import CLEAN, CLOSED_BY_PEER, HALF_CLOSE_TIMEOUT, Kind, Outcome

A = Action
RESET = Outcome(Kind.ABORTED_BY_CLIENT, "abort: client reset (connection reset by peer)")
DROPPED = Outcome(Kind.WEBSOCKET_DROPPED, "abort: websocket dropped (connection reset by peer)")
#: Actions that put a close frame of ours on the wire (at most one per tunnel).
CLOSE_FRAMES = {A.SEND_END_OF_STREAM_AND_CLOSE, A.SEND_CLOSE, A.ANSWER_CLOSE, A.SEND_ABORT_CLOSE}
MARKERS = {A.SEND_END_OF_STREAM, A.SEND_END_OF_STREAM_AND_CLOSE}

Event = Callable[[Lifecycle], Step]


def tcp_ended(lc: Lifecycle) -> Step:
    return lc.tcp_ended()


def marker_sent(lc: Lifecycle) -> Step:
    return lc.end_of_stream_sent()


def marker_received(lc: Lifecycle) -> Step:
    return lc.end_of_stream_received()


def close_1000(lc: Lifecycle) -> Step:
    return lc.close_received(1000)


def half_close_timeout(lc: Lifecycle) -> Step:
    """The housekeeper's check: only a half-closed tunnel times out."""
    return lc.close(HALF_CLOSE_TIMEOUT) if lc.half_closed else Step()


TIMEOUTS = {half_close_timeout}


def state(lc: Lifecycle) -> tuple[Up, Down, Phase, bool]:
    return lc.up, lc.down, lc.phase, lc.close_sent


# -- the table, row by row ---------------------------------------------------------------------


def test_a_fin_sends_our_marker_and_the_tunnel_keeps_running() -> None:
    lc = Lifecycle()
    assert lc.tcp_ended().actions == (A.SEND_END_OF_STREAM,)
    assert state(lc) == (Up.ENDING, Down.OPEN, Phase.RUNNING, False)
    assert lc.half_closed and lc.running and lc.outcome is None
    assert lc.end_of_stream_sent() == Step()
    assert lc.up is Up.ENDED


def test_a_fin_without_half_close_closes_the_whole_tunnel() -> None:
    lc = Lifecycle(half_close=False)
    assert lc.tcp_ended().actions == (A.SEND_CLOSE, A.SHUT_TCP_READ)
    assert state(lc) == (Up.OPEN, Down.OPEN, Phase.CLOSING, True) and lc.outcome == CLEAN


def test_the_last_marker_carries_the_close_in_the_same_write() -> None:
    lc = Lifecycle()
    assert lc.end_of_stream_received().actions == (A.SHUT_TCP_WRITE,)
    assert lc.tcp_ended().actions == (A.SEND_END_OF_STREAM_AND_CLOSE, A.SHUT_TCP_READ)
    assert state(lc) == (Up.ENDING, Down.ENDED, Phase.CLOSING, True) and lc.outcome == CLEAN
    assert lc.close_received(1000).actions == (A.SHUT_TCP_BOTH,)  # the peer's answer
    assert lc.done and lc.outcome == CLEAN


def test_our_close_waits_for_our_marker_to_be_on_the_wire() -> None:
    lc = Lifecycle()
    assert lc.tcp_ended().actions == (A.SEND_END_OF_STREAM,)
    assert lc.end_of_stream_received().actions == (A.SHUT_TCP_WRITE,)  # our marker is still being written
    assert lc.end_of_stream_sent().actions == (A.SEND_CLOSE, A.SHUT_TCP_READ)
    assert lc.phase is Phase.CLOSING and lc.outcome == CLEAN


def test_a_marker_after_ours_is_on_the_wire_closes_at_once() -> None:
    lc = Lifecycle()
    lc.tcp_ended()
    lc.end_of_stream_sent()
    assert lc.end_of_stream_received().actions == (A.SHUT_TCP_WRITE, A.SEND_CLOSE, A.SHUT_TCP_READ)


def confirming() -> Lifecycle:
    """A resumable tunnel's lifecycle: its clean close waits for the peer's acknowledgement of our marker."""
    lc = Lifecycle()
    lc.confirm_marker = True
    return lc


def marker_acknowledged(lc: Lifecycle) -> Step:
    return lc.marker_acknowledged()


def test_a_resumable_tunnel_closes_only_once_the_peer_acknowledged_our_marker() -> None:
    lc = confirming()
    assert lc.end_of_stream_received().actions == (A.SHUT_TCP_WRITE,)
    assert lc.tcp_ended().actions == (A.SEND_END_OF_STREAM,)  # not the marker and the close together
    assert lc.end_of_stream_sent() == Step()
    assert state(lc) == (Up.ENDED, Down.ENDED, Phase.RUNNING, False)
    assert lc.marker_acknowledged().actions == (A.SEND_CLOSE, A.SHUT_TCP_READ)
    assert lc.phase is Phase.CLOSING and lc.outcome == CLEAN


def test_a_marker_acknowledged_before_the_peers_marker_closes_when_that_comes() -> None:
    lc = confirming()
    lc.tcp_ended()
    lc.end_of_stream_sent()
    assert lc.marker_acknowledged() == Step()  # the peer still sends
    assert lc.end_of_stream_received().actions == (A.SHUT_TCP_WRITE, A.SEND_CLOSE, A.SHUT_TCP_READ)


def test_an_acknowledgement_while_detached_waits_for_the_new_websocket() -> None:
    lc = confirming()
    lc.end_of_stream_received()
    lc.tcp_ended()
    lc.end_of_stream_sent()
    assert lc.websocket_dropped(DROPPED, resumable=True).actions == (A.DETACH,)
    assert lc.marker_acknowledged() == Step()
    assert lc.attached(peer_has_marker=True).actions == (A.SEND_CLOSE, A.SHUT_TCP_READ)


def test_a_peer_that_says_on_re_attach_it_has_our_marker_lets_us_close() -> None:
    lc = confirming()
    lc.end_of_stream_received()
    lc.tcp_ended()
    lc.end_of_stream_sent()
    lc.websocket_dropped(DROPPED, resumable=True)
    assert lc.attached(peer_has_marker=True).actions == (A.SEND_CLOSE, A.SHUT_TCP_READ)
    assert lc.marker_confirmed


def test_a_second_marker_or_one_after_the_end_does_nothing() -> None:
    lc = Lifecycle()
    lc.end_of_stream_received()
    assert lc.end_of_stream_received() == Step()
    done = Lifecycle()
    done.abort(RESET)
    assert done.end_of_stream_received() == Step()


@pytest.mark.parametrize(("code", "reason", "detail"), [
    (1011, "boom", "abort: peer closed the websocket with 1011: boom"),
    (1001, "", "abort: peer closed the websocket with 1001"),
    (4000, "timeout", "abort: peer closed the websocket with 4000: timeout"),
])
def test_a_close_with_another_code_is_the_peers_abort(code: int, reason: str, detail: str) -> None:
    lc = Lifecycle()
    step = lc.close_received(code, reason)
    assert step.actions == (A.RESET_TCP, A.SEND_ABORT_CLOSE, A.SHUT_WEBSOCKET) and step.code == 1000
    assert lc.outcome == Outcome(Kind.ABORTED_BY_PEER, detail)  # the peer's words only in the detail
    assert lc.done and lc.aborted


@pytest.mark.parametrize("code", [1000, 1005])
def test_a_peers_close_before_we_ended_is_closed_by_peer_and_answered(code: int) -> None:
    lc = Lifecycle()
    assert lc.close_received(code).actions == (A.ANSWER_CLOSE, A.SHUT_TCP_BOTH)
    assert lc.done and lc.close_sent and lc.outcome == CLOSED_BY_PEER


def test_a_peers_close_after_our_marker_is_clean() -> None:
    lc = Lifecycle()
    lc.tcp_ended()
    assert lc.close_received(1000).actions == (A.ANSWER_CLOSE, A.SHUT_TCP_BOTH)
    assert lc.outcome == CLEAN


def test_any_close_answering_ours_ends_it_with_our_outcome() -> None:
    lc = Lifecycle()
    lc.close(HALF_CLOSE_TIMEOUT)
    assert lc.close_received(1011, "late").actions == (A.SHUT_TCP_BOTH,)
    assert lc.done and not lc.aborted and lc.outcome == HALF_CLOSE_TIMEOUT


def test_a_dropped_websocket_is_an_abort_unless_we_closed() -> None:
    lc = Lifecycle()
    assert lc.websocket_dropped(DROPPED).actions == (A.RESET_TCP, A.SEND_ABORT_CLOSE, A.SHUT_WEBSOCKET)
    assert lc.outcome == DROPPED
    closing = Lifecycle()
    closing.close(CLEAN)
    assert closing.websocket_dropped(DROPPED) == Step()
    assert closing.outcome == CLEAN


def test_a_resumable_drop_detaches_once_and_a_new_websocket_resumes() -> None:
    lc = Lifecycle()
    assert lc.websocket_dropped(DROPPED, resumable=True).actions == (A.DETACH,)
    assert lc.detached and lc.running and lc.outcome is None
    assert lc.websocket_dropped(DROPPED, resumable=True) == Step()  # the other pump's report of the same drop
    assert lc.attached(peer_has_marker=False) == Step()  # our direction is open: nothing to send again
    assert not lc.detached and lc.running
    assert lc.attached(peer_has_marker=False) == Step()  # not detached: nothing to do


def test_a_drop_after_our_close_is_resumed_and_the_close_goes_again() -> None:
    """Our close is decided, but the peer may still lack bytes (the tunnel says resumable): the close
    and, if the peer lacks it, our marker go again on the new websocket."""
    closing = Lifecycle(half_close=False)
    closing.tcp_ended()  # without half-close: a close, no marker
    assert closing.websocket_dropped(DROPPED, resumable=True).actions == (A.DETACH,)
    assert closing.detached and closing.phase is Phase.CLOSING
    assert closing.attached(peer_has_marker=False).actions == (A.SEND_CLOSE,)
    both = Lifecycle()
    both.end_of_stream_received()
    both.tcp_ended()  # the last marker went with the close
    both.websocket_dropped(DROPPED, resumable=True)
    assert both.attached(peer_has_marker=False).actions == (A.SEND_END_OF_STREAM_AND_CLOSE,)
    both.websocket_dropped(DROPPED, resumable=True)
    assert both.attached(peer_has_marker=True).actions == (A.SEND_CLOSE,) and both.up is Up.ENDED
    assert both.close_received(1000).actions == (A.SHUT_TCP_BOTH,) and both.outcome == CLEAN


def test_a_drop_after_our_close_that_cannot_resume_is_the_end_we_asked_for() -> None:
    closing = Lifecycle()
    closing.close(CLEAN)
    assert closing.websocket_dropped(DROPPED, resumable=False) == Step()
    assert not closing.detached and closing.outcome == CLEAN
    done = Lifecycle()
    done.close_received(1000)
    assert done.websocket_dropped(DROPPED, resumable=True) == Step() and not done.detached


@pytest.mark.parametrize("sent", [False, True], ids=["marker in flight", "marker on the wire"])
def test_our_marker_goes_again_only_when_the_peer_lacks_it(sent: bool) -> None:
    lc = Lifecycle()
    lc.tcp_ended()
    if sent:
        lc.end_of_stream_sent()
    lc.websocket_dropped(DROPPED, resumable=True)
    assert lc.attached(peer_has_marker=False).actions == (A.SEND_END_OF_STREAM,)
    assert lc.up is Up.ENDING
    assert lc.end_of_stream_sent() == Step() and lc.up is Up.ENDED


def test_a_marker_the_peer_has_counts_as_sent_and_may_close() -> None:
    lc = Lifecycle()
    lc.end_of_stream_received()
    lc.tcp_ended()  # the last marker: it goes with the close in one write, so a drop then is after our close
    fresh = Lifecycle()
    fresh.tcp_ended()  # our marker is being written
    fresh.websocket_dropped(DROPPED, resumable=True)
    assert fresh.attached(peer_has_marker=True) == Step() and fresh.up is Up.ENDED
    both = Lifecycle()
    both.tcp_ended()
    both.websocket_dropped(DROPPED, resumable=True)
    # Impossible while detached in a real tunnel (no websocket to read from); the rule still holds:
    both.detached = False
    both.end_of_stream_received()
    both.detached = True
    assert both.attached(peer_has_marker=True).actions == (A.SEND_CLOSE, A.SHUT_TCP_READ)
    assert both.outcome == CLEAN


@pytest.mark.parametrize("end", ["close", "abort"])
def test_a_tunnel_that_ends_while_detached_ends_as_an_abort(end: str) -> None:
    lc = Lifecycle()
    lc.websocket_dropped(DROPPED, resumable=True)
    step = lc.close(HALF_CLOSE_TIMEOUT) if end == "close" else lc.abort(DROPPED)
    assert A.RESET_TCP in step and lc.aborted and lc.done
    assert lc.outcome is not None and lc.outcome.kind is Kind.WEBSOCKET_DROPPED
    assert lc.attached(peer_has_marker=True) == Step()  # too late: done is final


def test_a_drop_that_cannot_resume_is_an_abort_as_before() -> None:
    lc = Lifecycle()
    lc.websocket_dropped(DROPPED, resumable=True)
    lc.attached(peer_has_marker=False)
    assert A.RESET_TCP in lc.websocket_dropped(DROPPED, resumable=False) and lc.outcome == DROPPED


def test_close_happens_once() -> None:
    lc = Lifecycle()
    assert lc.close(HALF_CLOSE_TIMEOUT).actions == (A.SEND_CLOSE, A.SHUT_TCP_READ)
    assert lc.close(CLEAN) == Step()
    assert lc.outcome == HALF_CLOSE_TIMEOUT and lc.phase is Phase.CLOSING


def test_an_abort_while_closing_resets_without_a_second_close_frame() -> None:
    lc = Lifecycle()
    lc.close(HALF_CLOSE_TIMEOUT)
    step = lc.abort(RESET, 1001)
    assert step.actions == (A.RESET_TCP, A.SHUT_WEBSOCKET)
    assert lc.outcome == RESET and lc.done


def test_done_is_final() -> None:
    lc = Lifecycle()
    lc.abort(RESET, 1001)
    for event in (tcp_ended, marker_received, close_1000, lambda x: x.abort(DROPPED), lambda x: x.close(CLEAN),
                  lambda x: x.websocket_dropped(DROPPED), lambda x: x.close_received(1011)):
        assert event(lc) == Step()
    assert lc.outcome == RESET


# -- every interleaving of the two directions ----------------------------------------------------


def interleavings(a: Sequence[Event], b: Sequence[Event]) -> Iterator[list[Event]]:
    """Every merge of ``a`` and ``b`` that keeps the order within each."""
    for positions in itertools.combinations(range(len(a) + len(b)), len(a)):
        merged: list[Event] = []
        ia, ib = iter(a), iter(b)
        for index in range(len(a) + len(b)):
            merged.append(next(ia) if index in positions else next(ib))
        yield merged


def run(lc: Lifecycle, events: Sequence[Event]) -> list[Action]:
    """Feed ``events``; marker writes are reported when they were asked for. Check the invariants."""
    done: list[Action] = []
    for event in events:
        if event is marker_sent and lc.up is not Up.ENDING:
            continue  # our marker was not being written (a FIN after the end, or none yet)
        before = lc.done
        step = event(lc)
        if before:
            assert step == Step(), "DONE is final"
        if A.SEND_CLOSE in step and event not in TIMEOUTS:
            assert lc.up is not Up.ENDING, "a clean close never overtakes our own marker"
        done.extend(step.actions)
    assert sum(a in CLOSE_FRAMES for a in done) <= 1, done
    assert sum(a in MARKERS for a in done) <= 1, done
    assert done.count(A.SHUT_TCP_WRITE) <= 1, done
    if A.RESET_TCP in done:
        assert lc.aborted and A.SHUT_TCP_WRITE not in done[done.index(A.RESET_TCP):], done
    return done


UP = [tcp_ended, marker_sent]


@pytest.mark.parametrize("events", list(interleavings(UP, [marker_received, close_1000])))
def test_both_directions_ending_in_any_order(events: list[Event]) -> None:
    """Clean once our FIN came before the peer's close (our marker was on its way), else closed by peer."""
    lc = Lifecycle()
    actions = run(lc, events)
    expected = CLEAN if events.index(tcp_ended) < events.index(close_1000) else CLOSED_BY_PEER
    assert lc.outcome == expected, [e.__name__ for e in events]
    assert lc.done
    assert sum(a in CLOSE_FRAMES for a in actions) == 1


@pytest.mark.parametrize("events", [
    *interleavings([*UP, marker_acknowledged], [marker_received]),
    # the reader may take the acknowledgement before the sender reports its marker written
    *interleavings([tcp_ended, marker_acknowledged, marker_sent], [marker_received])])
def test_a_resumable_tunnel_closes_clean_once_in_any_order(events: list[Event]) -> None:
    """Whatever the order of our marker, the peer's acknowledgement of it and the peer's marker, one clean
    close, decided only once all three happened."""
    lc = confirming()
    actions = run(lc, events)
    assert sum(a in CLOSE_FRAMES for a in actions) == 1
    assert lc.close_sent and lc.outcome == CLEAN
    assert lc.up is Up.ENDED and lc.down is Down.ENDED and lc.marker_confirmed


@pytest.mark.parametrize("events", list(interleavings(UP, [close_1000])))
def test_a_peer_that_only_closes_ends_clean_or_closed_by_peer(events: list[Event]) -> None:
    lc = Lifecycle()
    run(lc, events)
    expected = CLOSED_BY_PEER if events[0] is close_1000 else CLEAN
    assert lc.outcome == expected and lc.done


@pytest.mark.parametrize("abort_at", range(5))
@pytest.mark.parametrize("events", list(interleavings(UP, [marker_received, close_1000])))
def test_an_abort_anywhere_is_final_and_resets(events: list[Event], abort_at: int) -> None:
    lc = Lifecycle()
    sequence = [*events[:abort_at], lambda x: x.abort(RESET), *events[abort_at:]]
    actions = run(lc, sequence)
    if lc.aborted:
        assert lc.outcome == RESET and A.RESET_TCP in actions
    else:  # the tunnel had ended before the abort came
        assert lc.outcome in (CLEAN, CLOSED_BY_PEER) and A.RESET_TCP not in actions


@pytest.mark.parametrize("timeout_at", range(5))
@pytest.mark.parametrize("events", list(interleavings(UP, [marker_received, close_1000])))
def test_a_half_close_timeout_anywhere_never_sends_a_second_close(events: list[Event], timeout_at: int) -> None:
    lc = Lifecycle()
    sequence = [*events[:timeout_at], half_close_timeout, *events[timeout_at:]]
    run(lc, sequence)
    assert lc.outcome in (CLEAN, CLOSED_BY_PEER, HALF_CLOSE_TIMEOUT)


# -- random sequences --------------------------------------------------------------------------


class Sequences(RuleBasedStateMachine):
    """Any order of any events, as three threads might produce them, against the invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.lc = Lifecycle()
        self.actions: list[Action] = []
        self.final: Outcome | None = None
        self.markers_lost = 0  # markers sent again after a re-attach (the first went down with its websocket)
        self.closes_lost = 0  # close frames sent again after a re-attach

    def feed(self, event: Callable[[Lifecycle], Step]) -> None:
        was_done = self.lc.done
        step = event(self.lc)
        if was_done:
            assert step == Step(), "DONE is final"
        self.actions.extend(step.actions)
        if self.lc.done:
            if self.final is None:
                self.final = self.lc.outcome
            assert self.lc.outcome == self.final, "the outcome is fixed once done"

    @rule()
    def fin(self) -> None:
        self.feed(Lifecycle.tcp_ended)

    @rule()
    def marker_written(self) -> None:
        if self.lc.up is Up.ENDING and Action.SEND_END_OF_STREAM in self.actions:
            self.feed(Lifecycle.end_of_stream_sent)

    @rule()
    def marker(self) -> None:
        if not self.lc.detached:  # nothing arrives without a websocket
            self.feed(Lifecycle.end_of_stream_received)

    @rule(code=st.sampled_from([1000, 1005, 1001, 1002, 1011, 4000]), reason=st.sampled_from(["", "timeout", "x"]))
    def peer_close(self, code: int, reason: str) -> None:
        if not self.lc.detached:
            self.feed(lambda lc: lc.close_received(code, reason))

    @rule()
    def dropped_resumable(self) -> None:
        self.feed(lambda lc: lc.websocket_dropped(DROPPED, resumable=True))

    @rule(peer_has_marker=st.booleans())
    def attached(self, peer_has_marker: bool) -> None:
        markers_before = sum(a in MARKERS for a in self.actions)
        closes_before = sum(a in CLOSE_FRAMES for a in self.actions)
        self.feed(lambda lc: lc.attached(peer_has_marker))
        self.markers_lost += sum(a in MARKERS for a in self.actions) - markers_before
        self.closes_lost += sum(a in CLOSE_FRAMES for a in self.actions) - closes_before

    @rule()
    def dropped(self) -> None:
        self.feed(lambda lc: lc.websocket_dropped(DROPPED))

    @rule(outcome=st.sampled_from([HALF_CLOSE_TIMEOUT, CLEAN]))
    def close(self, outcome: Outcome) -> None:
        self.feed(lambda lc: lc.close(outcome))

    @rule(code=st.sampled_from([1001, 1011]))
    def abort(self, code: int) -> None:
        self.feed(lambda lc: lc.abort(RESET, code))

    @invariant()
    def one_close_frame_one_marker(self) -> None:
        assert sum(a in CLOSE_FRAMES for a in self.actions) <= 1 + self.closes_lost, self.actions
        assert sum(a in MARKERS for a in self.actions) <= 1 + self.markers_lost, self.actions
        assert self.actions.count(A.SHUT_TCP_WRITE) <= 1

    @invariant()
    def a_reset_is_an_abort(self) -> None:
        assert (A.RESET_TCP in self.actions) == self.lc.aborted
        if self.lc.aborted:
            assert self.lc.done and self.lc.outcome is not None

    @invariant()
    def a_tunnel_that_ends_detached_ends_as_an_abort(self) -> None:
        if self.lc.detached and self.lc.done:
            assert self.lc.aborted
        if self.closes_lost:
            assert self.lc.close_sent  # a close goes again only where one was decided

    @invariant()
    def a_decided_end_has_an_outcome(self) -> None:
        assert (self.lc.phase is Phase.RUNNING) == (self.lc.outcome is None)
        assert self.lc.close_sent <= (self.lc.phase is not Phase.RUNNING)


TestSequences = Sequences.TestCase
TestSequences.settings = settings(max_examples=300, stateful_step_count=12, deadline=None)
