"""Running a sweep's trials: what they share, one trial, and the local pool.

Every trial of a sweep runs the same checkpoints over the same test images with the same
zero-shot heads; only the order, the method and its options change. So the backbone, the
decoded images (test, and train where a method learns from it), the heads and the reference
rows are computed once, before any trial starts (:func:`prepare_shared`), and every trial
reads them from memory: the local pool's threads share one copy, and the Ray backend
(:mod:`merging.experiment.sweep_ray`) puts one copy in its object store.

A trial is :class:`~merging.experiment.runner.ContinualRun` over the trial's configuration,
the same run ``python -m merging run`` makes, given the shared inputs instead of loading
them; its results are those of that run. Trials run in threads of one process: torch
releases the interpreter lock in its kernels, the runs share the process's thread budget
(:mod:`merging.compute.threads`: each takes its share of the cores), and nothing is copied.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from merging.errors import MergingError
from merging.evaluation.backbones import Backbone, Preprocess
from merging.evaluation.evaluator import Evaluator
from merging.evaluation.image_set import ImageSet
from merging.evaluation.tasks import Task
from merging.experiment.gpu_budget import Budget, Estimate, GpuSlots, default_gpu_workers, plan_gpu_slots
from merging.experiment.results import RunResults
from merging.experiment.runner import ContinualRun, RunConfig
from merging.experiment.sweep import Trial


class TrialStopped(Exception):
    """The sweep was stopped while this trial ran: it is dropped, not recorded (it reruns on resume)."""


@dataclass
class SharedInputs:
    """What every trial reads and none changes: computed once per sweep, before the first trial."""

    backbone: Backbone
    samples: int | None
    images: dict[tuple[str, str], ImageSet]  # (task, split) → its sample
    heads: dict[str, Tensor]  # task → zero-shot head (CPU)
    # The reference rows (task → accuracy), or None when a task repeats (then "fine-tuned" depends on
    # the order, and each trial measures its own rows).
    references: dict[str, dict[str, float]] | None

    def references_for(self, config: RunConfig) -> dict[str, dict[str, float]] | None:
        """The rows in the trial's task order, as the trial's own run would have written them."""
        if self.references is None:
            return None
        tasks = [c.task for c in config.checkpoints]
        return {row: {t: values[t] for t in tasks} for row, values in self.references.items()}


class SharedImages:
    """The evaluator's image cache, answered from the shared samples (any other request from ``fallback``)."""

    def __init__(self, sets: Mapping[tuple[str, str], ImageSet], fallback: Any):
        self.sets = sets
        self.fallback = fallback

    def load(self, task: Task, split: str, spec: Preprocess, limit: int | None) -> ImageSet:
        found = self.sets.get((task.name, split))
        return found if found is not None else self.fallback.load(task, split, spec, limit)


class SharedHeads:
    """The evaluator's head cache, answered from the shared heads (any other task from ``fallback``)."""

    def __init__(self, heads: Mapping[str, Tensor], fallback: Any):
        self.heads = heads
        self.fallback = fallback

    def get(self, backbone: Backbone, task: Task) -> Tensor:
        found = self.heads.get(task.name)
        return found if found is not None else self.fallback.get(backbone, task)


def prepare_shared(trials: Sequence[Trial], cache_dir: Path | None = None) -> SharedInputs:
    """Check every input once (backbone, checkpoints, datasets, splits) and compute what the trials share.

    One run over the sweep's checkpoints with every method of the sweep opens and checks
    everything, as ``run`` does before its first line of output, so a bad input fails the
    sweep before any trial; its evaluator then loads the images and heads through the disk
    cache (``MERGING_CACHE``), and its reference rows come from there too when present.
    """
    if not trials:
        raise MergingError("the sweep has no trials")
    first = trials[0].config
    methods: dict[str, dict[str, Any]] = {}
    for trial in trials:
        methods.setdefault(trial.point.method, dict(trial.point.options))
    check = ContinualRun(replace(first, methods=methods), cache_dir=cache_dir)
    check.prepare()
    evaluator = check.evaluator
    splits = {"test"}
    for merger in check.mergers.values():
        if merger.requires_data:
            splits |= set(merger.data_splits())
    images: dict[tuple[str, str], ImageSet] = {}
    heads: dict[str, Tensor] = {}
    for task in check.tasks:
        heads[task.name] = evaluator.heads.get(check.backbone, task)
        for split in sorted(splits):
            name = task.dataset.split if split == "test" else task.dataset.train_split
            if name is not None and (task.name, name) not in images:
                images[(task.name, name)] = evaluator.task_images(task, name)
    distinct = len({c.task for c in first.checkpoints}) == len(first.checkpoints)
    references = check.references if distinct else None
    return SharedInputs(check.backbone, first.samples, images, heads, references)


def trial_evaluator(shared: SharedInputs, device: torch.device | str, cache_dir: Path | None = None) -> Evaluator:
    """An evaluator of its own (it loads each merged encoder into its own tower) over the shared data."""
    evaluator = Evaluator(shared.backbone, device, shared.samples, cache_dir)
    evaluator.images = SharedImages(shared.images, evaluator.images)  # type: ignore[assignment]
    evaluator.heads = SharedHeads(shared.heads, evaluator.heads)  # type: ignore[assignment]
    return evaluator


def run_trial(
    trial: Trial,
    shared: SharedInputs,
    evaluator: Evaluator | None = None,
    stop: threading.Event | None = None,
) -> RunResults:
    """One trial, exactly ``run`` with its configuration, over the shared inputs; raises TrialStopped on stop."""
    run = ContinualRun(
        trial.config,
        evaluator=evaluator,
        references=shared.references_for(trial.config),
        backbone=shared.backbone,
    )
    run.prepare()
    for _ in run.steps():
        if stop is not None and stop.is_set():
            raise TrialStopped(trial.name)
    return run.results()


@dataclass
class Outcome:
    """A finished trial: its results, or the one-line error that ended it."""

    trial: Trial
    results: RunResults | None
    error: str | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def one_line(exc: BaseException) -> str:
    """An error as one line: input errors as they read, anything else with its type."""
    text = str(exc) if isinstance(exc, MergingError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def timed_trial(trial: Trial, work: Callable[[], RunResults]) -> Outcome:
    """Run ``work`` for ``trial``; a failure becomes the outcome's one-line error (a stop propagates)."""
    start = time.perf_counter()
    try:
        results = work()
    except TrialStopped:
        raise
    except Exception as exc:  # any failure of one trial is recorded, and the sweep goes on
        return Outcome(trial, None, one_line(exc), time.perf_counter() - start)
    return Outcome(trial, results, None, time.perf_counter() - start)


def run_local(
    trials: Iterable[Trial],
    shared: SharedInputs,
    workers: int | None,
    on_done: Callable[[Outcome], None],
    device: str = "auto",
    cache_dir: Path | None = None,
    stop: threading.Event | None = None,
    gpu_budget: Budget | None = None,
) -> None:
    """Run ``trials`` on ``workers`` threads of this process, calling ``on_done`` (in this thread) as each ends.

    On the CPU each thread keeps one evaluator for the trials it runs. On CUDA a trial first
    takes room for its estimated peak memory on a GPU (:mod:`merging.experiment.gpu_budget`:
    ``gpu_budget`` per GPU, by default 0.9 of the memory free now), waiting while no GPU has
    room, so no GPU ever runs more trials than fit; its evaluator lives on that GPU for the
    trial. A trial that fits on no GPU fails the sweep before any trial starts (a MergingError
    naming it, its estimate and the budget). ``workers`` None: the usable cores on the CPU; on
    CUDA the trials that fit at once, at most one per usable core (at least one per GPU).

    Setting ``stop`` (a Stop button) starts no more trials, stops those in flight at their next
    step and drops them, and returns; Ctrl-C (KeyboardInterrupt here) does the same, then
    propagates. Every trial already passed to ``on_done`` stays recorded, and so does one that
    finishes while the others stop.
    """
    from merging.compute.devices import resolve_device
    from merging.compute.threads import usable_cores

    target = resolve_device(device)
    local = threading.local()
    stop = stop or threading.Event()
    pending = list(trials)
    slots: GpuSlots | None = None
    estimates: dict[str, Estimate] = {}
    if target.type == "cuda":
        slots, estimates = plan_gpu_slots(pending, shared, gpu_budget or Budget())
        if workers is None:
            workers = default_gpu_workers(estimates, slots, usable_cores())
    elif workers is None:
        workers = usable_cores()

    def work(trial: Trial) -> Outcome:
        if stop.is_set():
            raise TrialStopped(trial.name)
        if slots is None:
            if getattr(local, "evaluator", None) is None:  # one evaluator (one tower copy) per worker thread
                local.evaluator = trial_evaluator(shared, target, cache_dir)
            return timed_trial(trial, lambda: run_trial(trial, shared, local.evaluator, stop))
        need = estimates[trial.name].total
        index = slots.acquire(need, stop)
        if index is None:  # stopped while waiting for room
            raise TrialStopped(trial.name)
        try:
            torch.cuda.set_device(index)  # "cuda" in the trial's configuration now means this GPU
            evaluator = trial_evaluator(shared, torch.device("cuda", index), cache_dir)
            return timed_trial(trial, lambda: run_trial(trial, shared, evaluator, stop))
        finally:
            evaluator = None  # the tower's memory goes back to the allocator before the room is given back
            slots.release(index, need)

    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="sweep-trial")
    running: set[Future[Outcome]] = set()
    try:
        # keep at most `workers` trials submitted, so a stop leaves nothing queued behind them
        while pending or running:
            if stop.is_set():
                pending.clear()
            while pending and len(running) < max(1, workers):
                running.add(pool.submit(work, pending.pop(0)))
            if not running:
                break
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    outcome = future.result()
                except TrialStopped:  # stopped at a step: dropped, it reruns on resume
                    continue
                on_done(outcome)
    except BaseException:
        stop.set()
        for future in running:  # in flight: each returns at its next step (TrialStopped) or as it finishes
            try:
                outcome = future.result()
            except BaseException:  # stopped (or failed while stopping): dropped, it reruns on resume
                continue
            on_done(outcome)  # finished meanwhile: kept
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
