"""Writing a CLIP ViT image encoder as safetensors, in the Hugging Face or open_clip layout."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from merging.errors import CheckpointError
from merging.families.base import cast_for_saving
from merging.families.clip_vit.architecture import VisionArch
from merging.families.clip_vit.layouts import Layout, to_hf, to_open_clip

SAFETENSORS_SUFFIX = ".safetensors"
HF_CONFIG = "config.json"


def encoder_files(out: str | Path, fmt: Literal["hf", "open_clip"]) -> list[Path]:
    """The files :func:`save_encoder` writes: a ``.safetensors`` file, or for ``hf`` a folder's
    ``model.safetensors`` and ``config.json``; the open_clip format in a folder raises."""
    path = Path(out)
    if path.suffix == SAFETENSORS_SUFFIX:
        return [path]
    if fmt != "hf":
        raise CheckpointError(f"--out {out}: the open_clip format is written to a .safetensors file")
    return [path / "model.safetensors", path / HF_CONFIG]


def save_encoder(
    state: Mapping[str, Tensor],
    out: str | Path,
    fmt: Literal["hf", "open_clip"],
    arch: VisionArch,
    include_projection: bool = True,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write an encoder (canonical keys) as safetensors in the Hugging Face or open_clip layout.

    ``out`` is a ``.safetensors`` file, or for ``hf`` a directory that receives
    ``model.safetensors`` and a ``config.json``, so ``CLIPVisionModel.from_pretrained(out)``
    loads it directly. Returns the files written.
    """
    files = encoder_files(out, fmt)
    tensors = cast_for_saving(to_hf(state, include_projection) if fmt == "hf" else to_open_clip(state), dtype)
    meta = {"format": "pt", "merging.layout": Layout.HF_CLIP_VISION.value if fmt == "hf" else Layout.OPEN_CLIP.value}
    meta.update(metadata or {})
    weights = files[0]
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(weights), metadata=meta)
    if len(files) > 1:
        config = arch.hf_config()
        config["torch_dtype"] = str(dtype or torch.float32).removeprefix("torch.")
        files[1].write_text(json.dumps(config, indent=2) + "\n")
    return files
