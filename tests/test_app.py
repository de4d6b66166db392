"""The app's handlers at function level (the page itself is exercised by the UI issue's browser tests)."""

from __future__ import annotations

import gradio as gr
import pytest

import app
from merging.checkpoints import load_encoder


def test_merge_handler_streams_one_update_per_step(tmp_path, checkpoint_dirs):
    base, fine = checkpoint_dirs
    out = tmp_path / "merged.safetensors"
    updates = list(app.merge_checkpoints("opcm", str(base), "\n".join(map(str, fine)), "alpha=0.5", "cpu", str(out)))
    assert [u.count("step ") for u in updates] == [0, 1, 2, 3, 3]
    assert "λ =" in updates[-2] and updates[-1].endswith(f"wrote {out}")
    assert set(load_encoder(out)) >= {"conv1.weight", "ln_post.weight"}


def test_bad_input_becomes_a_gradio_error(tmp_path, checkpoint_dirs):
    base, fine = checkpoint_dirs
    with pytest.raises(gr.Error, match="checkpoint not found"):
        list(app.merge_checkpoints("opcm", str(base), str(tmp_path / "missing"), "", "cpu", ""))
    with pytest.raises(gr.Error, match="unknown option 'beta'"):
        list(app.merge_checkpoints("opcm", str(base), str(fine[0]), "beta=2", "cpu", ""))


def test_page_builds_and_lists_every_method():
    demo = app.build_app()
    assert isinstance(demo, gr.Blocks)
    text = app.methods_markdown()
    for name in ("opcm", "task_arithmetic", "weight_average", "ties", "magmax"):
        assert f"`{name}`" in text
