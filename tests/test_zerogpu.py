"""ZeroGPU (merging.ui.zerogpu), offline, with a fake ``spaces`` package standing in for the real one.

The fake's ``spaces.GPU`` does what ZeroGPU's does around a generator function, minus the GPU:
it asks the duration function with the call's arguments, pickles the arguments and every
yielded value across the boundary, and marks the time the decorated function runs as "the
window". The spies record which side of it each download, decode, head, merge and evaluation
happened on. To stand for a worker forked before this run was prepared, the window starts with
the process's Hub listings and backbones forgotten.
"""

from __future__ import annotations

import fnmatch
import importlib.abc
import importlib.machinery
import inspect
import pickle
import sys
import types
from pathlib import Path

import pytest

import app
from merging.evaluation.backbones import load_backbone
from merging.experiment.runner import CheckpointSpec, ContinualRun, RunConfig
from merging.io.hub import clear_listing_cache
from merging.ui import lab, zerogpu

from .test_hub import TASKS, hub  # noqa: F401  (the fixture: a Hub cache of the mini benchmark)

SPEC = [CheckpointSpec(f"testorg/clip-mini_hub-{t}", f"hub-{t}") for t in TASKS]


def hub_config(methods=("opcm",)) -> RunConfig:
    return RunConfig("hf-hub:testorg/mini-clip", list(SPEC), {m: {} for m in methods}, samples=24, device="cpu")


class Window:
    """The fake ``spaces`` package, and where everything happened relative to its GPU window."""

    def __init__(self):
        self.inside = False
        self.decorated: list = []
        self.durations: list[int] = []
        self.events: list[tuple[str, bool]] = []  # (what, inside the window)

    def module(self) -> types.ModuleType:
        spaces = types.ModuleType("spaces")
        spaces.GPU = self.gpu
        return spaces

    def gpu(self, task=None, *, duration=None):
        if task is None:
            return lambda function: self.gpu(function, duration=duration)
        assert inspect.isgeneratorfunction(task)  # so the real package streams what it yields
        self.decorated.append(task)

        def in_window(*args, **kwargs):
            self.durations.append(duration(*args, **kwargs) if callable(duration) else duration)
            args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))  # what the worker receives
            clear_listing_cache()  # a worker forked earlier knows none of this run's listings ...
            load_backbone.cache_clear()  # ... nor its backbone
            updates = task(*args, **kwargs)
            while True:
                self.inside = True
                try:
                    update = next(updates)
                except StopIteration:
                    return
                finally:
                    self.inside = False
                yield pickle.loads(pickle.dumps(update))  # what the app's process receives

        return in_window

    def spy(self, monkeypatch, owner, name: str, what: str) -> None:
        real = getattr(owner, name)

        def spied(*args, **kwargs):
            self.events.append((what, self.inside))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, spied)

    def sides(self, what: str) -> set[bool]:
        return {inside for event, inside in self.events if event == what}


@pytest.fixture
def window(monkeypatch, hub, tmp_path):  # noqa: F811
    """ZeroGPU on, the fake ``spaces`` importable, the Hub online through a fake download over the test cache."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import DryRunFileInfo

    import merging.io.hub as hub_module
    from merging.evaluation import datasets, evaluator, zeroshot
    from merging.experiment import driver

    fake = Window()
    monkeypatch.setenv(zerogpu.ENV, "true")
    monkeypatch.setitem(sys.modules, "spaces", fake.module())
    monkeypatch.setattr(zerogpu, "_installed", None)
    monkeypatch.setattr(zerogpu, "_APP_PID", -1)  # compute() behaves as in ZeroGPU's worker process
    monkeypatch.setattr(ContinualRun, "decode_on_cpu", False)  # install() sets it; restored afterwards
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")

    real_snapshot = hub_module._snapshot

    def snapshot(ref, patterns, *, dry_run=False, local_only=False):
        """Online: a listing, or a download, served from the test cache; offline: the cache itself."""
        fake.events.append(("local" if local_only else "listing" if dry_run else "download", fake.inside))
        folder = Path(real_snapshot(ref, ("*",), local_only=True))
        if not dry_run:
            return str(folder)
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        chosen = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
        return [DryRunFileInfo("c" * 40, 10, n, str(folder / n), False, True) for n in chosen]

    monkeypatch.setattr(hub_module, "_snapshot", snapshot)
    fake.spy(monkeypatch, datasets.ImageCache, "_decode", "decode")
    fake.spy(monkeypatch, zeroshot, "build_head", "head")
    fake.spy(monkeypatch, evaluator.Evaluator, "evaluate", "evaluate")
    fake.spy(monkeypatch, driver.Experiment, "merge_steps", "merge")
    from merging.methods.opcm import OPCM

    fake.spy(monkeypatch, OPCM, "_merge", "merge step")
    monkeypatch.setenv("MERGING_CACHE", str(tmp_path / "zerogpu-cache"))
    yield fake


def test_zero_gpu_is_detected_as_the_spaces_package_detects_it():
    for value in ("1", "true", "True", "t", " TRUE "):
        assert zerogpu.enabled({zerogpu.ENV: value})
    for value in ("", "0", "false", "no", "yes"):
        assert not zerogpu.enabled({zerogpu.ENV: value})
    assert not zerogpu.enabled({})


def test_downloads_decoding_and_heads_happen_before_the_window_and_the_compute_inside(window, tmp_path):
    config = hub_config()
    updates = list(zerogpu.stream(config, tmp_path / "run", layer=lab.LiveLayer()))
    assert len(window.decorated) == 1 and window.decorated[0] is zerogpu.compute
    assert window.durations == [zerogpu.gpu_seconds(config)] == [60]
    # before the window: the Hub listed and downloaded, every split decoded, every head built
    assert window.sides("listing") == window.sides("download") == {False}
    assert window.sides("decode") == window.sides("head") == {False}
    decoded = [e for e in window.events if e[0] == "decode"]
    assert len(decoded) == len(TASKS)
    # inside: the compute, with the Hub offline (the files come from the cache, nothing downloaded)
    assert window.sides("evaluate") == window.sides("merge") == window.sides("merge step") == {True}
    assert window.sides("local") == {True}
    assert ContinualRun.decode_on_cpu
    # the stream: one update before the window, then the run's own; the same numbers as without ZeroGPU
    assert updates[0].status.startswith("Checkpoints and images ready") and "waiting for a GPU" in updates[0].status
    assert updates[0].layers and updates[-1].completed == updates[-1].total == len(TASKS)
    assert "Done in" in updates[-1].status
    plain = ContinualRun(config).run().to_json()
    ours = updates[-1].results.to_json()
    assert ours["methods"]["opcm"]["accuracy"] == plain["methods"]["opcm"]["accuracy"]
    assert ours["reference"] == plain["reference"]


def test_a_bad_layer_or_checkpoint_fails_before_a_gpu_is_asked_for(window, tmp_path):
    from merging.errors import MergingError

    with pytest.raises(MergingError, match="no matrix 'block 99"):
        list(zerogpu.stream(hub_config(), tmp_path / "run", layer="block 99 · mlp.c_fc"))
    broken = hub_config()
    broken.checkpoints[1] = CheckpointSpec("testorg/no-such-checkpoint", broken.checkpoints[1].task)
    with pytest.raises(MergingError, match="testorg/no-such-checkpoint"):
        list(zerogpu.stream(broken, tmp_path / "run"))
    assert window.durations == []


def test_the_gpu_time_asked_for_grows_with_checkpoints_and_methods():
    mini8 = RunConfig("mini", [CheckpointSpec(str(i), "t") for i in range(8)], {"opcm": {}, "ties": {}})
    assert zerogpu.gpu_seconds(mini8, "folder", "hf", None) == 20 * 8 * 2
    assert zerogpu.gpu_seconds(RunConfig("mini", [CheckpointSpec("a", "t")])) == zerogpu.MIN_SECONDS
    many = RunConfig("mini", [CheckpointSpec(str(i), "t") for i in range(64)], {m: {} for m in ("opcm", "ties")})
    assert zerogpu.gpu_seconds(many) == zerogpu.MAX_SECONDS


def test_the_app_runs_through_the_window_on_zero_gpu(window):
    """build_app registers the GPU function before the app starts; Run streams through it."""
    demo = app.build_app(hosted=False)
    assert len(window.decorated) == 1
    handlers = demo.handlers
    text = "\n".join(f"{s.source}={s.task}" for s in SPEC)
    outputs = list(
        handlers.run_lab(
            None,
            "hf-hub:testorg/mini-clip",
            "",
            text,
            ["opcm"],
            24,
            "seen",
            "auto",
            None,
            "hf",
            False,
            *app.OPTION_DEFAULTS,
        )
    )
    statuses = [o[0] for o in outputs]
    assert "waiting for a GPU" in statuses[0] and "Done in" in statuses[-1]
    assert window.sides("evaluate") == {True} and window.sides("decode") == {False}
    assert window.durations == [60]


class _Recorder(importlib.abc.MetaPathFinder):
    """Records every attempt to import ``spaces`` (and serves the fake, so an attempt would not fail)."""

    def __init__(self):
        self.asked = 0

    def find_spec(self, name, path=None, target=None):
        if name != "spaces":
            return None
        self.asked += 1
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        return Window().module()

    def exec_module(self, module):
        pass


def test_without_zero_gpu_nothing_changes_and_spaces_is_never_imported(monkeypatch, tmp_path):
    monkeypatch.delenv(zerogpu.ENV, raising=False)
    monkeypatch.delitem(sys.modules, "spaces", raising=False)
    monkeypatch.setattr(zerogpu, "_installed", None)
    monkeypatch.setenv("MERGING_CACHE", str(tmp_path / "cache"))
    recorder = _Recorder()
    monkeypatch.setattr(sys, "meta_path", [recorder, *sys.meta_path])
    assert not zerogpu.setup()
    demo = app.build_app(hosted=False)
    specs = lab.preset_text("mini-8", "mini").splitlines()[:2]
    outputs = list(
        demo.handlers.run_lab(
            None, "mini", "", "\n".join(specs), ["opcm"], 16, "seen", "cpu", None, "hf", False, *app.OPTION_DEFAULTS
        )
    )
    assert "Done in" in outputs[-1][0] and "GPU" not in outputs[0][0]
    assert recorder.asked == 0 and "spaces" not in sys.modules and zerogpu._installed is None
    assert not ContinualRun.decode_on_cpu


def test_on_zero_gpu_a_run_on_cuda_reads_the_images_decoded_on_the_cpu(monkeypatch):
    """The hook in ContinualRun.prepare: its evaluator's image cache is the CPU one, whatever the device."""
    from merging.evaluation.datasets import ImageCache
    from merging.experiment import runner

    class FakeEvaluator:  # an evaluator bound to CUDA, without a GPU
        def __init__(self, *args, **kwargs):
            self.images = types.SimpleNamespace(on_gpu=True)

    monkeypatch.setattr(runner, "Evaluator", FakeEvaluator)
    monkeypatch.setattr(runner.ContinualRun, "_check_dataset", lambda *a: None)
    config = RunConfig("mini", lab.parse_checkpoint_lines(lab.preset_text("mini-8", "mini"))[:1], device="cpu")
    assert ContinualRun(config).evaluator.images.on_gpu  # off ZeroGPU: as the evaluator made it
    monkeypatch.setattr(runner.ContinualRun, "decode_on_cpu", True)
    images = ContinualRun(config).evaluator.images
    assert isinstance(images, ImageCache) and not images.on_gpu


def test_outside_the_window_device_auto_is_the_cpu_and_cuda_says_why(monkeypatch):
    """The Merge and Sweep tabs compute in the app's process, where ZeroGPU's CUDA cannot start."""
    import torch

    from merging.compute import devices
    from merging.errors import MergingError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as ZeroGPU's patched torch may say
    monkeypatch.setenv(zerogpu.ENV, "true")
    monkeypatch.delenv(devices.GPU_WINDOW_VARIABLE, raising=False)
    assert devices.resolve_device("auto").type == "cpu"
    with pytest.raises(MergingError, match="ZeroGPU"):
        devices.resolve_device("cuda")
    monkeypatch.setenv(devices.GPU_WINDOW_VARIABLE, "1")  # inside the window's worker
    assert devices.resolve_device("auto").type == "cuda"
    monkeypatch.delenv(zerogpu.ENV)  # not a ZeroGPU Space: unchanged
    monkeypatch.delenv(devices.GPU_WINDOW_VARIABLE)
    assert devices.resolve_device("auto").type == "cuda"
