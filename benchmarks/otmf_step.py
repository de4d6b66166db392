"""One OTMF merge step on the ViT-B/32 architecture (random weights): time and peak memory.

    python benchmarks/otmf_step.py [--device auto|cpu|cuda] [--steps 100] [--ot emd|sinkhorn]

Random pretrained weights, two realistic task vectors (low rank plus noise, ‖τ‖ ≈ 3) and
random 224 × 224 images (64 per task): what is measured is the cost of the method, not the
quality. The named baseline in the same run is the same step with ``masks=off`` (plain
α-interpolation, no optimisation). Peak memory is the increase over what was in use before
the step (GPU allocator peak on CUDA, host resident-set peak on the CPU), as a multiple of
the encoder's float32 size; ALGORITHMS.md expects about 14×.

The time per mask update is also compared with the per-parameter formulation OTMF had before
its buffers went flat (:mod:`merging.methods._otmf_reference`), same options, same run
(``--repeat`` alternated steps of each, best of each). Issue 16's target: at most 15 ms per
mask update on an H200 (``--device cuda``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import VIT_B_32, random_vit, realistic_task_vector
from merging.compute.devices import memory_in_use, peak_memory_bytes, reset_peak_memory, resolve_device
from merging.methods import ImageSet, MergeContext, create_merger
from merging.methods._otmf_reference import PerParameterOTMF


def context(pretrained: dict[str, torch.Tensor], device: torch.device, images: int = 64) -> MergeContext:
    encoder = VIT_B_32.build_open_clip()
    encoder.load_state_dict(pretrained)
    encoder = encoder.to(device).eval().requires_grad_(False)
    pools = {}

    def task_images(task: str, split: str) -> ImageSet:
        if task not in pools:
            generator = torch.Generator().manual_seed(len(pools))
            pixels = torch.randint(0, 256, (images, 3, 224, 224), generator=generator, dtype=torch.uint8)
            pools[task] = ImageSet(pixels, torch.randint(0, 10, (images,), generator=generator))
        return pools[task]

    return MergeContext(
        encoder=encoder,
        images=task_images,
        prepare=lambda batch: batch.to(device).float() / 127.5 - 1.0,
        head=lambda task: torch.nn.functional.normalize(torch.randn(10, VIT_B_32.output_dim), dim=-1),
        logit_scale=100.0,
    )


def one_step(options: dict, pretrained, models, device, per_parameter: bool = False) -> tuple[float, float, dict]:
    merger = PerParameterOTMF(**options) if per_parameter else create_merger("otmf", options)
    merger.attach(context(pretrained, device))
    merger.start(pretrained, device)
    merger.step(models[0], task="a")
    reset_peak_memory(device)
    before = memory_in_use(device)
    started = time.perf_counter()
    result = merger.step(models[1], task="b")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    peak = peak_memory_bytes(device)
    increase = float("nan") if peak is None or before is None else peak - before
    return seconds, increase, result.diagnostics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--ot", default="emd", choices=("emd", "sinkhorn"))
    parser.add_argument("--repeat", type=int, default=2, help="alternated steps of flat and per-parameter OTMF")
    args = parser.parse_args()
    device = resolve_device(args.device)
    pretrained = random_vit()
    models = [{k: pretrained[k] + v for k, v in realistic_task_vector(pretrained, s).items()} for s in (1, 2)]
    encoder_bytes = sum(t.numel() * 4 for t in pretrained.values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"ViT-B/32 shape ({encoder_bytes / 2**20:.0f} MiB float32), {name}")
    base_seconds, base_memory, _ = one_step({"masks": "off"}, pretrained, models, device)
    seconds, memory, diagnostics = one_step({"steps": args.steps, "ot": args.ot}, pretrained, models, device)
    optimisation = diagnostics["optimisation_seconds"]
    print(f"{'':<34}{'seconds':>9}{'peak / encoder':>16}")
    print(f"{'masks=off (baseline)':<34}{base_seconds:9.2f}{base_memory / encoder_bytes:15.1f}x")
    print(f"{f'otmf, {args.steps} steps, ot={args.ot}':<34}{seconds:9.2f}{memory / encoder_bytes:15.1f}x")
    print(
        f"ratio to baseline: {seconds / base_seconds:.1f}x time; teachers {diagnostics['teacher_seconds']:.2f} s, "
        f"optimisation {optimisation:.2f} s ({1000 * optimisation / max(args.steps, 1):.0f} ms per mask update)"
    )
    options = {"steps": args.steps, "ot": args.ot}
    per_update: dict[bool, list[float]] = {False: [optimisation / max(args.steps, 1)], True: []}
    for repeat in range(args.repeat):
        for per_parameter in (True, False) if repeat else (True,):
            diagnostics = one_step(options, pretrained, models, device, per_parameter)[2]
            per_update[per_parameter].append(diagnostics["optimisation_seconds"] / max(args.steps, 1))
    flat, before = min(per_update[False]), min(per_update[True])
    print(
        f"per mask update, best of {len(per_update[False])} / {len(per_update[True])}: flat buffers "
        f"{1000 * flat:.1f} ms, per-parameter formulation (before) {1000 * before:.1f} ms: {before / flat:.2f}x"
        + (f" (target <= 15 ms on an H200: {'PASS' if flat <= 0.015 else 'FAIL'})" if device.type == "cuda" else "")
    )


if __name__ == "__main__":
    main()
