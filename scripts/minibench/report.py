"""Measure the built mini benchmark the way issue 13 asks, and write assets/mini/README.md and report.json.

Everything is measured with the lab's own code: each of the papers' ten orders (seeds 42–51,
``random.seed(s)`` then shuffle) is one :class:`ContinualRun` of every registered method with
its default options, plus one run of OTMF's mask ablation; all runs share one evaluator (its
cached images and zero-shot heads) and the disk-cached reference rows. The numbers stand
beside the real CLIP ViT-B/32 results of ``assets/reference/reference_results.json`` (8 tasks
for mini-8, 14 for mini-12), together with the task-vector statistics of
:mod:`scripts.minibench.statistics` and the values papers publish for them.

OTMF is run once per order with head tuning on: tuning a head never changes the merged
encoder, and every step is also measured with the zero-shot heads, so that one run gives both
the default OTMF (zero-shot heads) and the head-tuning variant (tests/test_mini_statistics.py
checks the equality). The mask ablation (``masks=off``, head tuning on) is a second run.

``python -m scripts.minibench.report --orders 2 --presets mini-8 --write-to /tmp/r`` is a quick
check that writes elsewhere; ``MINIBENCH_REPORT_ORDERS=N`` does the same for the build's
``--report-only``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics as stats
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from merging.evaluation.backbones import load_backbone
from merging.evaluation.datasets import parquet_files
from merging.evaluation.evaluator import Evaluator
from merging.evaluation.tasks import Task, registry
from merging.experiment.results import MethodResults
from merging.experiment.runner import ContinualRun, RunConfig, preset_checkpoints, shuffled
from merging.io.checkpoints import open_encoder
from merging.methods import METHODS
from scripts.minibench.statistics import ALL_MATRICES, PUBLISHED, TaskVectorStatistics, task_vector_statistics

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "assets" / "mini"
REFERENCE = ROOT / "assets" / "reference" / "reference_results.json"
ORDER_SEEDS = tuple(range(42, 52))  # the papers' ten orders
ORDERS_VARIABLE = "MINIBENCH_REPORT_ORDERS"
REAL_BACKBONE = "ViT-B/32"
PRESETS = ("mini-8", "mini-12")
REAL_TASKS = {"mini-8": "8", "mini-12": "14"}  # each mini preset beside the real benchmark it mirrors
GOAL_METHODS = ("opcm", "task_arithmetic", "weight_average", "magmax")
BASELINES = ("task_arithmetic", "weight_average", "magmax")  # "the best of continual TA, WA and MagMax"
GOAL_GAP = 3.0  # points of ACC by which OPCM must beat the best baseline
GOAL_TOLERANCE = 0.10  # on the normalised accuracy
OTMF = "otmf"
# OTMF's 2 × 2 ablation: the run (and its options) that measures it, and which heads
OTMF_VARIANTS = {
    "masks on, head tuning on": ("main", "tuned"),
    "masks on, head tuning off (default)": ("main", "zero-shot"),
    "masks off, head tuning on": ("masks_off", "tuned"),
    "masks off, head tuning off": ("masks_off", "zero-shot"),
}
OTMF_RUN_OPTIONS = {"main": {"head_tuning": "on"}, "masks_off": {"masks": "off", "head_tuning": "on"}}
# What the OTMF paper (arXiv 2511.19561) claims on ViT-B/32, 8 tasks (assets/reference, "otmf_claimed"); its
# ablations take one component away from the full method, so "no masks" keeps head tuning
OTMF_PAPER = {
    "masks on, head tuning on": "ViT-B/32",
    "masks off, head tuning on": "ablation_no_masks",
    "masks on, head tuning off (default)": "ablation_no_head_finetuning",
}


# ---------------------------------------------------------------- small helpers


def order_seeds(count: int | None = None) -> tuple[int, ...]:
    """The first ``count`` of the papers' orders (all ten by default, or ``MINIBENCH_REPORT_ORDERS``)."""
    if count is None:
        value = os.environ.get(ORDERS_VARIABLE, "").strip()
        count = int(value) if value else len(ORDER_SEEDS)
    if not 1 <= count <= len(ORDER_SEEDS):
        raise ValueError(f"orders must be 1 to {len(ORDER_SEEDS)}, not {count}")
    return ORDER_SEEDS[:count]


def normalised(acc: float, zero_shot: float, finetuned: float) -> float:
    """(acc − zero-shot) / (fine-tuned − zero-shot): the share of fine-tuning's gain a merge keeps.

    It puts the mini and the real benchmark on one scale, whatever their absolute accuracies.
    """
    return (acc - zero_shot) / (finetuned - zero_shot)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return stats.fmean(values), (stats.stdev(values) if len(values) > 1 else 0.0)


@contextmanager
def thread_budget(threads: int) -> Iterator[None]:
    """Let the runs use ``threads`` cores (the runner otherwise takes every core the process may use).

    The runner sets each run's thread count to its share of ``MERGING_THREADS`` (default: all
    cores), which would undo ``--threads 1`` at the first step; an explicit setting is kept.
    """
    previous = os.environ.get("MERGING_THREADS")
    if previous is None:
        os.environ["MERGING_THREADS"] = str(threads)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MERGING_THREADS", None)


def real_results(path: Path = REFERENCE) -> dict[str, Any]:
    return json.loads(path.read_text())


def published_key(method: str) -> str | None:
    """The key of ``method`` in the published results (its ``published_name``), None if unpublished."""
    return METHODS[method].published_name


# ---------------------------------------------------------------- the runs


@dataclass
class Series:
    """ACC and BWT (in %) of one method (or variant) over the orders."""

    acc: list[float] = field(default_factory=list)
    bwt: list[float] = field(default_factory=list)

    def add(self, acc: float | None, bwt: float | None) -> None:
        self.acc.append(100 * float(acc if acc is not None else math.nan))
        self.bwt.append(100 * float(bwt if bwt is not None else math.nan))

    def to_json(self) -> dict[str, Any]:
        acc_mean, acc_std = mean_std(self.acc)
        bwt_mean, bwt_std = mean_std(self.bwt)
        return {
            "acc": self.acc,
            "bwt": self.bwt,
            "acc_mean": acc_mean,
            "acc_std": acc_std,
            "bwt_mean": bwt_mean,
            "bwt_std": bwt_std,
        }


@dataclass
class OrderRuns:
    """What the ten orders of one preset gave: every method, OTMF's variants, references, costs."""

    preset: str
    seeds: tuple[int, ...]
    methods: dict[str, Series]
    otmf: dict[str, Series]
    reference: dict[str, dict[str, float]]
    head_tuning: dict[str, int]  # task -> labelled images its head was tuned on
    seconds: list[float]  # per order, both runs


def _otmf_series(result: MethodResults, heads: str) -> tuple[float | None, float | None]:
    if heads == "tuned":
        return result.acc, result.bwt
    return result.acc_zeroshot_head, result.bwt_zeroshot_head


def run_orders(preset: str, seeds: Sequence[int], evaluator: Evaluator) -> OrderRuns:
    """Every registered method (default options) over the orders, each order in one shared-evaluation run.

    OTMF runs with head tuning on; its default (zero-shot heads) is read from the same run.
    """
    checkpoints = preset_checkpoints(preset)
    methods = {name: Series() for name in METHODS}
    otmf = {name: Series() for name in OTMF_VARIANTS}
    reference: dict[str, dict[str, float]] = {}
    head_tuning: dict[str, int] = {}
    seconds = []
    for seed in seeds:
        started = time.perf_counter()
        order = shuffled(checkpoints, seed)
        options = {name: dict(OTMF_RUN_OPTIONS["main"]) if name == OTMF else {} for name in METHODS}
        config = RunConfig(checkpoints=order, methods=options, device="cpu", order_seed=seed)
        results = {"main": ContinualRun(config, evaluator).run()}
        ablation = RunConfig(
            checkpoints=order, methods={OTMF: OTMF_RUN_OPTIONS["masks_off"]}, device="cpu", order_seed=seed
        )
        results["masks_off"] = ContinualRun(ablation, evaluator).run()
        seconds.append(time.perf_counter() - started)
        reference = results["main"].reference
        for name, series in methods.items():
            data = results["main"].methods[name]
            series.add(*(_otmf_series(data, "zero-shot") if name == OTMF else (data.acc, data.bwt)))
        for name, (run, heads) in OTMF_VARIANTS.items():
            otmf[name].add(*_otmf_series(results[run].methods[OTMF], heads))
        for step in results["main"].methods[OTMF].steps:
            for tuned in step.diagnostics.get("head_tuning", []):
                head_tuning[tuned["task"]] = int(tuned["images"])
    return OrderRuns(preset, tuple(seeds), methods, otmf, reference, head_tuning, seconds)


def _cap(samples: int | None) -> str:
    if samples is None:
        return "the whole split: --samples 0"
    return f"the same sample cap as the test sets, {samples} images"


def head_tuning_split(tasks: Sequence[str], tuned: Mapping[str, int], evaluator: Evaluator) -> dict[str, Any]:
    """Per task: classes, train split rows, what the runner loads of it, images the head was tuned on.

    The runner hands OTMF ``evaluator.task_images(task, train_split)``, the same deterministic
    sample (at most ``evaluator.samples`` rows) as the test sets; OTMF tunes on
    ``ceil(head_fraction × loaded)`` of those.
    """
    rows = {}
    for name in tasks:
        task = registry().get(name)
        split = task.dataset.train_split
        total = split_rows(task, split) if split else 0
        loaded = len(evaluator.task_images(task, split).labels) if split else 0
        images = tuned.get(name, 0)
        rows[name] = {
            "classes": len(task.classnames),
            "train_rows": total,
            "loaded": loaded,
            "tuned_on": images,
            "per_class": images / len(task.classnames),
        }
    return {
        "sample_cap": evaluator.samples,
        "head_fraction": METHODS[OTMF].parse_options({})["head_fraction"],
        "tasks": rows,
    }


def split_rows(task: Task, split: str) -> int:
    """Rows of a split, from the parquet footers (nothing decoded)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(task, split))


def preset_statistics(preset: str, pretrained: Mapping[str, torch.Tensor]) -> TaskVectorStatistics:
    specs = preset_checkpoints(preset)
    return task_vector_statistics(pretrained, [open_encoder(s.source) for s in specs], [s.task for s in specs])


# ---------------------------------------------------------------- the comparison


def method_row(
    name: str,
    series: Series,
    zero_shot: float,
    finetuned: float,
    real_acc: Mapping[str, float],
    real_bwt: Mapping[str, float],
) -> dict[str, Any]:
    """One method's row: its ACC/BWT over the orders, normalised, beside its published numbers if any."""
    row = series.to_json()
    row["normalised"] = normalised(row["acc_mean"], zero_shot, finetuned)
    key = published_key(name)
    row["published_name"] = key
    row["real_acc"] = real_acc.get(key) if key else None
    row["real_bwt"] = real_bwt.get(key) if key else None
    row["real_normalised"] = (
        normalised(row["real_acc"], real_acc["pretrained"], real_acc["finetuned"])
        if row["real_acc"] is not None
        else None
    )
    return row


def add_methods(out: Path, build: dict, names: Sequence[str], write_to: Path | None = None) -> dict[str, Any]:
    """Measure only ``names`` (default options) over the report's orders and presets, and add their rows.

    For a method registered after the last full report: the other methods' numbers do not
    change, so they are kept from ``report.json`` rather than measured again.
    """
    require_shipped_location(out)
    measured = json.loads((out / "report.json").read_text())
    seeds = tuple(measured["orders"])
    real = real_results()
    registry.cache_clear()
    load_backbone.cache_clear()
    with thread_budget(torch.get_num_threads()):
        evaluator = Evaluator(load_backbone("mini"), "cpu", samples=None)
        for preset, data in measured["presets"].items():
            clock = time.perf_counter()
            series = {name: Series() for name in names}
            for seed in seeds:
                order = shuffled(preset_checkpoints(preset), seed)
                config = RunConfig(checkpoints=order, methods={n: {} for n in names}, device="cpu", order_seed=seed)
                results = ContinualRun(config, evaluator).run()
                for name in names:
                    series[name].add(results.methods[name].acc, results.methods[name].bwt)
            count = REAL_TASKS[preset]
            for name in names:
                data["methods"][name] = method_row(
                    name,
                    series[name],
                    data["pretrained_mean"],
                    data["finetuned_mean"],
                    real["ACC"][REAL_BACKBONE][count],
                    real["BWT"][REAL_BACKBONE][count],
                )
            measured["seconds"][f"added {', '.join(names)} {preset}"] = time.perf_counter() - clock
    first = next(iter(measured["presets"].values()))
    measured["acc"] = {m: row["acc_mean"] for m, row in first["methods"].items()}
    measured["checks"] = checks(measured["presets"], measured["reference_all_tasks"])
    destination = write_to or out
    destination.mkdir(parents=True, exist_ok=True)
    (destination / "report.json").write_text(json.dumps(measured, indent=1) + "\n")
    (destination / "README.md").write_text(readme(out, build, measured))
    return measured


def compare(runs: OrderRuns, real: Mapping[str, Any]) -> dict[str, Any]:
    """A preset's numbers beside the real ones: per method ACC/BWT and normalised accuracy, and the gap."""
    count = REAL_TASKS[runs.preset]
    real_acc, real_bwt = real["ACC"][REAL_BACKBONE][count], real["BWT"][REAL_BACKBONE][count]
    tasks = list(runs.reference["pretrained"])
    zero_shot = 100 * stats.fmean(runs.reference["pretrained"][t] for t in tasks)
    finetuned = 100 * stats.fmean(runs.reference["finetuned"][t] for t in tasks)
    methods = {
        name: method_row(name, series, zero_shot, finetuned, real_acc, real_bwt)
        for name, series in runs.methods.items()
    }
    best = max(BASELINES, key=lambda m: methods[m]["acc_mean"])
    real_best = max(BASELINES, key=lambda m: methods[m]["real_acc"])
    per_order = [o - max(b) for o, *b in zip(*(runs.methods[m].acc for m in ("opcm", *BASELINES)), strict=True)]
    return {
        "tasks": tasks,
        "real_tasks": int(count),
        "orders": list(runs.seeds),
        "pretrained_mean": zero_shot,
        "finetuned_mean": finetuned,
        "real_pretrained": real_acc["pretrained"],
        "real_finetuned": real_acc["finetuned"],
        "reference": runs.reference,
        "methods": methods,
        "otmf": {name: s.to_json() for name, s in runs.otmf.items()},
        "gap": {
            "mini": methods["opcm"]["acc_mean"] - methods[best]["acc_mean"],
            "mini_best_baseline": best,
            "mini_per_order": per_order,
            "real": methods["opcm"]["real_acc"] - methods[real_best]["real_acc"],
            "real_best_baseline": real_best,
        },
        "seconds_per_order": runs.seconds,
    }


def checks(presets: Mapping[str, dict[str, Any]], reference12: Mapping[str, Mapping[str, float]]) -> dict[str, bool]:
    """The benchmark's checks (kept from before) and the issue's goals, each named with its threshold."""
    result = {
        "every fine-tuned model >= 90% on its own task (all 12 tasks)": min(reference12["finetuned"].values()) >= 0.9
    }
    for preset, data in presets.items():
        gap = data["finetuned_mean"] - data["pretrained_mean"]
        result[f"{preset}: zero-shot mean at least 25 points below the fine-tuned mean"] = gap >= 25
        result[f"{preset}: every method's mean ACC between zero-shot and fine-tuned"] = all(
            data["pretrained_mean"] < m["acc_mean"] < data["finetuned_mean"] for m in data["methods"].values()
        )
    for preset, data in presets.items():
        kind = "goal" if preset == "mini-8" else "stretch"
        result[f"{kind} ({preset}): OPCM beats the best of C-TA/WA/MagMax by >= {GOAL_GAP:g} points"] = (
            data["gap"]["mini"] >= GOAL_GAP
        )
        for method in GOAL_METHODS:
            row = data["methods"][method]
            result[
                f"{kind} ({preset}): {method} normalised accuracy within ±{GOAL_TOLERANCE:.2f} of the real "
                f"{data['real_tasks']}-task value"
            ] = abs(row["normalised"] - row["real_normalised"]) <= GOAL_TOLERANCE
    return result


# ---------------------------------------------------------------- the report


def require_shipped_location(out: Path) -> None:
    """Refuse to report on a benchmark outside ``assets/mini``.

    The report measures through the library, and the library loads the ``mini`` backbone and
    presets from ``assets/mini`` only. A benchmark built anywhere else would get the shipped
    benchmark's numbers under its own name.
    """
    if out.resolve() != SHIPPED.resolve():
        raise SystemExit(
            f"the report measures the benchmark the library loads, {SHIPPED}; {out} is elsewhere "
            "(build there with --no-report, or build into assets/mini)"
        )


def write_report(
    out: Path,
    build: dict,
    seeds: Sequence[int] | None = None,
    presets: Sequence[str] = PRESETS,
    write_to: Path | None = None,
) -> dict[str, Any]:
    """Measure everything, write ``README.md`` and ``report.json`` (into ``write_to``, default ``out``).

    Returns the measurements; ``acc`` (mean ACC per method on the first preset, mini-8 by default)
    and ``checks`` are what the build prints.
    """
    require_shipped_location(out)
    registry.cache_clear()
    load_backbone.cache_clear()
    seeds = tuple(seeds) if seeds is not None else order_seeds()
    started = time.perf_counter()
    with thread_budget(torch.get_num_threads()):
        backbone = load_backbone("mini")
        # Every image of each split (--samples 0): the test splits hold 500 images, as the default
        # cap, while OTMF's heads get their 25 % of the whole labelled train split.
        evaluator = Evaluator(backbone, "cpu", samples=None)
        real = real_results()
        timings: dict[str, float] = {}
        compared, statistics, head_tuning = {}, {}, {}
        for preset in presets:
            clock = time.perf_counter()
            runs = run_orders(preset, seeds, evaluator)
            compared[preset] = compare(runs, real)
            head_tuning[preset] = head_tuning_split(compared[preset]["tasks"], runs.head_tuning, evaluator)
            timings[f"orders {preset}"] = time.perf_counter() - clock
            clock = time.perf_counter()
            statistics[preset] = preset_statistics(preset, backbone.visual_state())
            timings[f"statistics {preset}"] = time.perf_counter() - clock
        # every fine-tuned model's accuracy on its own task, for the 90 % check (the mini-12 runs have them)
        everything = (
            compared["mini-12"]["reference"]
            if "mini-12" in compared
            else ContinualRun(
                RunConfig(checkpoints=preset_checkpoints("mini-12"), methods={"task_arithmetic": {}}, device="cpu"),
                evaluator,
            ).references
        )
    timings["total"] = time.perf_counter() - started
    first = compared[presets[0]]
    measured = {
        "schema": 1,
        "orders": list(seeds),
        "threads": torch.get_num_threads(),
        "seconds": timings,
        "acc": {m: row["acc_mean"] for m, row in first["methods"].items()},
        "presets": compared,
        "head_tuning": head_tuning,
        "statistics": {p: s.to_json() for p, s in statistics.items()},
        "published_statistics": [asdict(p) for p in PUBLISHED],
        "reference_all_tasks": everything,
        "checks": checks(compared, everything),
    }
    destination = write_to or out
    destination.mkdir(parents=True, exist_ok=True)
    (destination / "report.json").write_text(json.dumps(measured, indent=1) + "\n")
    (destination / "README.md").write_text(readme(out, build, measured))
    return measured


def _phases(seconds: dict) -> str:
    if "pretrain" not in seconds:
        return ""
    reused = " (measured in the previous build, whose base this one reused)" if seconds.get("pretrain_reused") else ""
    return (
        f" (drawing {seconds['draw'] / 60:.1f} min, pretraining {seconds['pretrain'] / 60:.1f} min{reused}, "
        f"fine-tuning {seconds['finetune'] / 60:.1f} min)"
    )


def _recipe_lines(build: dict, config: dict) -> list[str]:
    """What the base and the checkpoints are; the recipe's own words when its keys are the known ones."""
    vision, text = config["vision_cfg"], config["text_cfg"]
    tower = (
        f"image tower: ViT, {vision['image_size']}×{vision['image_size']} images, patch {vision['patch_size']}, "
        f"width {vision['width']}, {vision['layers']} blocks; text tower: width {text['width']}, {text['layers']} "
        f"blocks, open_clip's BPE tokenizer; embedding {config['embed_dim']}"
    )
    recipe = build.get("recipe", {})
    try:
        return [
            f"- `base/`: a tiny CLIP in open_clip's architecture and Hub format ({tower}), pretrained contrastively "
            f'with open_clip\'s `ClipLoss` on captioned images of all twelve concepts drawn in a shifted "web" style '
            f"({100 * recipe['task_style']:.0f}% in the benchmark's own style), with "
            f"{100 * recipe['caption_noise']:.0f}% of the captions naming a wrong class, for "
            f"{recipe['pretrain_epochs']} epochs{_corpus(recipe)}{_text_storage(recipe)}.",
            "- `checkpoints/<task>/`: the image encoder fine-tuned on each task in the Hugging Face CLIPVisionModel "
            "layout (config.json + model.safetensors), like `tanganke/clip-vit-*_<task>`: only the image tower "
            f"trains, with the task's zero-shot head and the projection frozen ({_finetuning(recipe)})"
            f"{_storage(build)}.",
            *_capture_lines(recipe),
        ]
    except (KeyError, TypeError, ValueError):
        listed = ", ".join(f"{k} {v}" for k, v in recipe.items()) or "see build_report.json"
        return [
            f"- `base/`: a tiny CLIP in open_clip's architecture and Hub format ({tower}), pretrained contrastively.",
            "- `checkpoints/<task>/`: the image encoder fine-tuned on each task in the Hugging Face CLIPVisionModel "
            f"layout (config.json + model.safetensors), like `tanganke/clip-vit-*_<task>`. Recipe: {listed}.",
        ]


def _finetuning(recipe: dict) -> str:
    """How the checkpoints were fine-tuned, in the recipe's own words (a KeyError for builds that
    predate the recorded recipe, which ``_recipe_lines`` then lists as recorded)."""
    from scripts.minibench.build import describe_recipe

    return f"{describe_recipe(recipe['finetune'])}, over {recipe['finetune_images']:,} freshly drawn images"


def _corpus(recipe: dict) -> str:
    images = recipe.get("pretrain_images_per_task")
    others = recipe.get("other_concepts")
    corpus = f" over {images:,} images per concept" if images else ""
    if others:
        corpus += (
            f", and {recipe['other_images_per_concept']:,} images of each of {others} other concepts no task asks "
            "about (`scripts/minibench/concepts.py`)"
        )
    return corpus


def _text_storage(recipe: dict) -> str:
    dtype = recipe.get("text_tower_dtype")
    return (
        f"; its text tower is stored in {dtype} and the zero-shot heads come from the stored weights"
        if dtype and dtype != "float32"
        else ""
    )


def _storage(build: dict) -> str:
    rounding = build.get("storage_rounding")
    dtype = build.get("recipe", {}).get("checkpoint_dtype")
    if not rounding or not dtype:
        return ""
    return (
        f"; stored in {dtype}, which moves each task vector by at most {100 * max(rounding.values()):.1f} % of its norm"
    )


def _capture_lines(recipe: dict) -> list[str]:
    """Which tasks' benchmark images are captured at low resolution, and the train split's size."""
    lines = []
    native = recipe.get("native_resolution") or {}
    low = {task: side for task, side in native.items() if side < 32}
    if low:
        sides = sorted(set(low.values()))
        lines.append(
            "- The benchmark images of "
            + ", ".join(low)
            + f" are captured at {'/'.join(map(str, sides))} px and upscaled to 32 px, as the real low-resolution "
            "datasets (MNIST, SVHN, GTSRB, EuroSAT, EMNIST) are upscaled to CLIP's 224 px; the pretraining images "
            "are not."
        )
    if "train_per_class" in recipe:
        lines.append(
            f"- Train splits hold {recipe['train_per_class']} labelled images per class, so OTMF's head tuning "
            f"(25 % of the split) gets {recipe['train_per_class'] // 4} per class."
        )
    return lines


def _what_it_is(out: Path, build: dict) -> list[str]:
    from scripts.minibench.generators import TASKS

    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in out.iterdir() if p.is_dir()}
    total = sum(sizes.values()) + sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    config = json.loads((out / "base" / "open_clip_config.json").read_text())["model_cfg"]
    first = registry().get(next(iter(build["zero_shot"])))
    splits = {split: split_rows(first, split) for split in (first.dataset.split, first.dataset.train_split) if split}
    dtype = str(open_encoder(preset_checkpoints("mini-12")[0].source).dtype).removeprefix("torch.")
    specs = {t.name: t for t in TASKS}
    lines = [
        "# The mini benchmark",
        "",
        "A miniature of the continual-merging benchmark that runs offline, on a CPU, in seconds. Everything here is",
        f"built by `python scripts/build_mini_benchmark.py` (seed {build.get('recipe', {}).get('seed', 0)}); do not "
        "edit by hand.",
        "",
        "## What it is",
        "",
        *_recipe_lines(build, config),
        "- `datasets/<task>/data/{test,train}-00000-of-00001.parquet`: "
        + " and ".join(f"{n} {s}" for s, n in splits.items())
        + " images per task (JPEG bytes + label; counts of the first task), in the Hub's parquet layout.",
        "- `tasks.json`: the registry entries (class names, templates, data, checkpoint) and the presets "
        "`mini-8`, `mini-12`.",
        "",
        "| task | mirrors | classes | zero-shot | fine-tuned |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in build["zero_shot"]:
        spec = specs.get(name)
        mirrors = getattr(spec, "mirrors", "") if spec else ""
        classes = len(spec.classnames) if spec else len(registry().get(name).classnames)
        lines.append(
            f"| {name} | {mirrors} | {classes} | {100 * build['zero_shot'][name]:.1f} | "
            f"{100 * build['finetuned'][name]:.1f} |"
        )
    lines += [
        "",
        "Zero-shot and fine-tuned accuracies as the build measured them on the test split.",
        "",
        f"Files: {total / 2**20:.1f} MiB in all ("
        + ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in sorted(sizes.items()))
        + f"); fine-tuned weights in {dtype}.",
        f"Build time: {build['seconds']['total'] / 60:.1f} min on {platform.machine()}"
        + _phases(build["seconds"])
        + ".",
        "",
    ]
    return lines


def _pm(mean: float, std: float) -> str:
    return f"{mean:.1f} ± {std:.1f}"


def _opt(value: float | None, fmt: str = ".1f") -> str:
    return "—" if value is None else format(value, fmt)


def _orders_lines(preset: str, data: dict[str, Any]) -> list[str]:
    real = f"real ViT-B/32, {data['real_tasks']} tasks"
    lines = [
        f"### {preset} against the real {data['real_tasks']}-task benchmark",
        "",
        f"| method | ACC | BWT | normalised | ACC ({real}) | BWT (real) | normalised (real) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| pretrained (zero-shot) | {data['pretrained_mean']:.1f} | | 0 | {data['real_pretrained']:.1f} | | 0 |",
        f"| fine-tuned (each on its own task) | {data['finetuned_mean']:.1f} | | 1 | {data['real_finetuned']:.1f} | | "
        "1 |",
    ]
    for name, row in data["methods"].items():
        label = name if row["real_acc"] is not None else f"{name} (not in the published table)"
        lines.append(
            f"| {label} | {_pm(row['acc_mean'], row['acc_std'])} | {_pm(row['bwt_mean'], row['bwt_std'])} | "
            f"{row['normalised']:.2f} | {_opt(row['real_acc'])} | {_opt(row['real_bwt'])} | "
            f"{_opt(row['real_normalised'], '.2f')} |"
        )
    gap = data["gap"]
    wins = sum(g > 0 for g in gap["mini_per_order"])
    lines += [
        "",
        f"OPCM minus the best of continual TA, weight averaging and MagMax: **{gap['mini']:+.1f}** on {preset} "
        f"(best: {gap['mini_best_baseline']}; OPCM ahead in {wins} of {len(gap['mini_per_order'])} orders) against "
        f"**{gap['real']:+.1f}** on the real benchmark (best: {gap['real_best_baseline']}). Each order took "
        f"{stats.fmean(data['seconds_per_order']):.0f} s (all methods, and OTMF's mask ablation).",
        "",
    ]
    return lines


def _otmf_lines(measured: dict[str, Any], real: Mapping[str, Any]) -> list[str]:
    claimed = real.get("otmf_claimed", {})
    presets = list(measured["presets"])
    lines = [
        "### OTMF's ablations",
        "",
        "Masks on/off (`--opt masks=off`) and head tuning on/off (`--opt head_tuning=on`), over the same orders. A "
        "run with head tuning also measures every step with the zero-shot heads, which is the run without head "
        "tuning (the merged encoder does not depend on the heads).",
        "",
        "| OTMF | " + " | ".join(f"{p} ACC" for p in presets) + " | OTMF paper (ViT-B/32, 8 tasks) |",
        "| --- | " + " | ".join("---" for _ in presets) + " | --- |",
    ]
    for name in OTMF_VARIANTS:
        cells = [
            _pm(measured["presets"][p]["otmf"][name]["acc_mean"], measured["presets"][p]["otmf"][name]["acc_std"])
            for p in presets
        ]
        paper = claimed.get(OTMF_PAPER.get(name, ""), None)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_opt(paper)} |")
    effects = []
    for p in presets:
        otmf = measured["presets"][p]["otmf"]
        masks = otmf["masks on, head tuning on"]["acc_mean"] - otmf["masks off, head tuning on"]["acc_mean"]
        heads = otmf["masks on, head tuning on"]["acc_mean"] - otmf["masks on, head tuning off (default)"]["acc_mean"]
        opcm = measured["presets"][p]["methods"]["opcm"]["acc_mean"]
        best = max(v["acc_mean"] for v in otmf.values())
        effects.append(
            f"{p}: masks {masks:+.1f}, head tuning {heads:+.1f}; the best OTMF variant is "
            f"{best - opcm:+.1f} against OPCM"
        )
    paper_masks = claimed.get("ViT-B/32", math.nan) - claimed.get("ablation_no_masks", math.nan)
    paper_heads = claimed.get("ViT-B/32", math.nan) - claimed.get("ablation_no_head_finetuning", math.nan)
    lines += [
        "",
        "Effects (mean ACC): " + "; ".join(effects) + f". OTMF paper: masks {paper_masks:+.1f}, head "
        f"tuning {paper_heads:+.1f} (its abstract; assets/reference `otmf_claimed`).",
        "",
    ]
    for p in presets:
        split = measured["head_tuning"][p]
        tasks = split["tasks"].values()
        per_class = [t["per_class"] for t in tasks]
        lines.append(
            f"Head tuning on {p}: each head is tuned on {split['head_fraction']:.0%} of the labelled train images the "
            f"runner loads ({_cap(split['sample_cap'])}): "
            f"{min(t['tuned_on'] for t in tasks)}–{max(t['tuned_on'] for t in tasks)} images per task, "
            f"{min(per_class):.1f}–{max(per_class):.1f} per class (mean {stats.fmean(per_class):.1f}), from train "
            f"splits of {min(t['train_rows'] for t in tasks)}–{max(t['train_rows'] for t in tasks)} images."
        )
    lines.append("")
    return lines


_STAT_COLUMNS = (
    ("relative_norm", "‖τ‖/‖θ0‖"),
    ("stable_rank", "stable rank"),
    ("overlap_left", "top-k overlap U (random)"),
    ("overlap_right", "top-k overlap V (random)"),
    ("sar_pairwise", "pairwise SAR (random)"),
    ("sar_merged", "SAR with Σ τ"),
)


def _all(name: str, fmt: str = ".3f"):
    return lambda data: format(data["per_type"][ALL_MATRICES][name], fmt)


# published statistic -> (title, the mini's matching measurement)
_PUBLISHED_ROWS = {
    "relative_norm": ("‖τ‖/‖θ0‖ per matrix", _all("relative_norm", ".4f")),
    "stable_rank": ("stable rank of task matrices", _all("stable_rank", ".2f")),
    "overlap_left": ("top-k overlap of left singular subspaces", _all("overlap_left")),
    "sar_pairwise": ("pairwise SAR between tasks", _all("sar_pairwise")),
    "sar_merged": ("SAR of each task with Σ τ", _all("sar_merged")),
    "cosine_mean_abs": ("mean absolute cosine between task vectors", lambda data: f"{data['cosine_mean_abs']:.3f}"),
    "cosine_max_abs": ("max absolute cosine between task vectors", lambda data: f"{data['cosine_max_abs']:.3f}"),
    "cosine_fusionbench_vit_b32": ("cosine, FusionBench ViT-B/32 itself", lambda data: ""),
}


def _statistics_lines(measured: dict[str, Any]) -> list[str]:
    lines = [
        "## Task-vector statistics",
        "",
        "Per layer type, averaged over tasks (pairs for overlaps) and over the blocks; "
        "`scripts/minibench/statistics.py` says why each is measured. ‖τ‖/‖θ0‖: Frobenius norms per matrix. Stable "
        "rank ‖τ‖_F²/‖τ‖_2² (of d = min side). Top-k overlap ‖U_iᵀU_j‖²_F/k of the leading k singular vectors "
        "(left U, right V) of two tasks' matrices, with k/d for random subspaces in brackets. Pairwise SAR "
        "(Marczak et al. 2025): ‖Π_j τ_i‖/‖τ_i‖, Π_j onto the top k_TA left singular vectors of task j, k_TA the "
        "rank keeping 95 % of Σ τ's energy, with √(k_TA/d) for a random subspace in brackets; SAR with Σ τ: the "
        "same against the task-arithmetic sum.",
        "",
    ]
    for preset, data in measured["statistics"].items():
        lines += [
            f"{preset} ({len(data['tasks'])} tasks, k = {data['k']}): mean |cosine| between whole task vectors "
            f"**{data['cosine_mean_abs']:.3f}** (max {data['cosine_max_abs']:.3f}).",
            "",
            "| layer type | shape | " + " | ".join(title for _, title in _STAT_COLUMNS) + " | k_TA |",
            "| --- | --- | " + " | ".join("---" for _ in _STAT_COLUMNS) + " | --- |",
        ]
        for name, row in data["per_type"].items():
            shape = "" if name == ALL_MATRICES else f"{row['shape'][0]}×{row['shape'][1]}"
            lines.append(
                f"| {name} | {shape} | {row['relative_norm']:.4f} | {row['stable_rank']:.2f} | "
                f"{row['overlap_left']:.3f} ({row['random_left']:.3f}) | {row['overlap_right']:.3f} "
                f"({row['random_right']:.3f}) | {row['sar_pairwise']:.3f} ({row['random_sar']:.3f}) | "
                f"{row['sar_merged']:.3f} | {row['k_merged']:.0f} |"
            )
        lines.append("")
    presets = list(measured["statistics"])
    lines += [
        "Beside real CLIP checkpoints, as published (all matrices averaged for the mini; no paper found gives "
        "these statistics for the FusionBench ViT-B/32 files themselves, so the nearest published values stand "
        "here, each with its model and checkpoints):",
        "",
        "| statistic | " + " | ".join(presets) + " | real, as published | source |",
        "| --- | " + " | ".join("---" for _ in presets) + " | --- | --- |",
    ]
    for value in measured["published_statistics"]:
        title, measure = _PUBLISHED_ROWS.get(value["statistic"], (value["statistic"], None))
        cells = [measure(measured["statistics"][p]) if measure else "" for p in presets]
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {value['text']} | {value['source']} |")
    lines.append("")
    return lines


def readme(out: Path, build: dict, measured: dict[str, Any]) -> str:
    real = real_results()
    seeds = measured["orders"]
    lines = _what_it_is(out, build)
    lines += [
        "## Does it reproduce the real benchmark's picture?",
        "",
        f"Every registered method with its default options over the papers' {len(seeds)} shuffled orders (seeds "
        f"{seeds[0]}–{seeds[-1]}: `python -m merging run --backbone mini --preset P --method all --order-seed S "
        "--samples 0`), 500 test images per task (the whole test split), seen tasks at every step; mean ± "
        "standard deviation over the orders. The real "
        "numbers are CLIP ViT-B/32 with the FusionBench checkpoints, mean of 10 orders "
        "(`assets/reference/reference_results.json`: MINGLE, arXiv 2505.11883, Table 1). Normalised accuracy: "
        "(ACC − zero-shot) / (fine-tuned − zero-shot), with the benchmark's own zero-shot and fine-tuned means.",
        "",
    ]
    for preset, data in measured["presets"].items():
        lines += _orders_lines(preset, data)
    lines += _otmf_lines(measured, real)
    lines += _statistics_lines(measured)
    timing = measured["seconds"]
    finetuned = measured["reference_all_tasks"]["finetuned"]
    lowest = min(finetuned, key=finetuned.get)
    lines += [
        "## Checks",
        "",
        "| check | result |",
        "| --- | --- |",
        *(f"| {name} | {'yes' if passed else 'NO'} |" for name, passed in measured["checks"].items()),
        "",
        f"Lowest fine-tuned accuracy on its own task (measured by the lab's evaluator): {lowest}, "
        f"{finetuned[lowest]:.1%}.",
        *(
            ["Why the methods rank as they do here: `DIAGNOSIS.md` (`python -m scripts.minibench.diagnose`)."]
            if (out / "DIAGNOSIS.md").exists()
            else []
        ),
        f"This report took {timing['total'] / 60:.1f} min on {measured['threads']} thread(s) ("
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timing.items() if k != "total")
        + "); the numbers are also in `report.json`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """A quick check of the report without rebuilding: fewer orders, some presets, written elsewhere."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "mini", help="the built benchmark")
    parser.add_argument(
        "--orders", type=int, default=None, help=f"the first N of the ten orders (or ${ORDERS_VARIABLE})"
    )
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument(
        "--write-to", type=Path, default=None, help="where README.md and report.json go (default --out)"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite README.md from the measured report.json, measuring nothing"
    )
    parser.add_argument(
        "--add-methods",
        nargs="+",
        default=None,
        metavar="METHOD",
        help="measure only these methods and add them to the existing report.json (the others are kept)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    build = json.loads((args.out / "build_report.json").read_text())
    if args.render_only:
        measured = json.loads((args.out / "report.json").read_text())
        ((args.write_to or args.out) / "README.md").write_text(readme(args.out, build, measured))
        return
    if args.add_methods:
        measured = add_methods(args.out, build, args.add_methods, args.write_to)
    else:
        measured = write_report(args.out, build, order_seeds(args.orders), args.presets, args.write_to)
    print(json.dumps({"acc": measured["acc"], "checks": measured["checks"], "seconds": measured["seconds"]}, indent=1))


if __name__ == "__main__":
    main()
