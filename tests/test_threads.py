"""The process's thread budget: fair shares, slots held for a run's life, per-thread counts.

Concurrency is simulated with barriers and events (never sleeps): threads enter slots and
wait while the test looks at the shares; runs are driven step by step from a worker thread.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from merging.compute.parallel import map_on_threads
from merging.compute.threads import (
    DEFAULT_SPINCOUNT,
    ENV,
    ThreadBudget,
    apply_share,
    limit_spinning,
    run_slot,
    runs_in_flight,
    usable_cores,
)
from merging.errors import MergingError
from merging.experiment.runner import CheckpointSpec, ContinualRun, RunConfig, preset_checkpoints, shuffled

CPU = torch.device("cpu")
WAIT = 60  # seconds before a barrier gives up, so a bug fails the test instead of hanging it
T = TypeVar("T")


@pytest.fixture(autouse=True)
def _keep_the_main_threads_count() -> Iterator[None]:
    """Worker threads change the count that fresh threads start from; put it back afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("threads-cache")


def mini_run(cache) -> ContinualRun:
    config = RunConfig(
        checkpoints=preset_checkpoints("mini-8")[:3], methods={"weight_average": {}}, samples=16, device="cpu"
    )
    return ContinualRun(config, cache_dir=cache)


def on_a_worker(fn: Callable[[], T]) -> T:
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


# ---------------------------------------------------------------- the budget


@pytest.mark.parametrize(("cores", "shares"), [("2", [2, 1, 1]), ("6", [6, 3, 2])])
def test_each_run_in_flight_gets_its_fair_share_of_the_cores(monkeypatch, cores, shares):
    monkeypatch.setenv(ENV, cores)
    budget = ThreadBudget()
    observed = []
    for runs in (1, 2, 3):
        entered = threading.Barrier(runs + 1, timeout=WAIT)
        leave = threading.Event()

        def hold(entered=entered, leave=leave) -> None:
            with budget.slot():
                entered.wait()
                leave.wait(WAIT)

        holders = [threading.Thread(target=hold) for _ in range(runs)]
        for holder in holders:
            holder.start()
        entered.wait()
        observed.append((budget.runs_in_flight, budget.share()))
        leave.set()
        for holder in holders:
            holder.join()
    assert observed == [(1, shares[0]), (2, shares[1]), (3, shares[2])]
    assert budget.runs_in_flight == 0 and budget.share() == int(cores)


def test_a_slot_is_released_when_its_block_raises(monkeypatch):
    monkeypatch.setenv(ENV, "2")
    budget = ThreadBudget()
    with pytest.raises(RuntimeError, match="boom"), budget.slot():
        assert budget.runs_in_flight == 1
        raise RuntimeError("boom")
    assert budget.runs_in_flight == 0


def test_apply_sets_only_the_calling_threads_count(monkeypatch):
    monkeypatch.setenv(ENV, "2")
    torch.set_num_threads(3)  # a value no share takes here, so a process-wide change would show
    budget = ThreadBudget()

    def alone_then_shared() -> list[int]:
        counts = []
        with budget.slot():
            budget.apply()
            counts.append(torch.get_num_threads())
            with budget.slot():  # a second run starts
                budget.apply()
                counts.append(torch.get_num_threads())
            budget.apply()  # ... and ends
            counts.append(torch.get_num_threads())
        return counts

    assert on_a_worker(alone_then_shared) == [2, 1, 2]
    assert torch.get_num_threads() == 3


# ---------------------------------------------------------------- MERGING_THREADS


def test_usable_cores_follow_the_affinity_unless_overridden(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert usable_cores() == expected
    monkeypatch.setenv(ENV, " 5 ")
    assert usable_cores() == 5


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "٣"])
def test_a_bad_merging_threads_is_refused_in_one_line_before_a_run_starts(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(MergingError, match=ENV) as caught:
        usable_cores()
    assert "\n" not in str(caught.value) and repr(value) in str(caught.value)
    budget = ThreadBudget()
    with pytest.raises(MergingError, match=ENV), budget.slot():
        pass
    assert budget.runs_in_flight == 0


# ---------------------------------------------------------------- OpenMP spinning


def test_spinning_is_capped_only_when_the_user_chose_no_policy_and_torch_is_not_loaded():
    environ: dict[str, str] = {}
    assert limit_spinning(environ, modules={}) and environ == {"GOMP_SPINCOUNT": DEFAULT_SPINCOUNT}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        environ = dict(chosen)
        assert not limit_spinning(environ, modules={}) and environ == chosen
    environ = {}
    assert not limit_spinning(environ, modules={"torch": object()}) and environ == {}  # too late to matter


def test_the_budget_module_can_be_imported_before_torch():
    code = "import sys, merging.compute.threads; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0


# ---------------------------------------------------------------- runs


def test_a_run_holds_its_slot_until_it_is_closed_early(run_cache):
    run = mini_run(run_cache)
    steps = run.steps()
    assert runs_in_flight() == 0  # a generator not yet started holds nothing
    next(steps)
    assert runs_in_flight() == 1
    steps.close()  # the caller stops iterating (the app's Stop)
    assert runs_in_flight() == 0


def test_a_run_that_fails_releases_its_slot(run_cache):
    run = mini_run(run_cache)
    (merger,) = run.mergers.values()
    original, calls = merger.step, []

    def failing(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            raise RuntimeError("step 2 failed")
        return original(*args, **kwargs)

    merger.step = failing
    with pytest.raises(RuntimeError, match="step 2 failed"):
        for _ in run.steps():
            assert runs_in_flight() == 1
    assert runs_in_flight() == 0


def test_a_run_on_a_worker_thread_follows_its_share_at_every_merge_and_evaluation(run_cache, monkeypatch):
    monkeypatch.setenv(ENV, "2")
    torch.set_num_threads(3)  # the main thread's count, which the run's worker must not change
    run = mini_run(run_cache)
    run.references  # noqa: B018 (its evaluations happen before the recording starts)
    (merger,) = run.mergers.values()
    seen: list[tuple[str, int]] = []
    merge, evaluate = merger.step, run.evaluator.evaluate

    def recorded_merge(*args, **kwargs):
        seen.append(("merge", torch.get_num_threads()))
        return merge(*args, **kwargs)

    def recorded_evaluate(*args, **kwargs):
        seen.append(("evaluate", torch.get_num_threads()))
        return evaluate(*args, **kwargs)

    merger.step, run.evaluator.evaluate = recorded_merge, recorded_evaluate
    steps = run.steps()
    with ThreadPoolExecutor(1) as worker:  # the app resumes a run's generator on a worker thread
        worker.submit(next, steps).result()  # alone
        with run_slot():  # a second run starts in another thread
            worker.submit(next, steps).result()
        worker.submit(next, steps).result()  # alone again
        worker.submit(steps.close).result()
    assert seen == [("merge", 2), ("evaluate", 2), ("merge", 1), ("evaluate", 1), ("merge", 2), ("evaluate", 2)]
    assert torch.get_num_threads() == 3 and runs_in_flight() == 0


# ---------------------------------------------------------------- map_on_threads


def test_map_on_threads_works_in_order_on_the_callers_thread_when_its_share_is_one(monkeypatch):
    monkeypatch.setenv(ENV, "2")

    def map_with_share() -> tuple[int, int, list[int]]:
        with run_slot():
            share = apply_share()
            items = map_on_threads(lambda i: threading.get_ident(), list(range(8)), CPU)
            return share, threading.get_ident(), items

    with run_slot():  # another run in flight: each gets one of the two cores
        share, caller, idents = on_a_worker(map_with_share)
    assert share == 1 and set(idents) == {caller}
    share, caller, idents = on_a_worker(map_with_share)  # alone: two cores, a pool of two
    assert share == 2 and caller not in idents


# ---------------------------------------------------------------- shuffled


def test_shuffled_gives_the_papers_order_and_leaves_the_global_generator_alone():
    specs = [CheckpointSpec(f"checkpoint-{i}", "mini-digits") for i in range(20)]
    for seed in range(42, 52):
        expected = list(specs)
        random.seed(seed)
        random.shuffle(expected)
        random.seed(2024)
        state = random.getstate()
        assert shuffled(specs, seed) == expected
        assert random.getstate() == state
