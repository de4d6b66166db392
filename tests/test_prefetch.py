"""Work ahead: the next checkpoint and the next task's images prepared while the current step computes."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.errors import CheckpointError
from merging.evaluation.datasets import ImageCache
from merging.evaluation.tasks import registry
from merging.experiment.prefetch import Prefetcher
from merging.experiment.runner import CheckpointSpec, ContinualRun, RunConfig, preset_checkpoints


def test_a_result_computed_ahead_is_handed_over_once():
    prefetcher = Prefetcher()
    calls = []
    prefetcher.ahead("a", lambda: calls.append(threading.current_thread().name) or 41)
    assert prefetcher.result("a", lambda: 0) == 41
    assert len(calls) == 1 and calls[0].startswith("merging-prefetch")  # it ran on the background thread
    assert prefetcher.result("a", lambda: 7) == 7  # handed over once; asked again, it is done here
    prefetcher.close()


def test_the_error_of_work_ahead_is_raised_where_the_result_is_asked_for():
    prefetcher = Prefetcher()

    def broken():
        raise CheckpointError("checkpoint b has NaN or Inf values in w")

    prefetcher.ahead("b", broken)
    with pytest.raises(CheckpointError, match="checkpoint b has NaN"):
        prefetcher.result("b", lambda: None)
    prefetcher.warm("c", broken)  # a warm-up's error is dropped: the foreground redoes that work
    prefetcher.close()


def test_disabled_everything_runs_in_the_foreground_in_order():
    prefetcher = Prefetcher(enabled=False)
    calls = []
    prefetcher.ahead("a", lambda: calls.append("ahead"))
    prefetcher.warm("b", lambda: calls.append("warm"))
    assert calls == [] and prefetcher.result("a", lambda: threading.current_thread().name) == "MainThread"
    prefetcher.close()


def test_close_cancels_what_has_not_started_and_waits_for_what_has():
    prefetcher = Prefetcher()
    started, release, ran = threading.Event(), threading.Event(), []

    def slow():
        started.set()
        release.wait(5)
        ran.append("slow")

    prefetcher.warm("slow", slow)
    prefetcher.warm("queued", lambda: ran.append("queued"))
    started.wait(5)
    threading.Timer(0.05, release.set).start()
    prefetcher.close()  # returns once the running work is done; the queued one never runs
    assert ran == ["slow"]


def test_one_split_is_decoded_once_when_two_threads_ask_at_once(tmp_path):
    task = registry().get("mini-land-cover")
    cache = ImageCache(tmp_path / "cache")
    from merging.evaluation.backbones import Preprocess

    spec = Preprocess(32)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.load(task, "test", spec, 40))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.decoded == 40 and len(results) == 3 and all(r is results[0] for r in results)


def _config(checkpoints):
    return RunConfig(checkpoints=checkpoints, methods={"opcm": {}, "otmf": {"steps": 2}}, samples=24, device="cpu")


def test_working_ahead_changes_no_number(tmp_path):
    checkpoints = preset_checkpoints("mini-8")[:3]
    runs = {}
    for prefetch in (True, False):
        run = ContinualRun(_config(checkpoints), cache_dir=tmp_path / f"cache-{prefetch}", prefetch=prefetch)
        list(run.steps())
        runs[prefetch] = run.results().to_json()
        assert run.evaluator.images.decoded == sum(  # every split decoded exactly once, ahead or not
            len(run.evaluator.task_images(t, s).labels)
            for t in run.tasks
            for s in {t.dataset.split, t.dataset.train_split}
        )
    for key in ("reference", "tasks"):
        assert runs[True][key] == runs[False][key]
    for method in ("opcm", "otmf"):
        assert runs[True]["methods"][method]["accuracy"] == runs[False]["methods"][method]["accuracy"]


def test_a_broken_checkpoint_read_ahead_fails_as_it_would_in_order(tmp_path):
    good = preset_checkpoints("mini-8")[:3]
    broken = tmp_path / f"broken-{good[1].task}"
    shutil.copytree(good[1].source, broken)
    weights = broken / "model.safetensors"
    state = load_file(weights)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, weights)
    checkpoints = [good[0], CheckpointSpec(str(broken), good[1].task), good[2]]
    messages = []
    for prefetch in (True, False):
        run = ContinualRun(_config(checkpoints), cache_dir=tmp_path / f"cache-{prefetch}", prefetch=prefetch)
        with pytest.raises(CheckpointError) as failure:
            list(run.steps())
        messages.append(str(failure.value))
    assert messages[0] == messages[1] and f"checkpoint {broken} has NaN or Inf values" in messages[0]


def test_by_default_a_run_works_ahead_only_where_it_pays(monkeypatch, tmp_path):
    run = ContinualRun(_config(preset_checkpoints("mini-8")[:2]), cache_dir=tmp_path)
    monkeypatch.setenv("MERGING_THREADS", "2")  # two cores, no GPU: the background would only compete
    assert run.device.type == "cpu" and not run._works_ahead()
    monkeypatch.setenv("MERGING_THREADS", "8")
    assert run._works_ahead()
    run.prefetch = False  # asked for explicitly: as asked
    assert not run._works_ahead()
