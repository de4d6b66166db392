"""The Ray backend of a sweep: trials as Ray tasks, the shared inputs in Ray's object store once.

Ray is optional (the app and the local backend never import it): :func:`import_ray` turns its
absence into one line saying how to install it. The shared inputs of
:mod:`merging.experiment.sweep_runner` go into the object store once per sweep: the decoded
images and the zero-shot heads as numpy arrays (workers on a node map them read-only from
the node's shared memory, without a copy), the pretrained backbone as one pickled object,
and the reference rows. Each worker process unpacks them the first time a trial needs them
and keeps them for the next trials it runs (CPU trials; a GPU trial's worker runs only it).

A trial asks for ``cpus_per_trial`` CPUs, and its thread budget is set to that
(``MERGING_THREADS``), so Ray's packing is what bounds the work on each node. On CUDA it also
asks for ``1/k`` of a GPU, where k trials of its kind fit in the GPU memory budget
(:mod:`merging.experiment.gpu_budget`, its estimate counting the worker's own CUDA context), so
Ray puts at most k such trials on one GPU; a GPU trial runs in a worker process of its own
(Ray's default for GPU tasks), which gives its memory back when it ends. The trial runs
exactly as in the local pool (:func:`sweep_runner.run_trial`) and sends its results back as
results.json's content, which the driver writes: workers need the checkpoints (the same
paths, or Hub ids), not the sweep's folder.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from merging.errors import MergingError
from merging.evaluation.image_set import ImageSet
from merging.experiment.gpu_budget import (
    Budget,
    check_fit,
    estimate_trials,
    gpu_budgets,
    ray_gpu_fraction,
)
from merging.experiment.results import RunResults
from merging.experiment.sweep import Trial
from merging.experiment.sweep_runner import Outcome, SharedInputs, one_line, run_trial, trial_evaluator

RAY_MISSING = "--backend ray needs Ray, which is not installed: pip install 'ray>=2.9' (or -r requirements-dev.txt)"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise MergingError(RAY_MISSING) from None
    return ray


def pack(shared: SharedInputs) -> dict[str, Any]:
    """The shared inputs as the object store keeps them best: numpy arrays for the large read-only data."""
    return {
        "backbone": shared.backbone,
        "samples": shared.samples,
        "images": {key: (s.images.numpy(), s.labels.numpy()) for key, s in shared.images.items()},
        "heads": {task: head.numpy() for task, head in shared.heads.items()},
        "references": shared.references,
    }


def unpack(data: dict[str, Any]) -> SharedInputs:
    """The shared inputs in a worker; the arrays stay in the object store (read-only views, not copies)."""

    def tensor(array: np.ndarray) -> torch.Tensor:
        with warnings.catch_warnings():  # a read-only view of the store: nothing writes images or heads
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(array)

    images = {key: ImageSet(tensor(images), tensor(labels)) for key, (images, labels) in data["images"].items()}
    heads = {task: tensor(head) for task, head in data["heads"].items()}
    return SharedInputs(data["backbone"], data["samples"], images, heads, data["references"])


_WORKER: dict[str, Any] = {}  # per worker process: the unpacked inputs and evaluator of the sweep it serves


def _remote_trial(refs: list[Any], trial: Trial, device: str) -> dict[str, Any]:
    """Runs in a Ray worker: one trial over the sweep's shared inputs; its results.json content or its error."""
    import ray

    key = refs[0].hex()
    if _WORKER.get("key") != key:
        from merging.compute.devices import resolve_device
        from merging.compute.memory import keep_freed_memory

        keep_freed_memory()  # a worker process starts outside python -m merging's entry point
        shared = unpack(ray.get(refs[0]))
        _WORKER.clear()
        _WORKER.update(key=key, shared=shared, evaluator=trial_evaluator(shared, resolve_device(device)))
    start = time.perf_counter()
    try:
        results = run_trial(trial, _WORKER["shared"], _WORKER["evaluator"])
    except Exception as exc:  # recorded by the driver; the sweep goes on
        return {"error": one_line(exc), "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    return {"results": results.to_json(), "seconds": seconds, "node": ray.util.get_node_ip_address()}


def worker_environment(cpus_per_trial: int) -> dict[str, str]:
    """What each worker process needs in its environment: its thread budget, and this checkout importable."""
    env = {"MERGING_THREADS": str(cpus_per_trial), "OMP_NUM_THREADS": str(cpus_per_trial)}
    if not any(name in os.environ for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
        env["GOMP_SPINCOUNT"] = "1000"  # see merging.compute.threads.limit_spinning
    path = os.environ.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), path) if p)
    return env


def _free_gpu_memory() -> int:
    """Runs in a Ray worker holding one GPU: the bytes free on it."""
    return int(torch.cuda.mem_get_info()[0])


def ray_gpu_budget(ray: Any, budget: Budget) -> int:
    """The budget per GPU of the cluster, in bytes: an amount as given; a fraction of the free memory
    of this machine's GPUs (the smallest) when it has some, else of one GPU of the cluster, probed."""
    if budget.amount is not None:
        return budget.amount
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        torch.cuda.empty_cache()  # the workers are other processes: what this one caches is not theirs
        return min(gpu_budgets(budget))
    probe = ray.remote(num_cpus=0, num_gpus=1, max_retries=0)(_free_gpu_memory)
    return budget.of(int(ray.get(probe.remote())))


def gpu_fractions(trials: Sequence[Trial], shared: SharedInputs, budget: Budget, budget_bytes: int) -> dict[str, float]:
    """Per trial (by name), the share of a GPU it asks Ray for; a one-line error for a trial that does not fit."""
    estimates = estimate_trials(trials, shared, own_process=True)
    for estimate in estimates.values():
        check_fit(estimate, [budget_bytes], budget)
    return {name: ray_gpu_fraction(e.total, budget_bytes) for name, e in estimates.items()}


def run_ray(
    trials: Sequence[Trial],
    shared: SharedInputs,
    workers: int | None,
    on_done: Callable[[Outcome], None],
    address: str | None = None,
    device: str = "auto",
    cpus_per_trial: int = 1,
    gpu_budget: Budget | None = None,
) -> None:
    """Run ``trials`` as Ray tasks, calling ``on_done`` here as each ends; at most ``workers`` at once if given.

    Without ``address`` a local Ray instance is started (with ``workers`` CPUs, default the
    usable cores) and shut down at the end; with one, the running cluster is joined. On GPUs
    each trial asks for the share of a GPU that ``gpu_budget`` (default 0.9 of the free memory)
    leaves it (:func:`gpu_fractions`). Ctrl-C cancels the tasks in flight; the trials already
    passed to ``on_done`` stay recorded.
    """
    ray = import_ray()
    from merging.compute.threads import usable_cores

    started = not ray.is_initialized()
    if started:
        options: dict[str, Any] = {
            "runtime_env": {"env_vars": worker_environment(cpus_per_trial)},
            "include_dashboard": False,
            "logging_level": "WARNING",
            "log_to_driver": True,
        }
        try:
            if address:
                ray.init(address=address, **options)
            else:
                ray.init(num_cpus=(workers or usable_cores()) * cpus_per_trial, **options)
        except Exception as exc:  # Ray's own messages run to many lines: its first says what went wrong
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise MergingError(f"cannot start or reach {where}: {first}") from None
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        on_gpu = device == "cuda" or (device == "auto" and gpus > 0)
        if device == "cuda" and gpus == 0 and not address:  # a cluster may still add GPU nodes; this one never will
            raise MergingError("device cuda was asked for, but this machine has no GPU that Ray can use")
        remote = ray.remote(_remote_trial).options(num_cpus=cpus_per_trial, num_gpus=0, max_retries=0)
        fractions: dict[str, float] = {}
        gpu_remotes: dict[float, Any] = {}
        if on_gpu:
            budget = gpu_budget or Budget()
            fractions = gpu_fractions(trials, shared, budget, ray_gpu_budget(ray, budget))
            for fraction in set(fractions.values()):
                # one trial per worker process (max_calls=1, Ray's default for GPU tasks, said here): a reused
                # worker would keep the CUDA device and the cached memory of its previous trial
                declare = ray.remote(num_cpus=cpus_per_trial, num_gpus=fraction, max_retries=0, max_calls=1)
                gpu_remotes[fraction] = declare(_remote_trial)
        refs = [ray.put(pack(shared))]  # once per sweep; workers on every node read it from there
        limit = workers or len(trials)
        pending = list(trials)
        running: dict[Any, Trial] = {}
        try:
            while pending or running:
                while pending and len(running) < limit:
                    trial = pending.pop(0)
                    task = gpu_remotes[fractions[trial.name]] if on_gpu else remote
                    running[task.remote(refs, trial, device)] = trial
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    trial = running.pop(ref)
                    on_done(_outcome(trial, ray.get(ref)))
        except BaseException:
            for ref in running:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()


def _outcome(trial: Trial, answer: dict[str, Any]) -> Outcome:
    if "error" in answer:
        return Outcome(trial, None, answer["error"], answer["seconds"])
    results = RunResults.from_json(answer["results"])
    return Outcome(trial, results, None, answer["seconds"], {"node": answer.get("node")})
