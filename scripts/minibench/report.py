"""Measure the built mini benchmark the way the issue asks, and write assets/mini/README.md.

The numbers come from the same code as ``python -m merging run --backbone mini --preset mini-8
--method all``, plus the cosine similarities of the task vectors; the README records them
beside the checks the benchmark was designed to pass.
"""

from __future__ import annotations

import itertools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from merging.analysis import cosine_similarity_matrix
from merging.evaluation.backbones import load_backbone
from merging.evaluation.evaluator import Evaluator
from merging.evaluation.tasks import registry
from merging.experiment.runner import ContinualRun, RunConfig, preset_checkpoints, shuffled
from merging.io.checkpoints import open_encoder
from merging.methods import METHODS
from scripts.minibench.generators import TASKS


def mean_abs_cosine(preset: str) -> tuple[float, float]:
    """Mean and max |cosine similarity| over pairs of the preset's task vectors."""
    base = load_backbone("mini").visual_state()
    readers = [open_encoder(spec.source) for spec in preset_checkpoints(preset)]
    similarity = cosine_similarity_matrix(readers, base)
    pairs = [abs(float(similarity[i, j])) for i, j in itertools.combinations(range(len(readers)), 2)]
    return float(np.mean(pairs)), float(np.max(pairs))


ORDER_SEEDS = tuple(range(42, 52))
ORDER_METHODS = ("opcm", "task_arithmetic")


def over_orders(seeds=ORDER_SEEDS, methods=ORDER_METHODS) -> dict[str, dict[str, list[float]]]:
    """ACC and BWT of ``methods`` on mini-8 in the papers' shuffled orders (random.seed(s), shuffle)."""
    backbone = load_backbone("mini")
    evaluator = Evaluator(backbone, "cpu")
    values: dict[str, dict[str, list[float]]] = {m: {"acc": [], "bwt": []} for m in methods}
    for seed in seeds:
        config = RunConfig(
            checkpoints=shuffled(preset_checkpoints("mini-8"), seed),
            methods={m: {} for m in methods},
            device="cpu",
            order_seed=seed,
        )
        results = ContinualRun(config, evaluator=evaluator).run().to_json()
        for m in methods:
            values[m]["acc"].append(100 * results["methods"][m]["acc"])
            values[m]["bwt"].append(100 * results["methods"][m]["bwt"])
    return values


def _phases(seconds: dict) -> str:
    if "pretrain" not in seconds:
        return ""
    reused = " (measured in the previous build, whose base this one reused)" if seconds.get("pretrain_reused") else ""
    return (
        f" (drawing {seconds['draw'] / 60:.1f} min, pretraining {seconds['pretrain'] / 60:.1f} min{reused}, "
        f"fine-tuning {seconds['finetune'] / 60:.1f} min)"
    )


def write_report(out: Path, build: dict) -> dict:
    registry.cache_clear()
    load_backbone.cache_clear()
    started = time.perf_counter()
    config = RunConfig(
        checkpoints=preset_checkpoints("mini-8"), methods={m: {} for m in METHODS}, device="cpu", preset="mini-8"
    )
    run = ContinualRun(config)
    results = run.run().to_json()
    seconds = time.perf_counter() - started
    tasks = results["tasks"]
    pretrained = float(100 * np.mean([results["reference"]["pretrained"][t] for t in tasks]))
    finetuned = float(100 * np.mean([results["reference"]["finetuned"][t] for t in tasks]))
    cos8, cos8_max = mean_abs_cosine("mini-8")
    cos12, cos12_max = mean_abs_cosine("mini-12")
    accs = {m: 100 * d["acc"] for m, d in results["methods"].items()}
    bwts = {m: 100 * d["bwt"] for m, d in results["methods"].items()}
    checks = {
        "every fine-tuned checkpoint >= 90% on its own task": min(results["reference"]["finetuned"].values()) >= 0.9,
        "zero-shot mean at least 25 points below the fine-tuned mean": bool(finetuned - pretrained >= 25),
        "mean |cosine| between task vectors <= 0.3": cos8 <= 0.3,
        "every method between zero-shot and fine-tuned": all(bool(pretrained < a < finetuned) for a in accs.values()),
        "OPCM beats continual task arithmetic on ACC (default order)": bool(accs["opcm"] > accs["task_arithmetic"]),
    }
    orders = over_orders()
    measured = {
        "orders": orders,
        "run_seconds": seconds,
        "acc": accs,
        "bwt": bwts,
        "pretrained_mean": pretrained,
        "finetuned_mean": finetuned,
        "cosine_mean_abs_mini8": cos8,
        "cosine_max_abs_mini8": cos8_max,
        "cosine_mean_abs_mini12": cos12,
        "cosine_max_abs_mini12": cos12_max,
        "checks": checks,
    }
    (out / "README.md").write_text(readme(out, build, results, measured))
    return measured


def _order_rows(orders: dict[str, dict[str, list[float]]]) -> list[str]:
    rows = []
    opcm = orders["opcm"]["acc"]
    for method, values in orders.items():
        higher = sum(a > b for a, b in zip(opcm, values["acc"], strict=True))
        wins = "" if method == "opcm" else f"{higher} of {len(opcm)}"
        rows.append(
            f"| {method} | {np.mean(values['acc']):.2f} ± {np.std(values['acc'], ddof=1):.2f} | "
            f"{np.mean(values['bwt']):.2f} ± {np.std(values['bwt'], ddof=1):.2f} | {wins} |"
        )
    return rows


def readme(out: Path, build: dict, results: dict, measured: dict) -> str:
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in out.iterdir() if p.is_dir()}
    total = sum(sizes.values()) + sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    config = json.loads((out / "base" / "open_clip_config.json").read_text())["model_cfg"]
    vision, text = config["vision_cfg"], config["text_cfg"]
    lines = [
        "# The mini benchmark",
        "",
        "A miniature of the continual-merging benchmark that runs offline, on a CPU, in seconds. Everything here is",
        "built by `python scripts/build_mini_benchmark.py` (seed 0); do not edit by hand.",
        "",
        "## What it is",
        "",
        f"- `base/`: a tiny CLIP in open_clip's architecture and Hub format (image tower: ViT, {vision['image_size']}×"
        f"{vision['image_size']} images, patch {vision['patch_size']}, width {vision['width']}, {vision['layers']} "
        f"blocks; text tower: width {text['width']}, {text['layers']} blocks, open_clip's BPE tokenizer; embedding "
        f"{config['embed_dim']}), pretrained contrastively with open_clip's `ClipLoss` on captioned images of all "
        f'twelve concepts drawn in a shifted "web" style ({100 * build["recipe"]["task_style"]:.0f}% in the '
        f"benchmark's own style), with {100 * build['recipe']['caption_noise']:.0f}% of the captions naming a wrong "
        f"class, for {build['recipe']['pretrain_epochs']} epochs.",
        "- `checkpoints/<task>/`: the image encoder fine-tuned on each task in the Hugging Face CLIPVisionModel "
        "layout (config.json + model.safetensors), like `tanganke/clip-vit-*_<task>`: only the image tower trains, "
        f"with the task's zero-shot head and the projection frozen ({build['recipe']['finetune_epochs']} epochs over "
        f"{build['recipe']['finetune_images']:,} freshly drawn images, AdamW, one-cycle lr "
        f"{build['recipe']['finetune_lr']:g}).",
        "- `datasets/<task>/data/{test,train}-00000-of-00001.parquet`: 500 test and 200 labelled train images per "
        "task (JPEG bytes + label), in the Hub's parquet layout.",
        "- `tasks.json`: the registry entries (class names, templates, data, checkpoint) and the presets "
        "`mini-8`, `mini-12`.",
        "",
        "| task | mirrors | classes | zero-shot | fine-tuned |",
        "| --- | --- | --- | --- | --- |",
    ]
    for spec in TASKS:
        lines.append(
            f"| {spec.name} | {spec.mirrors} | {len(spec.classnames)} | "
            f"{100 * build['zero_shot'][spec.name]:.1f} | {100 * build['finetuned'][spec.name]:.1f} |"
        )
    lines += [
        "",
        "`mini-digits` uses real images: scikit-learn's handwritten digits (disjoint test and train digits).",
        "The other tasks are drawn by seeded generators (`scripts/minibench/generators.py`).",
        "",
        f"Files: {total / 2**20:.1f} MiB in all ("
        + ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in sorted(sizes.items()))
        + "); weights in float32.",
        f"Build time: {build['seconds']['total'] / 60:.1f} min on {platform.machine()} with "
        f"{torch.get_num_threads()} threads" + _phases(build["seconds"]) + ".",
        "",
        "## Does it reproduce the real benchmark's picture?",
        "",
        "Measured with the code behind `python -m merging run --backbone mini --preset mini-8 --method all "
        f"--out r.json` (500 test images per task, seen tasks at every step; {measured['run_seconds']:.1f} s for the "
        f"{len(measured['acc'])} methods with default options, caches cold):",
        "",
        "| | ACC | BWT |",
        "| --- | --- | --- |",
        f"| pretrained (zero-shot) | {measured['pretrained_mean']:.1f} | |",
        f"| fine-tuned (each on its own task) | {measured['finetuned_mean']:.1f} | |",
    ]
    for method, value in measured["acc"].items():
        lines.append(f"| {method} | {value:.1f} | {measured['bwt'][method]:.1f} |")
    lines += [
        "",
        f"Task vectors: mean |cosine similarity| {measured['cosine_mean_abs_mini8']:.3f} over the pairs of mini-8 "
        f"(max {measured['cosine_max_abs_mini8']:.3f}); {measured['cosine_mean_abs_mini12']:.3f} over mini-12 "
        f"(max {measured['cosine_max_abs_mini12']:.3f}).",
        "",
        f"Over the papers' ten shuffled orders of mini-8 (seeds {ORDER_SEEDS[0]}–{ORDER_SEEDS[-1]}, "
        "`--order-seed S`), mean ± standard deviation:",
        "",
        "| | ACC | BWT | orders where OPCM's ACC is higher |",
        "| --- | --- | --- | --- |",
        *_order_rows(measured["orders"]),
        "",
        "| check | result |",
        "| --- | --- |",
    ]
    for check, passed in measured["checks"].items():
        lines.append(f"| {check} | {'yes' if passed else 'NO'} |")
    lines.append("")
    return "\n".join(lines)
