"""Per-parameter work on threads: same results and the same first error as a plain loop."""

from __future__ import annotations

import threading

import pytest
import torch

from merging.parallel import map_on_threads

CPU = torch.device("cpu")


def test_results_keep_the_order_of_the_items_whatever_the_schedule():
    items = list(range(12))
    started: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        return i * i

    assert map_on_threads(work, items, CPU, cost=lambda i: i) == [i * i for i in items]
    if torch.get_num_threads() > 1:  # with one thread there is no schedule, only the loop
        assert 11 in started[:2]  # the dearest item is among the first two to start


def test_the_first_failing_item_in_order_is_the_one_reported():
    def work(i: int) -> int:
        if i in (3, 7):
            raise ValueError(f"item {i}")
        return i

    with pytest.raises(ValueError, match="item 3"):
        map_on_threads(work, list(range(10)), CPU, cost=lambda i: -i)


def test_the_callers_thread_count_is_untouched():
    before = torch.get_num_threads()
    map_on_threads(lambda i: torch.get_num_threads(), list(range(4)), CPU)
    assert torch.get_num_threads() == before
