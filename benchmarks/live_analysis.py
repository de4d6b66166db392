"""The live analysis' cost per step at ViT-B/32 scale, against a task-arithmetic merge step.

    python benchmarks/live_analysis.py [--steps 4] [--methods task_arithmetic opcm] [--threads N] [--check]

A random open_clip ViT-B/32 image encoder (88 M parameters) and task vectors shaped like real
fine-tunes (benchmarks/common.py) go through the chosen methods step by step, as a run does.
After every step :meth:`merging.experiment.live_analysis.LiveAnalysis.observe` analyses it: the
new task vector's count sketch, its exact norm and inner products with every merged delta, the
sketched cosines against the earlier task vectors and the default layer's spectra (the last
block's 3072 × 768 MLP input weight) of the task vector and every merged delta.

The named baseline, measured in the same run on the same inputs, is task arithmetic's merge step
(one pass over the encoder: the cheapest merge there is); with ``--methods ... opcm`` OPCM's
merge step is measured too, for scale. It prints per step the analysis and the baselines, the
median ratios over steps 2… (step 1 has no earlier task), the spectra's share of the analysis,
what the analysis keeps per task, and the peak tensor memory one analysis step adds. The
checkpoints are in memory here; in the lab they are read from disk one parameter at a time,
which a merge step pays too.

Every task vector shares a direction of weight ``--shared`` (cosines near 0.2 between tasks, as
between real fine-tunes). ``--check`` also measures the sketched cosines' error at full scale,
drawing each earlier task vector again from its seed, outside the timed analysis (one run of 5
steps here: largest error 0.0026 over 10 pairs, against the documented 0.01).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import VIT_B_32, TensorPeak, mib, random_vit, realistic_task_vector
from merging.experiment.live_analysis import SKETCH_DIMENSION, LiveAnalysis, cosine_error_bound, inner
from merging.families.clip_vit.family import ClipViT
from merging.methods import create_merger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="checkpoints to merge and analyse (default 4)")
    parser.add_argument(
        "--methods", nargs="+", default=["task_arithmetic"], help="methods whose merged deltas the analysis reads"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument(
        "--shared",
        type=float,
        default=0.5,
        help="weight of a direction every task vector shares (0.5: cosines near 0.2, as between real fine-tunes)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="also measure the sketched cosines' error at full scale: each earlier task vector is drawn again "
        "(from its seed) to compute the exact cosines, outside the timed analysis",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    family = ClipViT()
    pretrained = random_vit(VIT_B_32)
    keys = list(pretrained)
    size = sum(v.numel() for v in pretrained.values())
    print(
        f"ViT-B/32 image encoder: {size / 1e6:.1f} M parameters ({mib(4 * size)} in float32); "
        f"{torch.get_num_threads()} torch threads; methods {', '.join(args.methods)}"
    )
    methods = list(dict.fromkeys(["task_arithmetic", *args.methods]))
    mergers = {name: create_merger(name, {}) for name in methods}
    for merger in mergers.values():
        merger.start(pretrained, "cpu", family=family)
    analysis = LiveAnalysis()
    shared = realistic_task_vector(pretrained, seed=0) if args.shared else None

    def task_vector(step: int) -> dict[str, torch.Tensor]:
        tau = realistic_task_vector(pretrained, seed=step)
        if shared is not None:
            for k in keys:
                tau[k].add_(shared[k], alpha=args.shared)
        return tau

    rows, errors = [], []
    for step in range(1, args.steps + 1):
        tau = task_vector(step)
        checkpoint = {k: pretrained[k] + tau[k] for k in keys}
        seconds = {}
        for name, merger in mergers.items():
            started = time.perf_counter()
            merger.step(checkpoint)
            seconds[name] = time.perf_counter() - started
        merged = {name: mergers[name].merged for name in args.methods}
        with TensorPeak() as peak:
            started = time.perf_counter()
            record = analysis.observe(step, f"task{step}", checkpoint, pretrained, merged, keys, family)
            total = time.perf_counter() - started
        spectra_start = time.perf_counter()  # the spectra alone, timed again outside the analysis
        label = record.layer
        for matrix in [family.get_matrix(checkpoint, label), *(family.get_matrix(m, label) for m in merged.values())]:
            torch.linalg.svdvals((matrix - family.get_matrix(pretrained, label)).double())
        spectra = time.perf_counter() - spectra_start
        rows.append((step, total, seconds["task_arithmetic"], spectra, peak.peak, seconds))
        others = "".join(f", {n} merge {seconds[n]:.2f} s" for n in methods if n != "task_arithmetic")
        print(
            f"step {step}: analysis {total:.2f} s (spectra of {record.layer_name} ≈ {spectra:.2f} s), "
            f"task_arithmetic merge {seconds['task_arithmetic']:.2f} s{others}; "
            f"analysis peak +{mib(peak.peak)}; cosines vs earlier {[round(c, 3) for c in record.task_cosines]}"
        )
        if args.check:  # exact cosines against every earlier task vector, drawn again one at a time
            for i, sketched in enumerate(record.task_cosines, 1):
                earlier = task_vector(i)
                dot = sum(inner(tau[k], earlier[k]) for k in keys)
                norm = sum(inner(earlier[k], earlier[k]) for k in keys) ** 0.5
                errors.append(abs(sketched - dot / (norm * record.task_norm)))
                del earlier
            print(f"  exact − sketched cosine, step {step}: max {max(errors[-(step - 1) :], default=0):.4f}")
        del checkpoint, tau
    later = rows[1:] or rows
    ratio = statistics.median(r[1] / r[2] for r in later)
    print(
        f"\nmedian over steps {later[0][0]}–{later[-1][0]}: analysis "
        f"{statistics.median(r[1] for r in later):.2f} s per step, task arithmetic's merge step "
        f"{statistics.median(r[2] for r in later):.2f} s: analysis / baseline = {ratio:.2f}x"
    )
    for name in methods[1:]:  # the other methods' merge steps, measured alongside, for scale
        other = statistics.median(r[5][name] for r in later)
        versus = statistics.median(r[1] / r[5][name] for r in later)
        print(f"  {name}'s merge step {other:.2f} s: analysis / {name} = {versus:.2f}x")
    if errors:
        print(f"sketched cosines at full scale: largest error {max(errors):.4f} over {len(errors)} pairs (bound 0.01)")
    held = analysis.held_tensors()
    per_task = held[0].numel() * held[0].element_size()
    print(
        f"kept per task: a {SKETCH_DIMENSION:,}-bucket sketch ({mib(per_task)}) and a norm; after {len(held)} steps "
        f"{mib(sum(t.numel() * t.element_size() for t in held))} in all, against {mib(4 * size)} per task vector "
        f"kept whole; sketched cosine error standard deviation ≤ {cosine_error_bound():.4f}"
    )


if __name__ == "__main__":
    main()
