"""DOP's merge step on ViT-B/32 shapes, against a plain per-layer implementation of FusionBench's rule.

    python benchmarks/dop_step.py [--device auto|cpu|cuda] [--iterations 4] [--repeats 3] [--full]

A DOP step at ViT-B/32 scale runs 200 Adam iterations on each of 72 linear weights (48 of
768 × 768, 12 of 3072 × 768, 12 of 768 × 3072). The baseline, measured in the same run, is
:func:`merging.methods._dop_reference.reference_dop_weight`: FusionBench 0.2.33's rule
written plainly, one matrix at a time, losses through autograd (the tests prove it equal to
FusionBench itself). Ours is :func:`merging.methods.dop.fit_matrices` on the matrices of one
shape stacked in the chunks the merger uses.

On two CPU cores the baseline would need about an hour per step, so each side is timed per
matrix shape: its setup (SVDs, operators: ``steps=0``) and ``--iterations`` iterations, and the
step is projected as Σ over shapes of count × (setup + 200 × one iteration); both sides are
projected the same way; every timing is the best of ``--repeats``. ``--full`` also times our
whole step through the merger (every parameter, 200 iterations: a GPU's job). The matrices
are a random ViT-B/32 with task vectors shaped like real fine-tunes (benchmarks/common.py),
and the two sides' weights after the timed iterations are compared.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import random_vit, realistic_task_vector
from merging.compute.devices import resolve_device
from merging.families.clip_vit.matrices import matrix_views
from merging.methods import create_merger
from merging.methods._dop_reference import reference_dop_weight
from merging.methods.dop import DOPSettings, chunk_size, fit_matrices

SPEED_TARGET = 5.0
STEPS = 200


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work) -> float:
    synchronise(device)
    start = time.perf_counter()
    work()
    synchronise(device)
    return time.perf_counter() - start


def matrices_by_shape(pretrained, merged, new) -> dict[tuple[int, int], list[tuple[torch.Tensor, ...]]]:
    """(θ0, merged, new) of every linear weight, grouped by shape, in the encoder's order."""
    groups: dict[tuple[int, int], list[tuple[torch.Tensor, ...]]] = {}
    for key in pretrained:
        for (_, w0), (_, wm), (_, wt) in zip(
            matrix_views(key, pretrained[key]), matrix_views(key, merged[key]), matrix_views(key, new[key]), strict=True
        ):
            groups.setdefault(tuple(w0.shape), []).append((w0, wm, wt))
    return groups


def best_of(repeats: int, device: torch.device, work) -> float:
    """The shortest of ``repeats`` timings: other load on the machine only ever slows a run down."""
    return min(timed(device, work) for _ in range(repeats))


def measure_shape(device: torch.device, triples, iterations: int, repeats: int) -> tuple[float, float, float]:
    """Per-matrix seconds of one step (setup + 200 iterations) for the baseline and ours, and their difference.

    The two sides alternate, each timing the best of ``repeats``, so that a burst of other
    load on the machine cannot fall on one side only.
    """
    w0, wm, wt = (t.to(device) for t in triples[0])
    size = min(chunk_size(tuple(w0.shape)), len(triples))
    stacks = [torch.stack([t[i] for t in triples[:size]]).to(device) for i in range(3)]
    fits = []
    baseline_setup = best_of(repeats, device, lambda: reference_dop_weight(w0, wm, wt, steps=0))
    ours_setup = best_of(repeats, device, lambda: fit_matrices(*stacks, DOPSettings(steps=0))) / size
    baseline_run = best_of(repeats, device, lambda: reference_dop_weight(w0, wm, wt, steps=iterations))
    ours_run = (
        best_of(repeats, device, lambda: fits.append(fit_matrices(*stacks, DOPSettings(steps=iterations)))) / size
    )
    baseline_iteration = max(baseline_run - baseline_setup, 0.0) / iterations
    ours_iteration = max(ours_run - ours_setup, 0.0) / iterations
    expected = reference_dop_weight(w0, wm, wt, steps=iterations)
    difference = float((fits[0].weights[0] - expected).norm() / (expected - w0).norm())
    return baseline_setup + STEPS * baseline_iteration, ours_setup + STEPS * ours_iteration, difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--iterations", type=int, default=4, help="timed iterations per shape and side")
    parser.add_argument("--repeats", type=int, default=3, help="each timing is the best of this many")
    parser.add_argument("--full", action="store_true", help="also time our whole step (200 iterations)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    pretrained = random_vit()
    merged = {k: pretrained[k] + t for k, t in realistic_task_vector(pretrained, 100).items()}
    new = {k: pretrained[k] + t for k, t in realistic_task_vector(pretrained, 101).items()}
    groups = matrices_by_shape(pretrained, merged, new)
    print(
        f"DOP step on ViT-B/32 shapes, device {device}, {torch.get_num_threads()} threads; each side timed for its "
        f"setup and {args.iterations} iterations per shape, projected to {STEPS} iterations"
    )
    print(f"{'shape':>12} {'count':>5}  {'baseline s/matrix':>17}  {'ours s/matrix':>13}  {'ratio':>7}  diff")
    total_baseline = total_ours = 0.0
    for shape, triples in groups.items():
        baseline, ours, difference = measure_shape(device, triples, args.iterations, args.repeats)
        total_baseline += len(triples) * baseline
        total_ours += len(triples) * ours
        print(
            f"{'x'.join(map(str, shape)):>12} {len(triples):>5}  {baseline:17.2f}  {ours:13.2f}  "
            f"{baseline / ours:6.1f}x  {difference:.1e}"
        )
    ratio = total_baseline / total_ours
    print(
        f"projected step ({STEPS} iterations, all {sum(len(t) for t in groups.values())} matrices): baseline "
        f"{total_baseline:,.0f} s, ours {total_ours:,.0f} s: {ratio:.1f}x faster (target >= {SPEED_TARGET:.0f}x) "
        f"{'PASS' if ratio >= SPEED_TARGET else 'FAIL'}"
    )
    print("diff: ‖ours − baseline‖ / ‖baseline − θ0‖ of the first matrix after the timed iterations")
    if args.full:
        merger = create_merger("dop")
        merger.start(pretrained, device)
        merger.step({k: v for k, v in merged.items() if k != "proj"})
        seconds = timed(device, lambda: merger.step({k: v for k, v in new.items() if k != "proj"}))
        print(f"our whole step through the merger ({STEPS} iterations, every parameter): {seconds:.1f} s")


if __name__ == "__main__":
    main()
