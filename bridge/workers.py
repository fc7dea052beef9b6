"""A pool of reusable daemon threads, so that opening a tunnel does not start threads.

Starting a Python thread costs about 100 µs (``Thread.start`` waits for the new
thread to signal that it runs); handing a task to a parked thread costs one
wake-up. Each daemon has one :class:`WorkerPool` (``TunnelRegistry.workers``).

Contract of :meth:`WorkerPool.submit`:

* ``fn(*args)`` runs on a thread of its own, concurrently with the caller and
  with every other task: a task is never queued behind another one. An idle
  (parked) worker takes it if there is one; otherwise a new daemon thread is
  started. N tasks running at once occupy N threads.
* Out of threads (``RuntimeError: can't start new thread``) propagates to the
  caller of ``submit``, and the task does not run.
* While it runs, the worker thread is named ``name`` (``threading.current_thread().name``,
  which logging and py-spy show); parked, it is named ``idle-worker``.
* An exception escaping ``fn`` is logged with its traceback; the worker carries on.
* A finished worker parks for at most ``idle_seconds`` waiting for its next task,
  then exits; at most ``max_idle`` workers are parked at once (a worker finishing
  when that many are parked exits at once). So after a burst of load, the thread
  count returns to its idle value within ``idle_seconds``.
* The most recently parked worker is reused first, so under a steady load only as
  many workers stay parked as the load needs, and the rest time out.
* A parked worker holds no reference to its previous task or its arguments.

:meth:`WorkerPool.close` wakes every parked worker so that it exits; tasks
submitted after it still run, each on a thread that exits when it is done.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("tcpbridge.workers")

#: How long a finished worker waits for another task before its thread exits (seconds).
IDLE_SECONDS = 5.0
#: How many finished workers are kept waiting for tasks at most.
MAX_IDLE = 64
IDLE_NAME = "idle-worker"

_Task = tuple[Callable[..., object], tuple[Any, ...], str]


class _Worker:
    """One pooled thread's mailbox: ``task`` is set, then ``wake`` released."""

    __slots__ = ("task", "wake")

    def __init__(self) -> None:
        self.task: _Task | None = None
        self.wake = threading.Lock()
        self.wake.acquire()  # held while the worker has nothing to do


class WorkerPool:
    """Runs each submitted task on its own daemon thread, reusing threads that finished one."""

    def __init__(self, *, idle_seconds: float = IDLE_SECONDS, max_idle: int = MAX_IDLE) -> None:
        if idle_seconds < 0 or max_idle < 0:
            raise ValueError("idle_seconds and max_idle must not be negative")
        self.idle_seconds = idle_seconds
        self.max_idle = max_idle
        self._lock = threading.Lock()
        self._idle: deque[_Worker] = deque()  # parked workers, most recently parked last
        self._closed = False

    @property
    def idle(self) -> int:
        """How many workers are parked now."""
        with self._lock:
            return len(self._idle)

    def submit(self, fn: Callable[..., object], *args: Any, name: str = "worker") -> None:
        """Run ``fn(*args)`` on a parked worker, or on a new daemon thread if none is parked.

        Raises RuntimeError if a new thread is needed and cannot be started.
        """
        task: _Task = (fn, args, name)
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is not None:
            worker.task = task
            worker.wake.release()
            return
        worker = _Worker()
        worker.task = task  # not in the Thread's args, which it keeps until it exits
        threading.Thread(target=self._work, args=(worker,), name=name, daemon=True).start()

    def close(self) -> None:
        """Make every parked worker exit now, and no worker park from now on."""
        with self._lock:
            self._closed = True
            parked, self._idle = self._idle, deque()
        for worker in parked:
            worker.wake.release()  # with no task: the worker exits

    def _work(self, worker: _Worker) -> None:
        thread = threading.current_thread()
        task, worker.task = worker.task, None
        while task is not None:
            fn, args, name = task
            task = None
            thread.name = name
            try:
                fn(*args)
            except Exception:
                log.exception("%s: task failed", name)
            del fn, args  # a parked worker must not keep sockets (or anything else) alive
            thread.name = IDLE_NAME
            task = self._park(worker)

    def _park(self, worker: _Worker) -> _Task | None:
        """Wait up to ``idle_seconds`` for the next task; None means exit."""
        with self._lock:
            if self._closed or len(self._idle) >= self.max_idle:
                return None
            self._idle.append(worker)
        if not worker.wake.acquire(timeout=self.idle_seconds):
            with self._lock:
                if worker in self._idle:  # nobody took us: exit
                    self._idle.remove(worker)
                    return None
            # submit (or close) took us off the list just as we timed out: its wake-up is on the way
            worker.wake.acquire()
        task, worker.task = worker.task, None
        return task
