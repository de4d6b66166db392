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


def _serve(tmp_path_factory, hosted: bool):
    import os

    import app

    cache = tmp_path_factory.mktemp("served-cache")
    previous = os.environ.get("MERGING_CACHE")
    os.environ["MERGING_CACHE"] = str(cache)
    demo = app.build_app(hosted=hosted).queue(max_size=16, default_concurrency_limit=1)
    _, url, _ = app.serve(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()
    if previous is None:
        os.environ.pop("MERGING_CACHE", None)
    else:
        os.environ["MERGING_CACHE"] = previous


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    """The lab launched on 127.0.0.1 (a free port) with a private cache, for gradio_client and the browser."""
    yield from _serve(tmp_path_factory, hosted=False)


@pytest.fixture(scope="module")
def served_hosted_app(tmp_path_factory):
    """The same in hosted mode, as on a public Space."""
    yield from _serve(tmp_path_factory, hosted=True)
