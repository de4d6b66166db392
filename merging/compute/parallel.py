"""Running independent per-parameter work on several CPU threads.

Much of OPCM's time goes to LAPACK's symmetric eigensolver, which keeps two cores only
partly busy. Giving each of two Python threads one intra-op thread runs two
decompositions at once instead (torch's thread count is per thread, so the caller's
setting is untouched). On CUDA, or with a single core, work runs in order.

The pool is sized from the *calling* thread's intra-op count, which a run sets to its share
of the process's budget (:mod:`merging.compute.threads`): when two runs share two cores each has a
share of 1 and works in order here, so the pools of concurrent runs never add up to more
threads than cores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def map_on_threads(
    fn: Callable[[T], R], items: Sequence[T], device: torch.device, cost: Callable[[T], float] | None = None
) -> list[R]:
    """``[fn(x) for x in items]``, on up to four threads sharing torch's intra-op threads.

    With ``cost``, the dearest items start first (so no thread is left alone with a large one
    at the end); results still come in the order of ``items``, and so does the first error.
    """
    threads = torch.get_num_threads()  # the caller's share, never the machine's core count
    workers = min(4, max(1, threads // 2) if threads >= 8 else threads, len(items))
    if device.type != "cpu" or workers <= 1:
        return [fn(item) for item in items]
    per_worker = max(1, threads // workers)
    order = sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost else range(len(items))
    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(per_worker,)) as pool:
        futures = {i: pool.submit(fn, items[i]) for i in order}
        return [futures[i].result() for i in range(len(items))]
