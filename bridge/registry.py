"""The live tunnels of one daemon, its one timer thread (the housekeeper) and its worker threads.

:class:`TunnelRegistry` counts connections from their accept (:class:`Opening`) to their tunnel's
end, runs each tunnel through :meth:`TunnelRegistry.run`, finds a resumable tunnel by its session,
sums what status and metrics show, and drains or aborts everything at shutdown. The housekeeper
wakes every :data:`~bridge.tunnel.HOUSEKEEPING_INTERVAL` seconds for per-tunnel timeouts and due
:class:`Deadline` actions.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from bridge import events, resume
from bridge.events import Event
from bridge.outcome import Kind, Outcome
from bridge.protocol import CloseCode
from bridge.sockets import failed_sockets
from bridge.stats import LiveTunnel, Snapshot, Stats
from bridge.tunnel import HOUSEKEEPING_INTERVAL, Tunnel, reset_on_close
from bridge.workers import WorkerPool

log = logging.getLogger("tcpbridge.tunnel")


def _session_key(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("ascii", "replace")).digest()


@dataclass
class Deadline:
    """An action the housekeeper runs at ``when`` (monotonic) unless cancelled first."""

    when: float
    action: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class Opening:
    """One connection between its accept and its tunnel's registration: a dial in progress.

    Made by :meth:`TunnelRegistry.opening`, and counted from then on, so a drain
    waits for it as for a live tunnel. Enter it (``with``) on the thread that
    dials and then calls :meth:`TunnelRegistry.run`: ``run`` ends it as it
    registers the tunnel, and leaving the block ends it otherwise (the open failed).
    """

    def __init__(self, registry: TunnelRegistry, sock: socket.socket | None) -> None:
        self.registry = registry
        #: The accepted connection: set to reset (not close) at exit when the daemon aborts its tunnels.
        self.sock = sock

    def __enter__(self) -> Opening:
        self.registry.bind_opening(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.registry.end_opening(self)


class TunnelRegistry:
    """The live tunnels of one daemon, its housekeeping thread and its worker threads.

    The housekeeper wakes every :data:`HOUSEKEEPING_INTERVAL` seconds to enforce
    per-tunnel timeouts and run due :class:`Deadline` actions; it is the only
    timer thread a daemon has.

    Connections still opening (:meth:`opening`: accepted, dialling) count
    towards :meth:`wait_idle` like live tunnels. After :meth:`abort_all` nothing
    registers any more: a tunnel that finishes opening then is reset at once.
    """

    def __init__(self) -> None:
        self._tunnels: dict[str, Tunnel] = {}
        #: Resumable tunnels by the SHA-256 of their session id: a lookup's timing says nothing of the id.
        self._sessions: dict[bytes, Tunnel] = {}
        self._opening: set[Opening] = set()
        self._aborted = False  # abort_all ran: the daemon is going away
        self._local = threading.local()  # .opening: the Opening entered on this thread
        self._deadlines: list[Deadline] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_tick = time.monotonic()
        self.total_opened = 0
        #: The daemon's counters (status, metrics); tunnels opening and ending are counted here.
        self.stats = Stats()
        #: The daemon's threads for connections and tunnels (:mod:`bridge.workers`).
        self.workers = WorkerPool()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._housekeep, name="housekeeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.workers.close()

    def add(self, tunnel: Tunnel) -> bool:
        """Register ``tunnel``, ending the calling thread's :class:`Opening`; False after :meth:`abort_all`."""
        opening: Opening | None = getattr(self._local, "opening", None)
        self._local.opening = None
        with self._changed:
            if opening is not None:
                self._opening.discard(opening)
            if self._aborted:
                self._changed.notify_all()
                return False
            self._tunnels[tunnel.id] = tunnel
            if (session_id := tunnel.session_id) is not None:
                self._sessions[_session_key(session_id)] = tunnel
            self.total_opened += 1
            self.stats.tunnel_opened(tunnel.label)
        return True

    def opening(self, sock: socket.socket | None = None) -> Opening:
        """Count a connection being opened (its accepted socket: ``sock``) until its tunnel runs or it fails.

        Use it as ``with registry.opening(client):`` around the dial and :meth:`run`;
        made on the accepting thread, it may be entered on the one that dials.
        """
        opening = Opening(self, sock)
        with self._lock:
            self._opening.add(opening)
            if self._aborted:
                self._reset_at_exit(opening)
        return opening

    def bind_opening(self, opening: Opening) -> None:
        """Make ``opening`` the one :meth:`run` ends on this thread (:meth:`Opening.__enter__`)."""
        self._local.opening = opening

    def end_opening(self, opening: Opening) -> None:
        """``opening`` is over (its tunnel runs, or it failed); idempotent (:meth:`Opening.__exit__`)."""
        if getattr(self._local, "opening", None) is opening:
            self._local.opening = None
        with self._changed:
            if opening in self._opening:
                self._opening.remove(opening)
                self._changed.notify_all()

    def opening_count(self) -> int:
        """How many connections are opening: accepted, not yet running a tunnel."""
        with self._lock:
            return len(self._opening)

    def remove(self, tunnel: Tunnel, outcome: Outcome | None = None) -> None:
        """Forget ``tunnel``; with its ``outcome``, count it as ended (atomically, so byte totals never dip)."""
        with self._changed:
            self._tunnels.pop(tunnel.id, None)
            if (session_id := tunnel.session_id) is not None:
                self._sessions.pop(_session_key(session_id), None)
            if outcome is not None:
                self.stats.tunnel_ended(tunnel.label, outcome, tunnel.bytes_to_ws, tunnel.bytes_to_tcp,
                                        resumed=tunnel.resumes, resume_failure=tunnel.resume_failure)
            self._changed.notify_all()

    def active(self) -> list[Tunnel]:
        with self._lock:
            return list(self._tunnels.values())

    def resumable(self, session_id: str) -> Tunnel | None:
        """The live tunnel whose session id is ``session_id`` (compared in constant time), if any."""
        with self._lock:
            tunnel = self._sessions.get(_session_key(session_id))
        found = tunnel.session_id if tunnel is not None else None
        return tunnel if found is not None and resume.same_session(session_id, found) else None

    def snapshot(self) -> Snapshot:
        """Live tunnels and counters at one instant: a tunnel is either live or counted as ended, never both."""
        now = time.monotonic()
        with self._lock:
            live = tuple(LiveTunnel(t.id, t.label, t.peer, t.destination, now - t.started, t.bytes_to_ws,
                                    t.bytes_to_tcp, t.resume_state, t.resumes) for t in self._tunnels.values())
            labels = self.stats.labels()
        return Snapshot(live, labels, self.stats.reload_counts(), now - self.stats.started_monotonic)

    def wait_idle(self, timeout: float, *, opening: bool = True) -> bool:
        """Wait until no tunnel is live and (with ``opening``) none is opening; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._tunnels or (opening and self._opening):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    def run(self, tunnel: Tunnel) -> Outcome:
        """Run ``tunnel`` to its end on the calling thread, logging its open and close lines.

        Registering it ends the thread's :class:`Opening`. After :meth:`abort_all`
        it is not registered but reset at once (the daemon is going away).
        """
        if not self.add(tunnel):
            log.info("tunnel %s [%s] reset: opened after the daemon started resetting its tunnels: %s -> %s",
                     tunnel.id, tunnel.label, tunnel.peer, tunnel.destination, extra=events.mark(None, tunnel.facts()))
            tunnel.abort(Outcome(Kind.SHUTDOWN, "abort: daemon shutting down"), CloseCode.GOING_AWAY)
            return tunnel.run(self.workers)  # ends at once, releasing both sockets
        log.info("tunnel %s [%s] open: %s -> %s", tunnel.id, tunnel.label, tunnel.peer, tunnel.destination,
                 extra=events.mark(Event.TUNNEL_OPENED, tunnel.facts()))
        outcome = Outcome(Kind.INTERNAL_ERROR, "abort: internal error")
        try:
            outcome = tunnel.run(self.workers)
        finally:
            self.remove(tunnel, outcome)
        duration = time.monotonic() - tunnel.started
        facts = {**tunnel.facts(), "outcome": outcome.kind.value, "outcome_class": outcome.kind.metric_class,
                 "bytes_up": tunnel.bytes_up, "bytes_down": tunnel.bytes_down, "duration_s": duration}
        log.info(
            "tunnel %s [%s] closed (%s): %s sent %d B, received %d B in %.3f s",
            tunnel.id, tunnel.label, outcome, tunnel.tcp_role, tunnel.bytes_to_ws, tunnel.bytes_to_tcp, duration,
            extra=events.mark(Event.TUNNEL_CLOSED, facts),
        )
        return outcome

    def abort_all(self, outcome: Outcome) -> None:
        """Reset every live tunnel with ``outcome`` (close 1001), for good: tunnels opened from now on are reset too.

        Connections still opening are reset when the process exits (their dial
        cannot be interrupted; whatever ends first, nothing of them registers).
        """
        with self._lock:
            self._aborted = True
            tunnels = list(self._tunnels.values())
            for opening in self._opening:
                self._reset_at_exit(opening)
        for tunnel in tunnels:
            tunnel.abort(outcome, CloseCode.GOING_AWAY)

    @staticmethod
    def _reset_at_exit(opening: Opening) -> None:
        if opening.sock is not None:
            reset_on_close(opening.sock)

    def call_at(self, when: float, action: Callable[[], None]) -> Deadline:
        """Run ``action`` on the housekeeper at ``when`` (within a tick); it must not block."""
        deadline = Deadline(when, action)
        with self._lock:
            self._deadlines.append(deadline)
        return deadline

    def _run_due(self, now: float) -> None:
        with self._lock:
            pending = [d for d in self._deadlines if not d.cancelled]
            due = [d for d in pending if d.when <= now]
            self._deadlines = [d for d in pending if d.when > now]
        for deadline in due:
            try:
                deadline.action()
            except Exception:
                log.exception("housekeeper: a deadline action failed")

    @staticmethod
    def _check_sockets(tunnels: list[Tunnel]) -> None:
        """Abort tunnels with a failed socket: one poll() over all of them per round."""
        owners: dict[int, tuple[Tunnel, socket.socket]] = {}
        for tunnel in tunnels:
            for sock in tunnel.watched_sockets():
                with contextlib.suppress(OSError):
                    owners[sock.fileno()] = (tunnel, sock)
        for fd in failed_sockets(sock for _, sock in owners.values()):
            tunnel, sock = owners[fd]
            tunnel.socket_failed(sock)

    def housekeeper_alive(self, within: float) -> bool:
        """Whether the housekeeper finished a round in the last ``within`` seconds (the watchdog's test)."""
        return time.monotonic() - self._last_tick < max(within, 2 * HOUSEKEEPING_INTERVAL)

    def _housekeep(self) -> None:
        while not self._stop.wait(HOUSEKEEPING_INTERVAL):
            now = time.monotonic()
            tunnels = self.active()
            for tunnel in tunnels:
                tunnel.check_timeouts(now)
            self._check_sockets(tunnels)
            self._run_due(now)
            self._last_tick = now
