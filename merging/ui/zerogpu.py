"""Hugging Face ZeroGPU: the GPU held only for compute, every download and decode done before it.

On a ZeroGPU Space (``SPACES_ZERO_GPU`` is 1 or true, read as the ``spaces`` package reads it)
CUDA exists only inside a function decorated with ``spaces.GPU``: each call asks for a GPU for
at most ``duration`` seconds, counted against the visitor's quota, and runs in a worker process
forked from the app's, which receives the call's arguments and sends back what it returns or
yields by pickling. The app's own process sees a CUDA that cannot be initialised. So a Run goes
in two parts:

1. **Before the window**, in the app's process, on the CPU (:func:`fetch_and_decode`): the
   backbone and every checkpoint are downloaded and validated, the test splits (and the train
   splits a data-driven method needs) are downloaded and decoded into the image cache on disk,
   and the zero-shot heads are built (by the text tower on the CPU, as everywhere) into the head
   cache. A bad checkpoint, task or layer fails here, without a GPU ever being asked for.
2. **Inside the window** (:func:`compute`, wrapped in ``spaces.GPU`` by :func:`install`): the
   usual stream (:func:`merging.ui.lab.stream`) of the same configuration. It opens the files
   already on disk (with the Hub offline in the worker, so nothing can be downloaded there),
   reads the decoded images and the heads from the caches (the run decodes on the CPU:
   :attr:`merging.experiment.runner.ContinualRun.decode_on_cpu`) and spends the GPU on the
   reference rows, the merges and the evaluations.

Only plain data crosses the boundary: the run's configuration, the session folder, the layout
and the layer's label in, :class:`~merging.ui.lab.LabUpdate` records out; the app's process
draws the figures. The duration asked for is :func:`gpu_seconds`. Without ``SPACES_ZERO_GPU``
nothing here runs and ``spaces`` is never imported: it is not a requirement of the app.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from merging.experiment.runner import ContinualRun, RunConfig
    from merging.ui.lab import LabUpdate, LiveLayer

ENV = "SPACES_ZERO_GPU"
SECONDS_PER_STEP = 20  # per checkpoint and method, the reference rows included (ViT-B/32, 500 images a task)
MIN_SECONDS = 60  # the ``spaces`` package's own default
MAX_SECONDS = 1500

_APP_PID = os.getpid()  # the app's process; ZeroGPU runs compute() in a worker forked from it
_installed: Callable[..., Iterator[LabUpdate]] | None = None


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this runs on a ZeroGPU Space: ``SPACES_ZERO_GPU`` is 1, t or true (any case), as ``spaces`` reads it."""
    return environ.get(ENV, "").strip().lower() in ("1", "t", "true")


def setup() -> bool:
    """On ZeroGPU, import ``spaces`` before anything imports torch (the package patches torch as it loads).

    The app calls this first thing; elsewhere it does nothing and returns False.
    """
    if not enabled():
        return False
    import spaces  # noqa: F401  (only on ZeroGPU Spaces, where the platform installs it)

    return True


def install() -> Callable[..., Iterator[LabUpdate]]:
    """:func:`compute` wrapped in ``spaces.GPU`` (once per process; ZeroGPU wants it before the app starts).

    From here on every run of the process decodes its images on the CPU, which is where
    :func:`fetch_and_decode` put them in the image cache.
    """
    global _installed
    if _installed is None:
        import spaces

        from merging.experiment.runner import ContinualRun

        ContinualRun.decode_on_cpu = True
        _installed = spaces.GPU(duration=gpu_seconds)(compute)
    return _installed


def gpu_seconds(config: RunConfig, *_: Any, **__: Any) -> int:
    """The GPU time to ask for: about 20 s per checkpoint and method, at least 60 s, at most 1500 s.

    ``spaces`` calls it with :func:`compute`'s arguments. The compute alone: downloads and
    decoding happen before the window.
    """
    steps = len(config.checkpoints) * max(1, len(config.methods))
    return int(min(MAX_SECONDS, max(MIN_SECONDS, SECONDS_PER_STEP * steps)))


def fetch_and_decode(config: RunConfig) -> ContinualRun:
    """Everything of a run that needs no GPU, in this process on the CPU, into the on-disk caches.

    Downloads and checks the backbone, the checkpoints and the dataset splits, decodes every
    task's test images (and the splits the data-driven methods read), and builds the zero-shot
    heads. Returns the prepared run (on the CPU) for its layer list; the run inside the GPU
    window is built afresh from ``config`` and finds all of it on disk.
    """
    from merging.experiment.runner import ContinualRun

    run = ContinualRun(replace(config, device="cpu"), prefetch=False)
    run.prepare()  # the backbone, every checkpoint (downloaded and validated) and every dataset split
    evaluator = run.evaluator
    splits = {"test"} | {s for m in run.mergers.values() if m.requires_data for s in m.data_splits()}
    for task in run.tasks:
        for split in sorted(splits):
            name = task.dataset.split if split == "test" else task.dataset.train_split
            if name is not None:
                evaluator.task_images(task, name)  # decoded once, into the image cache on disk
        evaluator.head(task)  # built on the CPU like everywhere, into the head cache on disk
    return run


def compute(config: RunConfig, folder: str, fmt: str, layer: str | None) -> Iterator[LabUpdate]:
    """Inside the GPU window: the run's stream, on files, images and heads already on disk.

    In ZeroGPU's worker the Hub is put offline, so a file missing from the cache fails with
    one line instead of being downloaded on GPU time.
    """
    from merging.ui import lab

    if os.getpid() != _APP_PID:  # ZeroGPU's worker: a process of its own, made for this function
        from merging.compute.devices import GPU_WINDOW_VARIABLE

        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ[GPU_WINDOW_VARIABLE] = "1"  # CUDA is usable here: device auto may pick it
    yield from lab.stream(config, Path(folder), fmt=fmt, layer=layer)


def stream(
    config: RunConfig, folder: Path, fmt: str = "hf", layer: LiveLayer | str | None = None
) -> Iterator[LabUpdate]:
    """:func:`merging.ui.lab.stream` on ZeroGPU: fetch and decode here, then compute in the GPU window.

    The layer is checked against the encoder before the window. The worker receives the layer
    chosen when the run starts: a layer chosen while the run streams is not seen by it (the
    figures after the run follow the list again).
    """
    from merging.ui import lab

    started = time.perf_counter()
    run = fetch_and_decode(config)
    live = layer if isinstance(layer, lab.LiveLayer) else lab.LiveLayer(layer)
    layers, default = lab.encoder_layers(run)
    live.bind([label for _, label in layers], default)  # a bad layer is refused before asking for a GPU
    yield lab.LabUpdate(
        run.results(references=False).snapshot(),
        0,
        len(config.checkpoints),
        f"Checkpoints and images ready ({time.perf_counter() - started:.1f} s); waiting for a GPU…",
        [],
        lab.with_default(layers, default),
        live.requested or "",
    )
    del run
    yield from install()(config, str(folder), fmt, live.requested)
