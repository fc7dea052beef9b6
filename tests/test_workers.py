"""bridge.workers: pooled threads are reused, run tasks concurrently, and go away when idle."""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import pytest

from bridge.workers import IDLE_NAME, WorkerPool

WAIT = 10.0  # every wait in this file gives up after this many seconds


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


@pytest.fixture
def pools() -> Iterator[list[WorkerPool]]:
    """Pools made by a test, closed after it so that no parked worker outlives it."""
    made: list[WorkerPool] = []
    yield made
    for pool in made:
        pool.close()


def make(pools: list[WorkerPool], **kwargs: float) -> WorkerPool:
    pool = WorkerPool(**kwargs)  # type: ignore[arg-type]
    pools.append(pool)
    return pool


class Recorder:
    """A task that records which thread ran it, under which name."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        self.name = ""

    def __call__(self) -> None:
        self.thread = threading.current_thread()
        self.name = self.thread.name
        self.done.set()


def run_one(pool: WorkerPool, name: str = "task") -> Recorder:
    task = Recorder()
    pool.submit(task, name=name)
    assert task.done.wait(WAIT)
    return task


def test_an_idle_worker_runs_the_next_task(pools: list[WorkerPool]) -> None:
    pool = make(pools, idle_seconds=30)
    first = run_one(pool, "tunnel-1-up")
    assert wait_until(lambda: pool.idle == 1)
    assert first.thread is not None and first.thread.name == IDLE_NAME
    second = run_one(pool, "tunnel-2-up")
    assert second.thread is first.thread  # the same thread, no new one started
    assert (first.name, second.name) == ("tunnel-1-up", "tunnel-2-up")
    assert first.thread.daemon


def test_sequential_tasks_reuse_one_thread(pools: list[WorkerPool]) -> None:
    pool = make(pools, idle_seconds=30)
    idents = set()
    for index in range(50):
        task = run_one(pool, f"task-{index}")
        assert wait_until(lambda: pool.idle == 1)
        assert task.thread is not None
        idents.add(task.thread.ident)
    assert len(idents) == 1


def test_idle_workers_exit_after_idle_seconds(pools: list[WorkerPool]) -> None:
    pool = make(pools, idle_seconds=0.2)
    task = run_one(pool)
    assert task.thread is not None
    started = time.monotonic()
    task.thread.join(WAIT)
    assert not task.thread.is_alive()
    assert 0.1 < time.monotonic() - started < 5
    assert pool.idle == 0
    assert run_one(pool).thread is not task.thread  # the pool still works: a new thread


def test_at_most_max_idle_workers_park(pools: list[WorkerPool]) -> None:
    pool = make(pools, idle_seconds=30, max_idle=2)
    release = threading.Event()
    threads: list[threading.Thread] = []
    lock = threading.Lock()

    def hold() -> None:
        with lock:
            threads.append(threading.current_thread())
        release.wait(WAIT)

    for _ in range(5):
        pool.submit(hold, name="hold")
    assert wait_until(lambda: len(threads) == 5)
    release.set()
    assert wait_until(lambda: sum(thread.is_alive() for thread in threads) == 2)  # 3 exited at once
    assert pool.idle == 2
    time.sleep(0.2)
    assert sum(thread.is_alive() for thread in threads) == 2
    pool.close()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()
    assert pool.idle == 0


def test_concurrent_tasks_get_a_thread_each(pools: list[WorkerPool]) -> None:
    pool = make(pools, idle_seconds=30)
    count = 16
    barrier = threading.Barrier(count, timeout=WAIT)  # breaks unless all 16 run at the same time
    idents: list[int] = []
    finished = threading.Semaphore(0)

    def meet() -> None:
        barrier.wait()
        idents.append(threading.get_ident())
        finished.release()

    for _ in range(count):
        pool.submit(meet, name="meet")
    for _ in range(count):
        assert finished.acquire(timeout=WAIT)
    first_round = set(idents)
    assert len(first_round) == count
    assert wait_until(lambda: pool.idle == count)
    # now all 16 are parked: 16 more concurrent tasks reuse them and start nothing new
    barrier.reset()
    idents.clear()
    for _ in range(count):
        pool.submit(meet, name="meet")
    for _ in range(count):
        assert finished.acquire(timeout=WAIT)
    assert set(idents) == first_round


def test_an_exception_is_logged_and_the_worker_carries_on(
        pools: list[WorkerPool], caplog: pytest.LogCaptureFixture) -> None:
    pool = make(pools, idle_seconds=30)
    failed = threading.Event()
    ran_on: list[threading.Thread] = []

    def boom() -> None:
        ran_on.append(threading.current_thread())
        failed.set()
        raise ValueError("broken task")

    with caplog.at_level(logging.ERROR, logger="tcpbridge.workers"):
        pool.submit(boom, name="tunnel-abc-up")
        assert failed.wait(WAIT)
        assert wait_until(lambda: pool.idle == 1)
    assert [r.getMessage() for r in caplog.records] == ["tunnel-abc-up: task failed"]
    assert caplog.records[0].exc_info is not None and "broken task" in caplog.text
    assert run_one(pool).thread is ran_on[0]


def test_arguments_are_passed_and_not_kept_by_a_parked_worker(pools: list[WorkerPool]) -> None:
    pool = make(pools, idle_seconds=30)

    class Payload:
        pass

    payload = Payload()
    gone = weakref.ref(payload)
    got: list[tuple[object, int]] = []
    done = threading.Event()

    def take(item: object, number: int) -> None:
        got.append((item, number))
        done.set()

    pool.submit(take, payload, 7, name="take")
    assert done.wait(WAIT)
    assert got == [(payload, 7)]
    assert wait_until(lambda: pool.idle == 1)
    del payload, got[:]
    gc.collect()
    assert gone() is None


def test_out_of_threads_reaches_the_caller(pools: list[WorkerPool], monkeypatch: pytest.MonkeyPatch) -> None:
    pool = make(pools, idle_seconds=30)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    ran = threading.Event()
    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, "start", refuse)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            pool.submit(ran.set, name="refused")
    assert not ran.is_set()
    run_one(pool)  # threads again: the pool works


def test_a_parked_worker_is_used_even_when_threads_cannot_start(
        pools: list[WorkerPool], monkeypatch: pytest.MonkeyPatch) -> None:
    pool = make(pools, idle_seconds=30)
    first = run_one(pool)
    assert wait_until(lambda: pool.idle == 1)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, "start", refuse)
        assert run_one(pool).thread is first.thread


def test_close_ends_parked_workers_and_later_tasks_still_run(pools: list[WorkerPool]) -> None:
    pool = make(pools, idle_seconds=30)
    first = run_one(pool)
    assert wait_until(lambda: pool.idle == 1)
    pool.close()
    assert first.thread is not None
    first.thread.join(WAIT)
    assert not first.thread.is_alive()
    later = run_one(pool)
    assert later.thread is not None
    later.thread.join(WAIT)  # does not park after close
    assert not later.thread.is_alive()
    assert pool.idle == 0


def test_no_task_is_lost_when_workers_time_out_as_tasks_arrive(pools: list[WorkerPool]) -> None:
    """idle_seconds near zero: submits keep racing workers that are timing out."""
    pool = make(pools, idle_seconds=0.0005, max_idle=4)
    count = 3000
    finished = threading.Semaphore(0)
    for index in range(count):
        pool.submit(finished.release, name=f"race-{index}")
        if index % 7 == 0:
            time.sleep(0.0003)
    for _ in range(count):
        assert finished.acquire(timeout=WAIT)
    assert wait_until(lambda: pool.idle == 0)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        WorkerPool(idle_seconds=-1)
    with pytest.raises(ValueError):
        WorkerPool(max_idle=-1)
