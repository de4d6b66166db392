"""One OTMF merge step on the ViT-B/32 architecture (random weights): time and peak memory.

    python benchmarks/otmf_step.py [--device auto|cpu|cuda] [--steps 100] [--ot emd|sinkhorn]

Random pretrained weights, two realistic task vectors (low rank plus noise, ‖τ‖ ≈ 3) and
random 224 × 224 images (64 per task): what is measured is the cost of the method, not the
quality. The named baseline in the same run is the same step with ``masks=off`` (plain
α-interpolation, no optimisation). Peak memory is the increase over what was in use before
the step (GPU allocator peak on CUDA, host resident-set peak on the CPU), as a multiple of
the encoder's float32 size; ALGORITHMS.md expects about 14×.
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


def one_step(options: dict, pretrained, models, device) -> tuple[float, float, dict]:
    merger = create_merger("otmf", options)
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


if __name__ == "__main__":
    main()
