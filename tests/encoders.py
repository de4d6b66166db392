"""Tiny CLIP ViT image encoders, task vectors with realistic structure, and checkpoints on disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from merging.families.clip_vit.architecture import VisionArch
from merging.families.clip_vit.layouts import to_hf, to_open_clip
from merging.families.clip_vit.matrices import is_matrix

TINY = VisionArch(width=32, layers=2, heads=2, mlp_width=64, patch_size=8, image_size=16, output_dim=16)


def random_encoder(arch: VisionArch = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """Canonical state dict of a randomly initialised open_clip VisionTransformer."""
    torch.manual_seed(seed)
    model = arch.build_open_clip()
    with torch.no_grad():  # LayerNorms start at 1/0: give them some spread like trained weights
        for name, param in model.named_parameters():
            if "ln" in name:
                param.add_(0.05 * torch.randn_like(param))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def task_vector(
    pretrained: dict[str, torch.Tensor], seed: int, rank: int = 2, scale: float = 0.02, noise: float = 0.002, keys=None
) -> dict[str, torch.Tensor]:
    """A task vector with realistic structure: low-rank matrices plus dense noise everywhere."""
    g = torch.Generator().manual_seed(seed)
    tau = {}
    for k, v in pretrained.items():
        if keys is not None and k not in keys:
            continue
        t = noise * torch.randn(v.shape, generator=g)
        if v.dim() == 2 and is_matrix(k):
            m, n = v.shape
            t += scale * (torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)) / rank**0.5
        tau[k] = t
    return tau


def finetuned(pretrained, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    tau = task_vector(pretrained, seed, **kwargs)
    return {k: pretrained[k] + tau[k] for k in tau}


def write_hf(
    state: dict[str, torch.Tensor], directory: Path, arch: VisionArch = TINY, projection: bool = False
) -> Path:
    """A transformers CLIPVisionModel directory (config.json + model.safetensors), as on the Hub."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in to_hf(state, include_projection=projection).items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(arch.hf_config()))
    return directory


def write_open_clip(state: dict[str, torch.Tensor], path: Path) -> Path:
    """A file of open_clip CLIP keys (image tower under visual.)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in to_open_clip(state).items()}, str(path))
    return path


def toy_context(pretrained: dict[str, torch.Tensor], arch: VisionArch = TINY, images: int = 48, classes: int = 4):
    """A MergeContext over random images for data-driven methods (OTMF) on a tiny encoder.

    Each task name gets its own seeded images, labels and head, so runs are deterministic.
    """
    import zlib

    from merging.methods import ImageSet, MergeContext

    encoder = arch.build_open_clip()
    encoder.load_state_dict(pretrained)
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)

    def seed_of(*parts: str) -> int:
        return zlib.crc32("|".join(parts).encode())

    def task_images(task: str, split: str) -> ImageSet:
        generator = torch.Generator().manual_seed(seed_of(task, split))
        pixels = torch.randint(0, 256, (images, 3, arch.image_size, arch.image_size), generator=generator)
        labels = torch.randint(0, classes, (images,), generator=generator)
        return ImageSet(pixels.to(torch.uint8), labels)

    def head(task: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed_of(task, "head"))
        return torch.nn.functional.normalize(torch.randn(classes, arch.output_dim, generator=generator), dim=-1)

    return MergeContext(
        encoder=encoder.eval(),
        images=task_images,
        prepare=lambda batch: batch.float() / 127.5 - 1.0,
        head=head,
        logit_scale=100.0,
    )


# Options that keep data-driven methods quick in tests that are about streaming, not quality.
QUICK_OPTIONS = {"otmf": {"steps": 4}, "mingle": {"steps": 4, "rank": 8}}


def ready_merger(method: str, pretrained: dict[str, torch.Tensor], options=None):
    """A started merger of ``method``; data-driven ones get a toy context (steps then need a task)."""
    from merging.methods import create_merger

    merger = create_merger(method, QUICK_OPTIONS.get(method, {}) if options is None else options)
    if merger.requires_data:
        merger.attach(toy_context(pretrained))
    merger.start(pretrained)
    return merger
