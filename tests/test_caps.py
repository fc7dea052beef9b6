"""bridge.caps: live-connection counts, per process and shared by forked workers (real forks, no daemons)."""

from __future__ import annotations

import os

import pytest

from bridge.caps import LocalCounts, SharedCounts


def in_child(body: object) -> None:
    """Run ``body()`` in a forked child; fail unless it returns normally."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()  # type: ignore[operator]
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("make", [LocalCounts, lambda: SharedCounts(2, rows=64)])
def test_a_cap_refuses_one_more_and_release_frees_it(make: object) -> None:
    counts = make()  # type: ignore[operator]
    assert [counts.try_acquire("t", 2) for _ in range(3)] == [True, True, False]
    assert counts.count("t") == 2 and counts.count("other") == 0
    counts.release("t")
    assert counts.try_acquire("t", 2)
    assert all(counts.try_acquire("u", 0) for _ in range(50))  # 0: no cap
    assert counts.count("u") == 50


def test_workers_share_one_cap() -> None:
    counts = SharedCounts(2, rows=64)

    def worker() -> None:
        counts.use_slot(1)
        assert counts.try_acquire("listener/route", 3) and counts.try_acquire("listener/route", 3)

    in_child(worker)
    assert counts.count("listener/route") == 2  # the child's two, seen by main
    counts.use_slot(0)
    assert counts.try_acquire("listener/route", 3)
    assert not counts.try_acquire("listener/route", 3)  # 2 in slot 1 + 1 here: the daemon's cap
    counts.clear_slot(1)  # that worker died: its connections went with it
    assert counts.count("listener/route") == 1
    assert counts.try_acquire("listener/route", 3) and counts.try_acquire("listener/route", 3)


def test_many_keys_fill_the_table_and_the_rest_are_not_capped_across_workers() -> None:
    counts = SharedCounts(2, rows=8)
    for i in range(8):
        assert counts.try_acquire(f"k{i}", 1)
        assert not counts.try_acquire(f"k{i}", 1)
    assert counts.try_acquire("overflow", 1) and counts.try_acquire("overflow", 1)
