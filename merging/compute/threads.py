"""One CPU thread budget per process, shared fairly by the runs in flight.

Torch's intra-op thread count is per calling thread (OpenMP's ``nthreads-var`` ICV and MKL's
thread-local setting; a thread that never set it starts from the last value any thread set).
Left alone, every run uses all cores, so two runs at once put twice as many busy OpenMP
threads as there are cores on the CPUs, and their spin-waiting barriers stall each other:
on the 2-core machine an OTMF step went from 1.8 s to 8–20 s. Here each run holds a slot for
its whole life (:func:`run_slot`) and, at every step, sets its own thread's count to its fair
share of the cores (:func:`apply_share`): a run that started alone shrinks when a second one
starts and grows back when that one ends. The count is re-applied at each step, not once,
because a server may resume a generator on a different worker thread every time.

``MERGING_THREADS`` overrides the number of usable cores (for a machine shared with other
work, or to measure). Inter-op threads are left as they are: torch refuses to change them
once any parallel work has run.

Runs in separate processes cannot see each other's slots. There, libgomp's idle threads
spinning for about 3 ms take the cores the other process needs: two processes running the
mini OTMF run at once took 360 s each instead of 14.5 s. :func:`limit_spinning`, called by an
entry point before torch is imported, caps the spinning (``GOMP_SPINCOUNT=1000``: the pair
took 40 s, a lone run about 5 % longer; ``OMP_WAIT_POLICY=PASSIVE`` made a lone run 70 %
longer). This module imports torch only when a share is applied, so calling it costs nothing.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager

from merging.errors import MergingError

ENV = "MERGING_THREADS"
SPIN_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
DEFAULT_SPINCOUNT = "1000"  # busy polls before an idle OpenMP thread sleeps (libgomp's default: 300000)


def limit_spinning(environ: MutableMapping[str, str] = os.environ, modules: Mapping[str, object] = sys.modules) -> bool:
    """Set ``GOMP_SPINCOUNT`` to :data:`DEFAULT_SPINCOUNT` unless the user chose a wait policy.

    libgomp reads it once, when torch loads it, so this only works before torch is imported;
    it returns whether it set anything (never when either variable is already set).
    """
    if "torch" in modules or any(name in environ for name in SPIN_VARIABLES):
        return False
    environ["GOMP_SPINCOUNT"] = DEFAULT_SPINCOUNT
    return True


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), or ``MERGING_THREADS`` when set."""
    value = os.environ.get(ENV, "").strip()
    if value:
        if not (value.isascii() and value.isdigit()) or int(value) < 1:
            raise MergingError(f"{ENV} must be a whole number of threads, at least 1, not {value!r}")
        return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity outside Linux: every core the OS reports
        return os.cpu_count() or 1


class ThreadBudget:
    """The count of runs in flight, and the share of the cores each of them gets."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs = 0

    @property
    def runs_in_flight(self) -> int:
        with self._lock:
            return self._runs

    def share(self) -> int:
        """``max(1, cores // runs)``: never more threads than cores while ``runs <= cores``."""
        return max(1, usable_cores() // max(1, self.runs_in_flight))

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Count a run in flight while the block runs (released on error or early close too)."""
        usable_cores()  # a bad MERGING_THREADS fails before the run starts, not at its first step
        with self._lock:
            self._runs += 1
        try:
            yield
        finally:
            with self._lock:
                self._runs -= 1

    def apply(self) -> int:
        """Set the calling thread's intra-op thread count to its current share; return it."""
        import torch  # here, so that importing this module before torch (see limit_spinning) stays free

        share = self.share()
        if torch.get_num_threads() != share:
            torch.set_num_threads(share)
        return share


BUDGET = ThreadBudget()


def run_slot() -> AbstractContextManager[None]:
    """Hold one of the process's run slots for the life of a run (see :class:`ThreadBudget`)."""
    return BUDGET.slot()


def apply_share() -> int:
    """Give the calling thread its fair share of the cores, for the run it is executing."""
    return BUDGET.apply()


def runs_in_flight() -> int:
    """How many runs hold a slot now."""
    return BUDGET.runs_in_flight
