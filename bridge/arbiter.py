"""The main process of a daemon with ``workers: N`` (N > 1), shaped like gunicorn's ``arbiter.py``.

Python threads of one process share one GIL: a daemon whose tunnels are busy with many small
messages spends its time handing the GIL between threads on different CPUs. With ``workers``,
the daemon is N forked worker processes, each a complete thread-based daemon (:class:`Service`
with its own registry and tunnels), optionally pinned to one CPU, and this main process, which:

* binds every listening port once per worker (``SO_REUSEPORT``, :func:`bridge.listen.bind_slots`)
  before forking, so bind errors are reported here, all or none, with the usual messages; the
  kernel spreads new connections over the workers' sockets. Main keeps its copies: connections
  that arrive for a worker that died wait in its socket's queue for its replacement;
* alone talks to systemd (``READY``, ``STATUS``, ``STOPPING``, ``WATCHDOG``; workers get no
  ``NOTIFY_SOCKET``; with ``WatchdogSec``, a worker that makes no progress for that long is killed
  and replaced, instead of systemd restarting the whole daemon), and answers the control socket
  and the metrics endpoint with the sum over the workers (their snapshots, fetched over a private
  socket pair: :class:`Link`, plus the counters of workers that died, so totals never go down);
* owns the signals: SIGTERM/SIGINT/SIGQUIT are passed on to every worker, whose own
  :class:`Service` drains or resets exactly as a single-process daemon does (a second
  SIGTERM passed on ends a drain); SIGCHLD reaps a worker that died and restarts it, at once the
  first time, backing off up to 10 s when one keeps dying. Workers run in their own process group
  so a terminal's Ctrl-C reaches main only, and die with main (``PR_SET_PDEATHSIG``).
* reloads on SIGHUP as one process does: it validates the file and binds new or moved ports
  first (a bad file or a port in use rejects the reload before any worker hears of it), then hands
  each worker the configuration and its new sockets (SCM_RIGHTS over the link); each applies it as
  a single-process daemon would. A worker that cannot is replaced from the new configuration.

Workers are forked, not spawned: they inherit the sockets and the configuration, and a restart
takes milliseconds. Forks happen only on the main thread; the other threads of main (control
socket, metrics) touch nothing a child uses.

Why this module is over 450 lines: like gunicorn's, the main process is one readable place, since
its signals, its workers, systemd and the reload fan-out each change what the others must do.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import signal
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from bridge import events
from bridge.caps import Counts, SharedCounts
from bridge.config import Address, Config, ConfigError
from bridge.events import Event
from bridge.handoff import Handoff, TakesHandoff, socket_pairs
from bridge.listen import Binder, ListenError, bind_slots
from bridge.registry import TunnelRegistry
from bridge.service import (
    DRAIN_POLL,
    RESET_WAIT,
    Daemon,
    Endpoint,
    Service,
    SignalQueue,
    StatusView,
    adopt,
    bind_endpoints,
    notify_reloading,
    raise_open_files_limit,
    sd_notify,
    set_log_level,
    setup_logging,
    watchdog_interval,
)
from bridge.stats import LabelStats, Snapshot, merge, retire

log = logging.getLogger("tcpbridge")

#: A worker that has not said it is serving this long after its fork is killed (at start: the daemon fails).
BOOT_TIMEOUT = 15.0
#: How long main waits for a worker's answer to a snapshot request; its last one is used after that.
LINK_TIMEOUT = 1.0
#: A worker that dies this many times within DEATH_WINDOW seconds is restarted with a growing delay.
DEATHS_BEFORE_BACKOFF = 3
DEATH_WINDOW = 60.0
MAX_BACKOFF = 10.0
#: Exit status of a worker that could not start (its reason went over the link).
WORKER_FAILED = 3
PR_SET_PDEATHSIG = 1
#: How long a worker gets to apply a reload before main gives up on it and replaces it.
RELOAD_TIMEOUT = 10.0
#: Most descriptors one link message carries (new listeners in one reload).
MAX_FDS = 1024



class DaemonClass(Protocol):
    """The frontend or backend class: builds a daemon, and says which ports a configuration listens on."""

    def __call__(self, config: Any, registry: TunnelRegistry, binder: Binder = ..., counts: Counts | None = ...,
                 /) -> Daemon: ...
    def listening(self, config: Any, /) -> list[tuple[str, Address, str]]: ...


class LinkClosed(Exception):
    """The other end of a :class:`Link` went away, or did not answer in time."""


class Link:
    """Messages between main and one worker: length-prefixed pickles over a private socket pair.

    Both ends run the same forked code and nothing else can reach the pair, so pickle is safe.
    Main sends requests; a worker sends ``("ready",)`` or ``("failed", text)`` once, unasked.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.fds: list[int] = []  # descriptors that came with the last message received

    def send(self, message: object, fds: Sequence[int] = ()) -> None:
        """Send ``message``, and ``fds`` with it (SCM_RIGHTS: the receiver gets its own copies)."""
        body = pickle.dumps(message)
        data = struct.pack("!I", len(body)) + body
        sent = socket.send_fds(self.sock, [data], list(fds)) if fds else 0
        self.sock.sendall(data[sent:])

    def recv(self, timeout: float | None) -> Any:
        self.sock.settimeout(timeout)
        try:
            header, fds, _, _ = socket.recv_fds(self.sock, 4, MAX_FDS)
            self.fds = fds
            if not header:
                raise EOFError("link closed")
            (size,) = struct.unpack("!I", header + self._exactly(4 - len(header)))
            return pickle.loads(self._exactly(size))
        except (OSError, EOFError, struct.error, pickle.UnpicklingError) as exc:
            raise LinkClosed(str(exc) or type(exc).__name__) from None

    def request(self, message: object, timeout: float, fds: Sequence[int] = ()) -> Any:
        """Send ``message`` and return the answer; LinkClosed if there is none within ``timeout``."""
        if not self.lock.acquire(timeout=timeout):
            raise LinkClosed("another request is still waiting for this worker")
        try:
            self.send(message, fds)
            return self.recv(timeout)
        except OSError as exc:
            raise LinkClosed(str(exc)) from None
        finally:
            self.lock.release()

    def close(self) -> None:
        self.sock.close()

    def _exactly(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError("link closed")
            data += chunk
        return bytes(data)


@dataclass
class Worker:
    """Main's record of one worker slot: the process serving it now, and its history."""

    slot: int
    cpu: int | None
    pid: int = 0
    link: Link | None = None
    ready: bool = False
    restarts: int = 0
    deaths: list[float] = field(default_factory=list)
    restart_at: float | None = None  # when a dead worker is due to be forked again
    last: Snapshot | None = None  # its last answer, shown while it does not answer
    progress: float = 0.0  # when it last answered with its housekeeper ticking (the watchdog's test)
    view: tuple[list[dict[str, Any]], str] = ([], "")  # its listeners and one-line description

    def describe(self) -> dict[str, Any]:
        state = "serving" if self.ready else ("restarting" if self.restart_at is not None else "starting")
        return {"slot": self.slot, "pid": self.pid or None, "cpu": self.cpu, "state": state,
                "restarts": self.restarts, "active": len(self.last.live) if self.last else 0}


def backoff(deaths: list[float], now: float) -> float:
    """Seconds to wait before restarting a worker that died at ``deaths`` (most recent last)."""
    recent = [t for t in deaths if now - t < DEATH_WINDOW]
    if len(recent) < DEATHS_BEFORE_BACKOFF:
        return 0.0
    return float(min(MAX_BACKOFF, 0.5 * 2.0 ** (len(recent) - DEATHS_BEFORE_BACKOFF)))


class Arbiter:
    """Runs a daemon as ``len(cpus)`` worker processes; see the module docstring."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD)

    def __init__(self, daemon_class: DaemonClass, *, name: str, load: Callable[[], Config],
                 log_level_flag: str | None, cpus: list[int | None]) -> None:
        self.daemon_class = daemon_class
        self.name = name
        self.load = load
        self.log_level_flag = log_level_flag
        self.workers = [Worker(slot, cpu) for slot, cpu in enumerate(cpus)]
        self.counts = SharedCounts(len(cpus))  # the caps' counts, one column per worker slot
        self.signals = SignalQueue()
        #: One handoff socket pair per worker slot (made in run): see bridge.handoff.
        self._handoffs: list[tuple[socket.socket, socket.socket]] = []
        self.slots: dict[str, list[socket.socket]] = {}  # listener name -> one socket per worker slot
        self.addresses: dict[str, Address] = {}  # what each slot set is bound to
        self.config: Config | None = None
        self.retired: dict[str, LabelStats] = {}  # counters of workers that ended
        self.ended_cpu = 0.0  # their CPU seconds (wait4's rusage)
        self.reloads = {"ok": 0, "failed": 0}
        self.started = time.monotonic()
        self.view = StatusView(name, self.snapshot, self._listeners, self._describe, lambda: self.config)
        self._endpoints: list[Endpoint] = []
        self._endpoint_fds: list[int] = []
        self._watchdog_interval = watchdog_interval()
        self._stopping = False
        self._lock = threading.Lock()  # a worker's link and last snapshot change together

    # -- running ---------------------------------------------------------------------------

    def run(self, config: Config) -> int:
        """Bind, fork the workers, serve until SIGTERM/SIGINT/SIGQUIT; the exit status. ListenError propagates."""
        raise_open_files_limit()
        self.config = config
        self._bind_slots(config)
        self._bind_endpoints(config)
        self._handoffs = socket_pairs(len(self.workers))
        self.signals.install(self.SIGNALS)
        try:
            for worker in self.workers:
                self._spawn(worker)
            failure = self._wait_ready(time.monotonic() + BOOT_TIMEOUT)
            if failure:
                log.error("%s: %s", self.name, failure)
                self._kill_all()
                return 1
            for endpoint in self._endpoints:
                endpoint.start()
            sd_notify(f"READY=1\nSTATUS={self.status()}")
            log.info("%s ready: %s", self.name, self._describe())
            while True:
                signum = self.signals.next(timeout=self._tick())
                if signum == signal.SIGCHLD:
                    self._reap()
                elif signum in Service.STOP_SIGNALS:
                    return self._stop(signum)
                elif signum == signal.SIGHUP:
                    self._reload()
        finally:
            self._kill_all()
            for endpoint in self._endpoints:
                endpoint.stop()
            self.signals.restore()

    def _bind_slots(self, config: Config) -> None:
        try:
            for name, address, what in self.daemon_class.listening(config):
                self.slots[name] = bind_slots(address, what, len(self.workers))
                self.addresses[name] = address
        except ListenError:
            self._close_slots()
            raise

    def _close_slots(self) -> None:
        for sockets in self.slots.values():
            for sock in sockets:
                sock.close()
        self.slots.clear()

    def _bind_endpoints(self, config: Config) -> None:
        before = set(_open_fds())
        self._endpoints = bind_endpoints(config, self.name, self.status_document, self.snapshot, self._known_labels,
                                         (self._pids, lambda: self.ended_cpu))
        self._endpoint_fds = sorted(set(_open_fds()) - before)  # closed in every worker

    # -- workers -----------------------------------------------------------------------------

    def _spawn(self, worker: Worker) -> None:
        assert self.config is not None
        ours, theirs = socket.socketpair()
        config = self.config
        pid = os.fork()
        if pid == 0:
            ours.close()
            self._child(worker, config, Link(theirs))
        theirs.close()
        worker.pid, worker.link, worker.ready = pid, Link(ours), False
        worker.restart_at, worker.last, worker.progress = None, None, time.monotonic()

    def _child(self, worker: Worker, config: Config, link: Link) -> NoReturn:
        """The worker process: drop what is main's, then serve as a plain daemon until told to stop."""
        status = WORKER_FAILED
        try:
            _die_with_parent(os.getppid())
            os.setpgid(0, 0)  # a terminal's Ctrl-C goes to main, which passes it on once
            for signum in self.SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            self._drop_main_resources(worker, link)
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(key, None)
            setup_logging(self.log_level_flag or config.log_level, tag=f"w{worker.slot} ", target=config.log_target,
                          identifier=self.name)
            pin(worker.cpu)
            binder = _Inherited({name: sockets[worker.slot] for name, sockets in self.slots.items()})
            registry = TunnelRegistry()
            self.counts.use_slot(worker.slot)
            daemon = self.daemon_class(config, registry, binder, self.counts)
            if isinstance(daemon, TakesHandoff):
                receiver = self._handoffs[worker.slot][0]
                daemon.use_handoff(Handoff(worker.slot, receiver, [sender for _, sender in self._handoffs]))
            reloads = _Reloads(binder)
            service = Service(daemon, registry, name=self.name, load=reloads.take, log_level_flag=self.log_level_flag,
                              on_ready=lambda: link.send(("ready",)), on_reloaded=reloads.finished)
            reloads.signals = service.signals
            threading.Thread(target=_answer, args=(link, registry, daemon, reloads), name="arbiter-link",
                             daemon=True).start()
            status = service.run(config)
        except BaseException as exc:  # whatever it was, main must hear it and the child must exit
            with contextlib.suppress(Exception):
                log.error("worker %d could not run: %s", worker.slot, _reason(exc))
                link.send(("failed", _reason(exc)))
        finally:
            with contextlib.suppress(Exception):
                logging.shutdown()
            os._exit(status)

    def _drop_main_resources(self, worker: Worker, link: Link) -> None:
        """Close, in a new worker, every descriptor that is main's: other workers' slots and links, the endpoints."""
        for sockets in self.slots.values():
            for slot, sock in enumerate(sockets):
                if slot != worker.slot:
                    sock.close()
        for slot, (receiver, _) in enumerate(self._handoffs):
            if slot != worker.slot:
                receiver.close()
        for other in self.workers:
            if other.link is not None:
                other.link.close()
        for fd in self._endpoint_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.signals.close()

    def _wait_ready(self, deadline: float) -> str | None:
        """Wait until every worker said it serves; the reason if one failed or timed out first."""
        for worker in self.workers:
            assert worker.link is not None
            message = _boot_message(worker.link, max(0.0, deadline - time.monotonic()))
            if message[0] != "ready":
                return f"worker {worker.slot} (pid {worker.pid}) could not start: {message[1]}"
            worker.ready = True
        return None

    def _reap(self) -> None:
        """Collect every worker that exited; schedule its restart unless the daemon is stopping."""
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.ended_cpu += usage.ru_utime + usage.ru_stime
            worker = next((w for w in self.workers if w.pid == pid), None)
            if worker is None:
                continue
            self._retire(worker)
            if self._stopping:
                continue
            now = time.monotonic()
            worker.deaths = [t for t in worker.deaths if now - t < DEATH_WINDOW] + [now]
            delay = backoff(worker.deaths, now)
            worker.restart_at = now + delay
            log.warning("%s: worker %d (pid %d) %s; its tunnels are lost, restarting it%s", self.name, worker.slot,
                        pid, _exit_reason(status), f" in {delay:g} s" if delay else "")

    def _retire(self, worker: Worker) -> None:
        with self._lock:
            if worker.last is not None:
                retire(self.retired, worker.last)
            self.counts.clear_slot(worker.slot)  # its connections died with it
            if worker.link is not None:
                worker.link.close()
            worker.pid, worker.link, worker.ready, worker.last = 0, None, False, None

    def _restart_due(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.restart_at is not None and worker.restart_at <= now and not self._stopping:
                worker.restarts += 1
                try:
                    self._spawn(worker)
                except OSError as exc:  # EAGAIN/ENOMEM: out of processes or memory; try again later
                    worker.deaths.append(now)
                    worker.restart_at = now + max(1.0, backoff(worker.deaths, now))
                    log.error("%s: cannot fork worker %d: %s; retrying in %g s", self.name, worker.slot,
                              exc.strerror or exc, worker.restart_at - now)
                    continue
                self._await_one(worker)

    def _await_one(self, worker: Worker) -> None:
        assert worker.link is not None
        message = _boot_message(worker.link, BOOT_TIMEOUT)
        if message[0] == "ready":
            worker.ready = True
            log.info("%s: worker %d restarted as pid %d", self.name, worker.slot, worker.pid)
        else:
            log.error("%s: worker %d (pid %d) could not start: %s", self.name, worker.slot, worker.pid, message[1])
            with contextlib.suppress(OSError):
                os.kill(worker.pid, signal.SIGKILL)

    def _kill_all(self) -> None:
        for worker in self.workers:
            if worker.pid:
                with contextlib.suppress(OSError):
                    os.kill(worker.pid, signal.SIGKILL)
        for worker in self.workers:
            if worker.pid:
                with contextlib.suppress(ChildProcessError):
                    _, _, usage = os.wait4(worker.pid, 0)
                    self.ended_cpu += usage.ru_utime + usage.ru_stime
                self._retire(worker)

    def _live(self) -> list[Worker]:
        return [w for w in self.workers if w.pid]

    def _pids(self) -> list[int]:
        """This process and its live workers (main first), for the summed process metrics."""
        return [os.getpid(), *(w.pid for w in self.workers if w.pid)]

    # -- status --------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Every worker's counters and live tunnels, summed, plus those of the workers that died."""
        for worker in self.workers:
            link = worker.link
            if link is None or not worker.ready:
                continue
            try:
                last, listeners, describe, ticking = link.request(("snapshot",), LINK_TIMEOUT)
            except LinkClosed:
                continue  # dead or stuck: its last answer stands until SIGCHLD retires it
            with self._lock:
                if worker.link is link:  # not retired meanwhile
                    worker.last, worker.view = last, (listeners, describe)
                    if ticking:
                        worker.progress = time.monotonic()
        with self._lock:
            parts = [w.last for w in self.workers if w.last is not None]
            return merge(parts, self.retired, self.reloads, time.monotonic() - self.started)

    def status(self) -> str:
        return self.view.summary(self.snapshot())

    def status_document(self, request: str = "status") -> dict[str, Any]:
        return self.view.document(request, lambda: {"workers": [w.describe() for w in self.workers]})

    def _listeners(self) -> list[dict[str, Any]]:
        return next((w.view[0] for w in self.workers if w.view[0]), [])

    def _describe(self) -> str:
        serving = sum(1 for w in self.workers if w.ready)
        return f"{len(self.slots)} listeners, {serving} of {len(self.workers)} workers"

    def _known_labels(self) -> list[str]:
        return [label for listener in self._listeners() for label in listener["labels"]]

    def _tick(self) -> float:
        """Restart workers that are due, send STATUS= when it changed, ping the watchdog; the next delay."""
        self._restart_due()
        self.view.notify_status()
        if self._watchdog_interval is None:
            return 1.0
        sd_notify("WATCHDOG=1")  # this loop runs; a stuck worker is replaced instead of the whole daemon
        self._replace_stuck(2 * self._watchdog_interval)
        return min(1.0, self._watchdog_interval)

    def _replace_stuck(self, limit: float) -> None:
        """SIGKILL every worker that has not made progress for ``limit`` seconds (systemd's WatchdogSec)."""
        now = time.monotonic()
        for worker in self.workers:
            if worker.ready and now - worker.progress > limit:
                log.error("%s: worker %d (pid %d) stuck: no progress for %.1f s (WatchdogSec): killing it",
                          self.name, worker.slot, worker.pid, now - worker.progress)
                worker.ready = False  # asked no more; SIGCHLD retires and restarts it
                with contextlib.suppress(OSError):
                    os.kill(worker.pid, signal.SIGKILL)

    # -- reload and stop -----------------------------------------------------------------------

    def _reload(self) -> None:
        """SIGHUP: validate and bind here, then have every worker apply the new configuration.

        As for one process: an invalid file or a port that cannot be bound rejects the reload
        before any worker hears of it. Each worker gets the configuration and its sockets for new
        or moved listeners, and applies them as a single-process daemon does; a worker that fails
        or does not answer is replaced, and its replacement starts from the new configuration.
        """
        assert self.config is not None
        notify_reloading()
        try:
            config = adopt(self.config, self.load())
            fresh = self._bind_changed(config)
        except ConfigError as exc:
            self._rejected(exc.problems)
        except ListenError as exc:
            self._rejected([str(exc)])
        else:
            self._apply(config, fresh)
        sd_notify(f"READY=1\nSTATUS={self.status()}")

    def _bind_changed(self, config: Config) -> dict[str, list[socket.socket]]:
        """Slots for the listeners of ``config`` that are new or moved, all or none (ListenError)."""
        fresh: dict[str, list[socket.socket]] = {}
        try:
            for name, address, what in self.daemon_class.listening(config):
                if self.addresses.get(name) != address:
                    fresh[name] = bind_slots(address, what, len(self.workers))
        except ListenError:
            for sockets in fresh.values():
                for sock in sockets:
                    sock.close()
            raise
        return fresh

    def _apply(self, config: Config, fresh: dict[str, list[socket.socket]]) -> None:
        answers: list[tuple[Worker, bool, list[str]]] = []
        for worker in self.workers:
            link = worker.link
            if link is None or not worker.ready:
                continue  # being restarted: it will start from the new configuration
            column = [fresh[name][worker.slot].fileno() for name in fresh]
            try:
                ok, changes = link.request(("reload", config, list(fresh)), RELOAD_TIMEOUT, column)
            except LinkClosed as exc:
                ok, changes = False, [f"no answer ({exc})"]
            answers.append((worker, ok, changes))
        if answers and not any(ok for _, ok, _ in answers):
            for sockets in fresh.values():
                for sock in sockets:
                    sock.close()
            self._rejected(answers[0][2])
            return
        listening = {name: address for name, address, _ in self.daemon_class.listening(config)}
        for name in [n for n in self.slots if n not in listening or n in fresh]:
            for sock in self.slots.pop(name):  # the workers closed theirs when they stopped it
                sock.close()
        self.slots.update(fresh)
        self.addresses = listening
        self.config = config
        self.reloads["ok"] += 1
        set_log_level(self.log_level_flag or config.log_level)
        for worker, ok, changes in answers:
            if not ok:
                log.error("%s: worker %d (pid %d) could not apply the reload (%s): replacing it", self.name,
                          worker.slot, worker.pid, "; ".join(changes))
                with contextlib.suppress(OSError):
                    os.kill(worker.pid, signal.SIGKILL)
        changes = next((changes for _, ok, changes in answers if ok), [])
        log.info("reload of %s done in %d workers: %s", config.source, len(answers),
                 "; ".join(changes) if changes else "no changes", extra=events.mark(Event.RELOAD_APPLIED))

    def _rejected(self, problems: list[str]) -> None:
        self.reloads["failed"] += 1
        for problem in problems:
            log.error("reload rejected, still running the previous configuration: %s", problem,
                      extra=events.mark(Event.RELOAD_REJECTED))

    def _stop(self, signum: int) -> int:
        """Pass ``signum`` on to every worker, then wait for them all to exit, passing on what follows."""
        assert self.config is not None
        sd_notify("STOPPING=1")
        self._stopping = True
        started = time.monotonic()
        log.info("%s: %s received; passing it on to %d workers", self.name, signal.Signals(signum).name,
                 len(self._live()))
        self._relay(signum)
        deadline = started + self.config.drain_timeout + RESET_WAIT + 5.0
        next_tick = time.monotonic()
        while self._live():
            now = time.monotonic()
            if now >= deadline:
                log.warning("%s: workers still running %.0f s after %s: killing them", self.name, now - started,
                            signal.Signals(signum).name)
                self._kill_all()
                break
            if now >= next_tick:
                next_tick = now + self._tick()
            received = self.signals.next(timeout=max(0.0, min(DRAIN_POLL, next_tick - now)))
            if received in Service.STOP_SIGNALS:
                self._relay(received)  # a second SIGTERM ends the workers' drains; SIGQUIT resets
            elif received == signal.SIGHUP:
                log.info("%s: SIGHUP during the drain: ignored (the daemon is stopping)", self.name)
            self._reap()  # on SIGCHLD, and at every poll: a worker's exit is what this loop waits for
        self._close_slots()
        log.info("%s stopped after %.1f s", self.name, time.monotonic() - started)
        return 0

    def _relay(self, signum: int) -> None:
        for worker in self._live():
            with contextlib.suppress(OSError):
                os.kill(worker.pid, signum)


class _Inherited:
    """The :data:`Binder` of a worker: the sockets main bound for it, by tunnel or listener name."""

    def __init__(self, sockets: dict[str, socket.socket]) -> None:
        self.sockets = dict(sockets)

    def __call__(self, name: str, address: Address, what: str) -> socket.socket:
        try:
            return self.sockets.pop(name)
        except KeyError:
            raise ListenError(f"{what}: cannot listen on {address}: a worker process cannot bind new ports "
                              "(restart the daemon)") from None


class _Reloads:
    """A worker's reloads: main hands over a configuration (and sockets); the worker's own
    :class:`Service` applies it on its main thread, as a SIGHUP, and the answer goes back to main."""

    def __init__(self, binder: _Inherited) -> None:
        self.binder = binder
        self.signals: SignalQueue | None = None
        self._pending: Config | None = None
        self._done = threading.Event()
        self._result: tuple[bool, list[str]] = (False, [])

    def request(self, config: Config, sockets: dict[str, socket.socket]) -> tuple[bool, list[str]]:
        """Apply ``config`` (from the link thread); whether it applied, and its changes or problems."""
        assert self.signals is not None
        self.binder.sockets.update(sockets)
        self._pending = config
        self._done.clear()
        self.signals.post(signal.SIGHUP)
        if not self._done.wait(RELOAD_TIMEOUT):
            return False, [f"not applied within {RELOAD_TIMEOUT:g} s"]
        for name in sockets:  # those a rejected reload did not take
            leftover = self.binder.sockets.pop(name, None)
            if leftover is not None:
                leftover.close()
        return self._result

    def take(self) -> Config:
        """The configuration to reload (the Service's ``load``)."""
        config, self._pending = self._pending, None
        if config is None:
            raise ConfigError(["a worker reloads when its main process tells it to: send SIGHUP to the main "
                               "process (systemctl reload)"])
        return config

    def finished(self, ok: bool, changes: list[str]) -> None:
        self._result = (ok, changes)
        self._done.set()


def _answer(link: Link, registry: TunnelRegistry, daemon: Daemon, reloads: _Reloads) -> None:
    """A worker's link thread: answer main's requests until the link closes (main is gone)."""
    while True:
        try:
            request = link.recv(None)
        except LinkClosed:
            return
        if request == ("snapshot",):
            link.send((registry.snapshot(), daemon.listeners(), daemon.describe(), registry.housekeeper_alive(0)))
        elif request[0] == "reload":
            _, config, names = request
            sockets = {name: socket.socket(fileno=fd) for name, fd in zip(names, link.fds, strict=True)}
            link.send(reloads.request(config, sockets))


def _boot_message(link: Link, timeout: float) -> tuple[str, ...]:
    """A new worker's first message: ``("ready",)``, or ``("failed", why)`` (also when it died or stayed silent)."""
    try:
        message: tuple[str, ...] = link.recv(timeout)
    except LinkClosed as exc:
        if "timed out" in str(exc):
            return ("failed", f"not serving within {timeout:g} s")
        return ("failed", "it exited before serving (its log says why)")
    return message


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when main dies (its sockets must not outlive main's)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("cannot ask to die with the main process: %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != parent:  # main died before prctl took effect
        os._exit(1)


def pin(cpu: int | None) -> None:
    """Run this process (and the threads it starts from now on) on ``cpu`` only; None: leave it be."""
    if cpu is None:
        return
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        log.warning("cannot pin to CPU %d: %s (a unit's SystemCallFilter must allow "
                    "sched_setaffinity); running unpinned", cpu, exc.strerror)


def _open_fds() -> list[int]:
    try:
        return [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return []


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ListenError | OSError):
        return str(exc)
    return "".join(traceback.format_exception_only(exc)).strip()


def _exit_reason(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        return f"was killed by {name}" + (" (out of memory?)" if signum == signal.SIGKILL else "")
    return f"exited with status {os.WEXITSTATUS(status)}"


def worker_cpus_available() -> list[int]:
    """The CPUs this process may run on (taskset, cpusets and systemd's CPUAffinity= count)."""
    return sorted(os.sched_getaffinity(0))

