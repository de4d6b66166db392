"""Per-parameter work on threads: same results and the same first error as a plain loop.

Every test here runs the threaded path for real: the caller's intra-op thread count is set to
2 (a pool of two workers, see :func:`merging.compute.parallel.map_on_threads`), and the first two
items wait for each other at a barrier, which only two threads at once can pass. The costs
are chosen so that the order items are submitted in (dearest first) differs from their
order in the list: an implementation that answered in submission or completion order fails.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import torch

from merging.compute.parallel import map_on_threads

CPU = torch.device("cpu")
WORKERS = 2
# A deadlock guard, not a timing check: a serial loop never reaches the second party.
BARRIER_TIMEOUT_S = 60.0


@pytest.fixture
def two_threads() -> Iterator[None]:
    """The caller's share is two threads, so map_on_threads uses a pool of exactly two workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(WORKERS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Rendezvous:
    """Records the order items start in; the first two to start wait for each other.

    With a pool of two, neither worker can take a third item before both have started one,
    so ``started[:2]`` are exactly the first two items handed out, whatever the timing. Work
    on the caller's own thread is a serial loop, which would never bring the second party:
    it fails at once.
    """

    def __init__(self, fn: Callable[[int], int]) -> None:
        self.fn = fn
        self.caller = threading.get_ident()
        self.started: list[int] = []
        self.threads: set[int] = set()
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(WORKERS, timeout=BARRIER_TIMEOUT_S)

    def __call__(self, item: int) -> int:
        if threading.get_ident() == self.caller:
            raise AssertionError(f"item {item} ran on the caller's thread: no pool")
        with self._lock:
            self.started.append(item)
            self.threads.add(threading.get_ident())
            first = len(self.started) <= WORKERS
        if first:
            self._barrier.wait()
        return self.fn(item)


def test_results_keep_the_order_of_the_items_whatever_the_schedule(two_threads):
    items = list(range(12))
    cost = {i: (7 * i) % 12 for i in items}  # a shuffle: dearest first is 5, 10, 3, 8, 1, ...
    work = Rendezvous(lambda i: i * i)
    assert map_on_threads(work, items, CPU, cost=cost.__getitem__) == [i * i for i in items]
    dearest = sorted(items, key=lambda i: -cost[i])
    assert dearest[:2] != items[:2]  # the schedule differs from the list's order
    assert set(work.started[:2]) == set(dearest[:2]) and len(work.threads) == WORKERS
    assert sorted(work.started) == items


def test_the_first_failing_item_in_order_is_the_one_reported(two_threads):
    def fail_at_3_and_7(i: int) -> int:
        if i in (3, 7):
            raise ValueError(f"item {i}")
        return i

    work = Rendezvous(fail_at_3_and_7)
    # cost = i: the pool is handed 9, 8, 7, 6, 5, 4, 3, ...: item 7 before item 3
    with pytest.raises(ValueError, match="item 3"):
        map_on_threads(work, list(range(10)), CPU, cost=lambda i: i)
    assert set(work.started[:2]) == {9, 8}


def test_the_callers_thread_count_is_untouched_and_workers_get_their_share(two_threads):
    work = Rendezvous(lambda i: torch.get_num_threads())
    counts = map_on_threads(work, list(range(4)), CPU)
    assert counts == [1] * 4  # two workers share the caller's two threads
    assert torch.get_num_threads() == WORKERS and len(work.threads) == WORKERS


def test_with_one_thread_the_items_run_in_order_on_the_callers_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    seen: list[tuple[int, int]] = []

    def negate(i: int) -> int:
        seen.append((i, threading.get_ident()))
        return -i

    try:
        results = map_on_threads(negate, [3, 1, 2], CPU, cost=lambda i: i)
    finally:
        torch.set_num_threads(before)
    assert results == [-3, -1, -2]
    assert seen == [(i, threading.get_ident()) for i in (3, 1, 2)]  # no pool: item order, not cost order
