"""Why the continual methods rank as they do on the mini benchmark: the diagnostics behind issue 13.

    python -m scripts.minibench.diagnose [--preset mini-8] [--out assets/mini/DIAGNOSIS.md]

The report (``report.py``) says *whether* the miniature reproduces the papers' picture; these
measurements say *why not*, each one a property of the fine-tunes that a method reacts to:

- **Single-task scaling curve**: the normalised accuracy of θ0 + λ·τ_t on task t alone, for the
  scales the methods effectively give each task (weight averaging 1/T, task arithmetic 0.3,
  OPCM about 1/√T). If a fraction of a task vector already recovers most of its gain
  (a concave curve), averaging loses little; a linear curve makes every merge pay in
  proportion to its shrinkage.
- **Linear probe**: a logistic-regression head on the *pretrained* embeddings of the labelled
  train split, normalised like the methods: (probe − zero-shot) / (fine-tuned − zero-shot).
  Near 1, the pretrained features already separate the task and fine-tuning only has to align
  them with the frozen text head; far below 1, fine-tuning had to learn new features.
- **Weight-decay share**: cos(τ_t, −θ0) over the matrix parameters. AdamW's decoupled decay
  moves every fine-tune towards −θ0 by lr·wd per step: a full-rank direction shared by all
  task vectors that no task asked for.
- **What OPCM's projection removes**: the share of each new task vector's norm that OPCM's
  projection takes away, and its rescaling λ(t), in the preset's order. A small share with
  λ(t) ≈ √t means OPCM acts as task arithmetic with λ = 1/√t: its projection finds little of
  the new task in the merged model's leading directions, so there is little to protect.
- **Width used per task**: per layer type, the number of singular directions holding 95 % of
  a task matrix's energy (Σσ²), as a share of the matrix's smaller side. Projection methods
  (OPCM) need room: when one task already fills a large share of the width, a few tasks
  fill all of it, and projecting a new task off the merged model's leading directions
  removes the new task's own signal along with the interference.

Pure functions take tensors and return numbers; ``main`` loads the shipped files.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from scripts.minibench.statistics import energy_rank

ROOT = Path(__file__).resolve().parents[2]
SCALES = (0.125, 0.3, 0.354, 0.5)
ENERGY = 0.95


def normalised(accuracy: float, zero_shot: float, finetuned: float) -> float:
    """(accuracy − zero-shot) / (fine-tuned − zero-shot): 0 at the pretrained model, 1 at the fine-tune."""
    gap = finetuned - zero_shot
    return (accuracy - zero_shot) / gap if gap else math.nan


def scaled(pretrained: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """θ0 + scale · (θ_t − θ0), in float32, over the fine-tune's keys (the others stay pretrained)."""
    return {k: pretrained[k].float() + scale * (finetuned[k].float() - pretrained[k].float()) for k in finetuned}


def decay_share(pretrained: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], keys: Iterable[str]) -> float:
    """cos(τ, −θ0) over ``keys``: how much of the task vector points at shrinking the pretrained weights."""
    dot = task_sq = pre_sq = 0.0
    for key in keys:
        pre = pretrained[key].double()
        tau = finetuned[key].double() - pre
        dot -= float((tau * pre).sum())
        task_sq += float(tau.square().sum())
        pre_sq += float(pre.square().sum())
    return dot / math.sqrt(task_sq * pre_sq) if task_sq and pre_sq else math.nan


def width_share(matrix: Tensor, energy: float = ENERGY) -> float:
    """The fewest singular directions holding ``energy`` of Σσ², as a share of min(matrix.shape).

    The statistics' energy rank keeps a tail of at most ε² of the energy, so ε² = 1 − ``energy``.
    """
    rank = energy_rank(torch.linalg.svdvals(matrix.double()), math.sqrt(1 - energy))
    return rank / min(matrix.shape)


def width_share_by_type(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    views: Callable[[str, Tensor], list[tuple[str, Tensor]]],
    kind: Callable[[str], str],
) -> dict[str, float]:
    """Mean :func:`width_share` of the task matrices per layer type (``views`` splits packed q/k/v).

    Only keys every fine-tune has count (CLIPVisionModel checkpoints carry no output projection).
    """
    shares: dict[str, list[float]] = {}
    for key, value in pretrained.items():
        if any(key not in state for state in finetuned):
            continue
        pre_views = dict(views(key, value))
        for state in finetuned:
            for label, matrix in views(key, state[key]):
                shares.setdefault(kind(label), []).append(width_share(matrix.float() - pre_views[label].float()))
    return {name: float(np.mean(values)) for name, values in shares.items()}


def linear_probe(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> float:
    """Test accuracy of a logistic-regression head fitted on (features, labels) of the train split."""
    from sklearn.linear_model import LogisticRegression

    head = LogisticRegression(max_iter=3000, C=10.0).fit(*train)
    return float(head.score(*test))


def opcm_projection(pretrained: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]]) -> dict:
    """OPCM (default options) over ``finetuned`` in order: per step the removed share and λ(t)."""
    from merging.methods import METHODS

    merger = METHODS["opcm"]()
    merger.start(pretrained)
    steps = [merger.step(state).diagnostics for state in finetuned]
    return {"removed_share": [d["removed_share"] for d in steps], "lambda": [d["lambda"] for d in steps]}


def diagnose(preset: str = "mini-8") -> dict:
    """Every diagnostic of the module docstring for the shipped preset (its tasks in registry order)."""
    from merging.evaluation.backbones import load_backbone
    from merging.evaluation.evaluator import Evaluator
    from merging.evaluation.tasks import registry
    from merging.experiment.runner import preset_checkpoints
    from merging.families import family_of
    from merging.io.checkpoints import load_encoder
    from scripts.minibench.statistics import layer_type

    backbone = load_backbone("mini")
    evaluator = Evaluator(backbone, "cpu", samples=None)
    pretrained = backbone.visual_state()
    family = family_of(pretrained.keys())
    specs = preset_checkpoints(preset)
    tasks = [registry().get(spec.task) for spec in specs]
    finetuned = {task.name: load_encoder(spec.source) for task, spec in zip(tasks, specs, strict=True)}
    zero_shot = evaluator.evaluate(None, tasks)
    tuned = {t.name: evaluator.evaluate(finetuned[t.name], [t])[t.name] for t in tasks}
    curve = {
        str(scale): {
            t.name: normalised(
                evaluator.evaluate(scaled(pretrained, finetuned[t.name], scale), [t])[t.name],
                zero_shot[t.name],
                tuned[t.name],
            )
            for t in tasks
        }
        for scale in SCALES
    }
    evaluator.load_encoder(pretrained)
    probe = {}
    for task in tasks:
        train = evaluator.task_images(task, task.dataset.train_split)
        test = evaluator.test_set(task)
        accuracy = linear_probe(
            (evaluator.features(train.images).numpy(), train.labels.numpy()),
            (evaluator.features(test.images).numpy(), test.labels.numpy()),
        )
        probe[task.name] = {
            "accuracy": accuracy,
            "normalised": normalised(accuracy, zero_shot[task.name], tuned[task.name]),
        }
    shared = set.intersection(*(set(state) for state in finetuned.values()))
    matrix_keys = [k for k in pretrained if k in shared and family.matrix_views(k, pretrained[k])]
    return {
        "preset": preset,
        "zero_shot": zero_shot,
        "finetuned": tuned,
        "single_task_curve": curve,
        "linear_probe": probe,
        "decay_share": {name: decay_share(pretrained, state, matrix_keys) for name, state in finetuned.items()},
        "opcm": opcm_projection({k: pretrained[k] for k in shared}, list(finetuned.values())),
        "width_share": width_share_by_type(pretrained, list(finetuned.values()), family.matrix_views, layer_type),
    }


def markdown(result: dict) -> str:
    """The diagnostics as the page ``DIAGNOSIS.md`` shows them."""
    tasks = list(result["zero_shot"])
    mean = lambda values: float(np.mean(list(values)))  # noqa: E731
    lines = [
        "# Why the methods rank as they do on the mini benchmark",
        "",
        f"Generated by `python -m scripts.minibench.diagnose --preset {result['preset']}` from the shipped files; "
        "`scripts/minibench/diagnose.py` says what each measurement means. Normalised: (acc − zero-shot) / "
        "(fine-tuned − zero-shot) per task.",
        "",
        "| task | zero-shot | fine-tuned | linear probe (normalised) | "
        + " | ".join(f"θ0 + {s}·τ" for s in result["single_task_curve"])
        + " | cos(τ, −θ0) |",
        "| --- " * (5 + len(result["single_task_curve"])) + "|",
    ]
    for t in tasks:
        probe = result["linear_probe"][t]
        lines.append(
            f"| {t} | {100 * result['zero_shot'][t]:.1f} | {100 * result['finetuned'][t]:.1f} | "
            f"{100 * probe['accuracy']:.1f} ({probe['normalised']:.2f}) | "
            + " | ".join(f"{curve[t]:.2f}" for curve in result["single_task_curve"].values())
            + f" | {result['decay_share'][t]:.3f} |"
        )
    lines.append(
        f"| mean | {100 * mean(result['zero_shot'].values()):.1f} | {100 * mean(result['finetuned'].values()):.1f} | "
        f"{mean(p['normalised'] for p in result['linear_probe'].values()):.2f} | "
        + " | ".join(f"{mean(curve.values()):.2f}" for curve in result["single_task_curve"].values())
        + f" | {mean(result['decay_share'].values()):.3f} |"
    )
    opcm = result["opcm"]
    lines += [
        "",
        "OPCM (default options, this order): share of each new task vector removed by the projection "
        + ", ".join(f"{100 * r:.1f} %" for r in opcm["removed_share"][1:])
        + "; λ(t) "
        + ", ".join(f"{v:.2f}" for v in opcm["lambda"])
        + " (√t: "
        + ", ".join(f"{math.sqrt(t):.2f}" for t in range(1, len(opcm["lambda"]) + 1))
        + ").",
        "",
        f"Width used per task: the share of a task matrix's smaller side that holds {ENERGY:.0%} of its energy.",
        "",
        "| layer type | share |",
        "| --- | --- |",
        *(f"| {name} | {share:.2f} |" for name, share in result["width_share"].items()),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mini-8")
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "mini" / "DIAGNOSIS.md")
    args = parser.parse_args()
    result = diagnose(args.preset)
    args.out.write_text(markdown(result))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
