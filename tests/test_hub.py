"""Hub loading, offline, through the real huggingface_hub against a cache built on disk."""

from __future__ import annotations

import fnmatch
import json
import time
from pathlib import Path

import pytest
import torch

from merging.cli.main import main
from merging.errors import MergingError
from merging.evaluation.backbones import load_backbone
from merging.evaluation.tasks import ASSETS, registry
from merging.experiment.runner import ContinualRun, RunConfig, parse_checkpoint, preset_checkpoints
from merging.io.checkpoints import load_encoder, open_encoder
from merging.io.hub import HubError, choose_model_files, clear_listing_cache, parse_hub_id

from .hubcache import add_folder

MINI = ASSETS / "mini"
TASKS = ("mini-land-cover", "mini-house-numbers", "mini-traffic-signs")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hub cache holding the mini backbone, three checkpoints and their datasets; offline mode on."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MERGING_CACHE", str(tmp_path / "merging-cache"))
    add_folder(cache, "testorg/mini-clip", MINI / "base")
    mini_tasks = json.loads((MINI / "tasks.json").read_text())["tasks"]
    extra = {"tasks": {}, "sets": {"hub-mini-3": [f"hub-{t}" for t in TASKS]}}
    for task in TASKS:
        add_folder(cache, f"testorg/clip-mini_hub-{task}", MINI / "checkpoints" / task)
        add_folder(cache, f"testorg/{task}", MINI / "datasets" / task, repo_type="dataset")
        entry = dict(mini_tasks[task])
        entry["dataset"] = {k: v for k, v in entry["dataset"].items() if k != "local"} | {"hub": f"testorg/{task}"}
        entry["checkpoint"] = f"hf-hub:testorg/clip-mini_hub-{task}"
        extra["tasks"][f"hub-{task}"] = entry
    registry_file = tmp_path / "hub-tasks.json"
    registry_file.write_text(json.dumps(extra))
    monkeypatch.setenv("MERGING_REGISTRY", str(registry_file))
    registry.cache_clear()
    load_backbone.cache_clear()
    clear_listing_cache()
    yield cache
    registry.cache_clear()
    load_backbone.cache_clear()
    clear_listing_cache()


def test_hub_ids_are_told_from_paths(tmp_path):
    assert parse_hub_id("tanganke/clip-vit-base-patch32_sun397").repo_id == "tanganke/clip-vit-base-patch32_sun397"
    ref = parse_hub_id("hf-hub:org/name@v1.0")
    assert (ref.repo_id, ref.revision) == ("org/name", "v1.0")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert parse_hub_id(str(tmp_path / "org" / "name")) is None
    assert parse_hub_id("just-a-name") is None and parse_hub_id("a/b/c") is None
    with pytest.raises(HubError, match="not a Hub repository id"):
        parse_hub_id("hf-hub:a/b/c")


def test_checkpoint_by_repository_id_equals_the_local_files(hub):
    local = load_encoder(MINI / "checkpoints" / TASKS[0])
    for source in (f"testorg/clip-mini_hub-{TASKS[0]}", f"hf-hub:testorg/clip-mini_hub-{TASKS[0]}@main"):
        reader = open_encoder(source)
        assert reader.source == source and "CLIPVisionModel" in reader.describe()
        remote = reader.load()
        assert set(remote) == set(local) and all(torch.equal(remote[k], local[k]) for k in local)


def test_backbone_by_repository_id_equals_the_embedded_one(hub):
    remote, local = load_backbone("hf-hub:testorg/mini-clip"), load_backbone("mini")
    assert remote.source != local.source and remote.preprocess == local.preprocess
    ours, theirs = remote.model.state_dict(), local.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_run_through_hub_ids_matches_the_same_run_from_local_paths(hub):
    hub_specs = [parse_checkpoint(f"testorg/clip-mini_hub-{t}") for t in TASKS]
    assert [s.task for s in hub_specs] == [f"hub-{t}" for t in TASKS]
    local_specs = preset_checkpoints("mini-8")
    local_specs = [next(s for s in local_specs if s.task == t) for t in TASKS]
    methods = {"opcm": {}, "task_arithmetic": {}}
    remote = (
        ContinualRun(RunConfig("hf-hub:testorg/mini-clip", hub_specs, methods, samples=64, device="cpu"))
        .run()
        .to_json()
    )
    local = ContinualRun(RunConfig("mini", local_specs, methods, samples=64, device="cpu")).run().to_json()
    rename = {f"hub-{t}": t for t in TASKS}
    for name in methods:
        renamed = [{rename[k]: v for k, v in step.items()} for step in remote["methods"][name]["accuracy"]]
        assert renamed == local["methods"][name]["accuracy"]
        assert remote["methods"][name]["acc"] == local["methods"][name]["acc"]
    for row in ("pretrained", "finetuned"):
        assert {rename[k]: v for k, v in remote["reference"][row].items()} == local["reference"][row]


def test_cli_merge_and_run_accept_hub_ids(hub, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    args = ["merge", "--method", "task_arithmetic", "--pretrained", "hf-hub:testorg/mini-clip", "--out", str(out)]
    for task in TASKS:
        args += ["--checkpoint", f"testorg/clip-mini_hub-{task}"]
    assert main(args) == 0
    local = tmp_path / "local.safetensors"
    args = ["merge", "--method", "task_arithmetic", "--pretrained", str(MINI / "base"), "--out", str(local)]
    for task in TASKS:
        args += ["--checkpoint", str(MINI / "checkpoints" / task)]
    assert main(args) == 0
    merged, expected = load_encoder(out), load_encoder(local)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    results = tmp_path / "r.json"
    args = ["run", "--backbone", "hf-hub:testorg/mini-clip", "--preset", "hub-mini-3", "--method", "opcm"]
    assert main([*args, "--samples", "32", "--device", "cpu", "--out", str(results)]) == 0
    recorded = json.loads(results.read_text())
    assert recorded["tasks"] == [f"hub-{t}" for t in TASKS]
    assert [c["source"] for c in recorded["config"]["checkpoints"]] == [
        f"hf-hub:testorg/clip-mini_hub-{t}" for t in TASKS
    ]


def test_uncached_ids_offline_fail_at_once_naming_the_id(hub, tmp_path):
    started = time.perf_counter()
    with pytest.raises(HubError, match=r"repository testorg/absent is not in the local Hub cache and offline mode"):
        open_encoder("testorg/absent")
    with pytest.raises(HubError, match=r"repository testorg/mini-clip@v2 is not in the local Hub cache"):
        load_backbone("hf-hub:testorg/mini-clip@v2")
    assert time.perf_counter() - started < 1.0
    task = registry().get(f"hub-{TASKS[0]}")
    missing = type(task.dataset)(**{**task.dataset.__dict__, "location": "testorg/absent-data"})
    from merging.evaluation.datasets import parquet_files

    with pytest.raises(MergingError, match=r"dataset of task .*: dataset testorg/absent-data is not in the local Hub"):
        parquet_files(type(task)(**{**task.__dict__, "dataset": missing}), "test")
    with pytest.raises(MergingError, match=r"dataset testorg/mini-land-cover: no parquet files for split 'validation'"):
        parquet_files(task, "validation")
    assert time.perf_counter() - started < 2.0


def test_a_repository_without_an_image_encoder_is_named(hub, tmp_path):
    from .hubcache import add_repo

    notes = tmp_path / "README.md"
    notes.write_text("no weights here")
    add_repo(hub, "testorg/empty", {"README.md": notes})
    with pytest.raises(HubError, match="no supported weights in testorg/empty"):
        open_encoder("testorg/empty")
    with pytest.raises(HubError, match=r"backbone hf-hub:testorg/empty: the repository lacks open_clip_config.json"):
        load_backbone("hf-hub:testorg/empty")


def test_choosing_files_to_download():
    assert choose_model_files(
        ["README.md", "config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5"]
    ) == [
        "config.json",
        "model.safetensors",
    ]
    sharded = [
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert choose_model_files(sharded) == sharded
    assert choose_model_files(
        ["open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    ) == ["open_clip_config.json", "open_clip_model.safetensors"]
    with pytest.raises(HubError, match=r"holds only pickle weights .*pytorch_model.bin.*the allow-pickle option"):
        choose_model_files(["config.json", "pytorch_model.bin"], source="org/old")
    assert choose_model_files(["config.json", "pytorch_model.bin"], allow_pickle=True) == [
        "config.json",
        "pytorch_model.bin",
    ]
    with pytest.raises(HubError, match="several safetensors files"):
        choose_model_files(["a.safetensors", "b.safetensors"], source="org/two")


def test_the_size_cap_is_checked_before_anything_is_downloaded(monkeypatch):
    """With the Hub reachable, the dry run's sizes are checked before the real download starts."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import DryRunFileInfo

    import merging.io.hub as hub_module

    calls = []

    def fake_snapshot(ref, patterns, *, dry_run=False, local_only=False):
        calls.append((tuple(patterns), dry_run, local_only))
        if not dry_run:
            return "/snapshot/of/org/big"
        return [
            DryRunFileInfo("c" * 40, 600, "config.json", "", False, True),
            DryRunFileInfo("c" * 40, 3_000_000_000, "model.safetensors", "", False, True),
            DryRunFileInfo("c" * 40, 3_000_000_000, "pytorch_model.bin", "", False, True),
        ]

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_module, "_snapshot", fake_snapshot)
    monkeypatch.setenv("MERGING_MAX_DOWNLOAD_GB", "2")
    clear_listing_cache()
    with pytest.raises(
        HubError,
        match=r"org/big: config.json, model.safetensors would download 3.00 GB, over the "
        r"2.0 GB cap",
    ):
        hub_module.model_folder("org/big")
    assert calls == [(("*",), True, False)]
    monkeypatch.setenv("MERGING_MAX_DOWNLOAD_GB", "10")
    calls.clear()
    assert hub_module.model_folder("org/big") == Path("/snapshot/of/org/big")
    assert calls[-1] == (("config.json", "model.safetensors"), False, False)  # only what is needed


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(
        MergingError,
        match=r"unknown backbone .vit-tiny.; available: mini, ViT-B-32, ViT-B-16, ViT-L-14, "
        r"openai/clip-vit-base-patch32, .*hf-hub:ORG/NAME",
    ):
        load_backbone("vit-tiny")


def test_hub_test_cache_layout_is_what_huggingface_hub_reads(hub):
    from huggingface_hub import scan_cache_dir

    repos = {(r.repo_id, r.repo_type) for r in scan_cache_dir(hub).repos}
    assert ("testorg/mini-clip", "model") in repos and (f"testorg/{TASKS[0]}", "dataset") in repos
    assert Path(hub, "models--testorg--mini-clip", "refs", "main").read_text()


def test_checkpoint_search_is_quiet_and_fast_without_the_hub(monkeypatch):
    from huggingface_hub import constants

    from merging.io.hub import search_checkpoints

    started = time.perf_counter()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert search_checkpoints("clip-vit-base-patch32", author="tanganke") == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert search_checkpoints("clip-vit-base-patch32", author="tanganke", timeout=3) == []
    assert time.perf_counter() - started < 4


def test_hub_refusals_are_translated_into_one_line_naming_the_id():
    from unittest.mock import Mock

    from huggingface_hub import errors

    from merging.io.hub import HubRef, _translate

    response = Mock(status_code=404, headers={}, url="https://huggingface.co/api/models/org/x")
    ref = HubRef("org/x", "v1")
    not_found = _translate(ref, errors.RepositoryNotFoundError("404", response=response))
    assert str(not_found) == "repository org/x@v1 not found on the Hub (or private: set HF_TOKEN)"
    gated = _translate(ref, errors.GatedRepoError("403", response=response))
    assert "is gated: accept its terms on the Hub and set HF_TOKEN" in str(gated)
    revision = _translate(ref, errors.RevisionNotFoundError("404", response=response))
    assert str(revision) == "repository org/x@v1: revision 'v1' not found"


def test_a_checkpoint_of_another_architecture_is_named_with_the_difference(hub, tmp_path):
    from .encoders import random_encoder, write_hf

    other = write_hf({k: v for k, v in random_encoder().items() if k != "proj"}, tmp_path / "tiny")
    add_folder(hub, "testorg/clip-tiny_hub-mini-land-cover", other)
    config = RunConfig(
        "hf-hub:testorg/mini-clip",
        [parse_checkpoint("testorg/clip-tiny_hub-mini-land-cover")],
        {"opcm": {}},
        samples=16,
        device="cpu",
    )
    with pytest.raises(
        MergingError, match=r"testorg/clip-tiny_hub-mini-land-cover .*\(a different architecture: width 32 vs 192"
    ):
        ContinualRun(config).prepare()


def fake_hub(monkeypatch, tmp_path, repositories):
    """Online mode against a fake ``_snapshot`` serving ``repositories`` (id → file names); records each call."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import DryRunFileInfo

    import merging.io.hub as hub_module

    calls = []

    def fake_snapshot(ref, patterns, *, dry_run=False, local_only=False):
        calls.append((ref.repo_id, ref.revision, tuple(patterns), dry_run))
        folder = tmp_path / "snapshots" / ref.repo_id / (ref.revision or "main")
        if dry_run:
            names = [n for n in repositories[ref.repo_id] if any(fnmatch.fnmatch(n, p) for p in patterns)]
            return [DryRunFileInfo("c" * 40, 10, n, str(folder / n), (folder / n).is_file(), True) for n in names]
        for name in patterns:  # the real download is asked for exactly the chosen files
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(b"x" * 10)
        return str(folder)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_module, "_snapshot", fake_snapshot)
    clear_listing_cache()
    return calls


def test_a_repository_is_listed_once_per_revision_and_split_per_process(monkeypatch, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from merging.io.hub import dataset_folder, dataset_split_patterns, model_folder

    data = ["data/test-00000-of-00001.parquet", "data/train-00000-of-00001.parquet", "README.md"]
    calls = fake_hub(monkeypatch, tmp_path, {"org/clip": ["config.json", "model.safetensors"], "org/data": data})

    def listings() -> list[tuple]:
        return [call[:3] for call in calls if call[3]]

    first = model_folder("org/clip")
    assert (first / "model.safetensors").is_file() and len(calls) == 2  # one listing, one download
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: model_folder("org/clip"), range(8))) == [first] * 8
    assert len(calls) == 2
    assert model_folder("org/clip@v2") != first and [r for _, r, _ in listings()] == [None, "v2"]
    for _ in range(3):
        assert (dataset_folder("org/data", "test") / data[0]).is_file()
        assert (dataset_folder("org/data", "train") / data[1]).is_file()
    split_listings = [patterns for repo, _, patterns in listings() if repo == "org/data"]
    assert len(split_listings) == 2 and split_listings == [tuple(dataset_split_patterns(s)) for s in ("test", "train")]
    clear_listing_cache()
    model_folder("org/clip")
    assert listings()[-1] == ("org/clip", None, ("*",))  # after clearing, listed afresh


def test_a_remembered_listing_whose_files_went_missing_is_resolved_afresh(monkeypatch, tmp_path):
    from merging.io.hub import model_folder

    calls = fake_hub(monkeypatch, tmp_path, {"org/clip": ["config.json", "model.safetensors"]})
    folder = model_folder("org/clip")
    (folder / "model.safetensors").unlink()  # e.g. the Hub cache was pruned meanwhile
    assert (model_folder("org/clip") / "model.safetensors").is_file()
    assert [c[3] for c in calls] == [True, False, True, False]


def test_images_already_in_memory_need_no_hub_call(hub, tmp_path, monkeypatch):
    import merging.io.hub as hub_module
    from merging.evaluation.backbones import Preprocess
    from merging.evaluation.datasets import ImageCache

    calls = []
    real = hub_module._snapshot
    monkeypatch.setattr(hub_module, "_snapshot", lambda *a, **k: calls.append(a[0].repo_id) or real(*a, **k))
    task, spec = registry().get(f"hub-{TASKS[0]}"), Preprocess(image_size=8)
    cache = ImageCache(tmp_path / "images-cache")
    data = cache.load(task, "test", spec, limit=4)
    assert calls == [f"testorg/{TASKS[0]}"]
    assert ImageCache(tmp_path / "images-cache").load(task, "test", spec, limit=4).images.equal(data.images)
    assert len(calls) == 1  # a new cache (read from disk) reuses the process's listing
    clear_listing_cache()
    assert cache.load(task, "test", spec, limit=4) is data and len(calls) == 1  # memory: no Hub call at all
    assert cache.load(task, "test", spec, limit=5) is not data and len(calls) == 2  # another sample: resolved
