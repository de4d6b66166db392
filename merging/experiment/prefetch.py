"""Doing the next step's reading and decoding while this step computes.

A continual run alternates compute (merging, the network's forward passes) with work that
waits on the disk or on an image decoder: reading the next checkpoint's file, decoding the
next task's test images. Done in order, the compute device idles through all of it (on a
GPU most of a cold step). A :class:`Prefetcher` runs that work on one background thread, one
step ahead, so it overlaps the compute; the foreground asks for the result when it needs it.

Work ahead is only ever an earlier start of what the foreground would do anyway, so results
do not change: an image split decoded ahead lands in the image cache (whose loads wait for a
decode already under way instead of starting their own); a checkpoint read ahead is handed
over by :meth:`Prefetcher.result`, which re-raises the work's own error at the point where
the sequential code would have raised it. Warm-ups whose result nobody asks for (filling the
OS page cache) drop their errors: the foreground redoes that work and fails there, naming
the culprit as it always did.

Bounded by construction: one thread per run, and callers schedule at most one step ahead.
Disabled (``enabled=False``), everything runs in the foreground, in order: the baseline of
``benchmarks/real_scale.py``, and a run's default on a CPU with fewer than four cores, where
the background thread only competes with the run's own (``ContinualRun._works_ahead``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


class Prefetcher:
    """One background thread that starts work early; results and errors are collected in the foreground."""

    def __init__(self, enabled: bool = True):
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="merging-prefetch") if enabled else None
        self._scheduled: dict[Hashable, Future] = {}

    @property
    def enabled(self) -> bool:
        return self._executor is not None

    def ahead(self, key: Hashable, work: Callable[[], object]) -> None:
        """Start ``work`` in the background, after what is already queued; :meth:`result` collects it.

        Nothing happens when ``key`` is already scheduled, or without a background thread (the
        foreground then does the work when it asks for the result).
        """
        if self._executor is None or key in self._scheduled:
            return
        self._scheduled[key] = self._executor.submit(_logged, key, work)

    def warm(self, key: Hashable, work: Callable[[], object]) -> None:
        """Start ``work`` for its side effect only (a cache filled); its result and error are dropped."""
        self.ahead(("warm", key), work)
        for done in [k for k, f in self._scheduled.items() if f.done() and _is_warm_up(k)]:
            del self._scheduled[done]

    def result(self, key: Hashable, work: Callable[[], T]) -> T:
        """What the work scheduled under ``key`` returned (waiting for it), or ``work()`` if none was.

        The background work's exception, if any, is raised here, as ``work()`` would raise it.
        """
        future = self._scheduled.pop(key, None)
        if future is None or future.cancelled():
            return work()
        return future.result()

    def close(self) -> None:
        """Cancel what has not started and wait for what has: no thread outlives the run."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._scheduled.clear()


def _is_warm_up(key: Hashable) -> bool:
    return isinstance(key, tuple) and len(key) == 2 and key[0] == "warm"


def _logged(key: Hashable, work: Callable[[], T]) -> T:
    try:
        return work()
    except Exception:
        log.debug("work ahead %r failed; the foreground will redo it", key, exc_info=True)
        raise
