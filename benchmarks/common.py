"""Helpers shared by the benchmarks: synthetic encoders of real CLIP shapes, timing, memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from merging.compute.memory import keep_freed_memory
from merging.families.clip_vit.architecture import VisionArch
from merging.families.clip_vit.matrices import is_matrix

keep_freed_memory()  # the malloc settings python -m merging and app.py apply, so timings match theirs

VIT_B_32 = VisionArch(width=768, layers=12, heads=12, mlp_width=3072, patch_size=32, image_size=224, output_dim=512)


def random_vit(arch: VisionArch = VIT_B_32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Canonical state dict of open_clip's VisionTransformer of ``arch`` with its random init."""
    torch.manual_seed(seed)
    model = arch.build_open_clip()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def realistic_task_vector(
    pretrained: dict[str, torch.Tensor], seed: int, rank: int = 8, entry_rms: float = 3e-4
) -> dict[str, torch.Tensor]:
    """A task vector shaped like real CLIP fine-tunes: each matrix low-rank plus dense noise
    (about 2/3 of its energy in the low-rank part), other parameters dense noise, and an
    overall per-entry RMS near that of the FusionBench ViT-B/32 task vectors (‖τ‖ ≈ 3)."""
    g = torch.Generator().manual_seed(seed)
    tau = {}
    for key, value in pretrained.items():
        noise = torch.randn(value.shape, generator=g)
        if value.dim() == 2 and is_matrix(key):
            m, n = value.shape
            low = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
            low *= (0.8 * entry_rms * (m * n) ** 0.5) / low.norm()
            noise *= 0.6 * entry_rms
            tau[key] = low + noise
        else:
            tau[key] = noise * entry_rms
    return tau


def run_worker(script: Path, *args: str) -> dict:
    """Run ``script`` in a fresh interpreter (clean memory accounting) and parse its last JSON line."""
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


class TensorPeak:
    """Peak bytes of tensor storage allocated inside a ``with`` block (CPU or GPU, exact).

    Host RSS is useless for encoders of a few MiB (freed memory is reused without showing),
    so this counts every storage that a torch operation creates inside the block, frees it
    when the storage dies, and keeps the high-water mark. Storages that existed before the
    block (the model, caches) are not counted: the figure is what the block adds.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                result = func(*args, **(kwargs or {}))
                for tensor in torch.utils._pytree.tree_leaves(result):
                    if isinstance(tensor, torch.Tensor):
                        tracker._track(tensor)
                return result

        self._mode = _Mode()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _track(self, tensor: torch.Tensor) -> None:
        import weakref

        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._seen or storage.nbytes() == 0:
            return
        self._seen.add(key)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)

        def release(key=key, size=size):
            self._seen.discard(key)
            self.live -= size

        weakref.finalize(storage, release)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)
