"""Shared fixtures: a tiny pretrained encoder and fine-tuned checkpoints on disk."""

from __future__ import annotations

import pytest
import torch

from .encoders import finetuned, random_encoder, write_hf, write_open_clip


@pytest.fixture
def pretrained_state() -> dict[str, torch.Tensor]:
    return random_encoder()


@pytest.fixture
def checkpoint_dirs(tmp_path, pretrained_state):
    """A pretrained open_clip file and three fine-tuned CLIPVisionModel directories."""
    base = write_open_clip(pretrained_state, tmp_path / "base" / "open_clip_model.safetensors")
    fine = [
        write_hf({k: v for k, v in finetuned(pretrained_state, seed=s).items() if k != "proj"}, tmp_path / f"ft{s}")
        for s in (1, 2, 3)
    ]
    return base, fine
