"""Reading checkpoints safely, and a clear one-line error for every kind of bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from merging.errors import CheckpointError
from merging.experiment.merge import ContinualMerge
from merging.families.clip_vit.layouts import Layout, to_hf
from merging.io.checkpoints import check_compatible, open_encoder, resolve_source

from .encoders import TINY, VisionArch, finetuned, random_encoder, write_hf, write_open_clip


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_reads_hf_directory_lazily_with_config(checkpoint_dirs):
    _, fine = checkpoint_dirs
    reader = open_encoder(fine[0])
    assert reader.layout is Layout.HF_CLIP_VISION
    assert reader.arch == VisionArch(**{**TINY.as_dict(), "output_dim": None})
    assert "proj" not in reader and "transformer.resblocks.1.attn.in_proj_weight" in reader
    assert reader.shape("transformer.resblocks.1.attn.in_proj_weight") == (96, 32)
    assert "Hugging Face CLIPVisionModel" in reader.describe()


def test_sharded_checkpoint_is_read_through_its_index(tmp_path, pretrained_state):
    hf = to_hf(pretrained_state)
    keys = sorted(hf)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    directory = tmp_path / "sharded"
    directory.mkdir()
    for name, names in shards.items():
        save_file({k: hf[k].contiguous() for k in names}, str(directory / name))
    weight_map = {k: name for name, names in shards.items() for k in names}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    state = open_encoder(directory).load()
    assert all(torch.equal(state[k], pretrained_state[k]) for k in pretrained_state)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        open_encoder(tmp_path / "nope")
    assert one_line(exc) == f"checkpoint not found: {tmp_path / 'nope'}"


def test_directory_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no supported weights in"):
        open_encoder(tmp_path / "empty")


def test_unknown_layout_names_some_keys(tmp_path):
    save_file({"encoder.block.0.weight": torch.zeros(2, 2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError) as exc:
        open_encoder(tmp_path / "x.safetensors")
    assert "unknown checkpoint layout" in one_line(exc) and "encoder.block.0.weight" in str(exc.value)


def test_corrupt_file(tmp_path, pretrained_state):
    path = write_open_clip(pretrained_state, tmp_path / "good.safetensors")
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file at all" * 10)
    for name in ("truncated.safetensors", "garbage.safetensors"):
        with pytest.raises(CheckpointError) as exc:
            open_encoder(tmp_path / name)
        assert one_line(exc).startswith(f"corrupt checkpoint {tmp_path / name}")


def test_nan_weights_are_named(tmp_path, pretrained_state):
    bad = dict(pretrained_state)
    bad["transformer.resblocks.1.mlp.c_fc.weight"] = bad["transformer.resblocks.1.mlp.c_fc.weight"].clone()
    bad["transformer.resblocks.1.mlp.c_fc.weight"][3, 4] = float("nan")
    reader = open_encoder(write_open_clip(bad, tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError) as exc:
        reader.load()
    assert one_line(exc) == (
        f"checkpoint {tmp_path / 'nan.safetensors'} has NaN or Inf values in transformer.resblocks.1.mlp.c_fc.weight"
    )


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, pretrained_state):
    wider = VisionArch(**{**TINY.as_dict(), "width": 48, "heads": 3})
    base = open_encoder(write_open_clip(pretrained_state, tmp_path / "base.safetensors"))
    other = open_encoder(write_hf(random_encoder(wider), tmp_path / "wide", wider))
    with pytest.raises(CheckpointError) as exc:
        check_compatible(base, other)
    message = one_line(exc)
    assert "shape mismatch at class_embedding: pretrained (32,) vs" in message and "(48,)" in message
    assert "width 48 vs 32" in message


def test_missing_and_extra_keys_are_named(tmp_path, pretrained_state):
    base = open_encoder(write_open_clip(pretrained_state, tmp_path / "base.safetensors"))
    fewer = {k: v for k, v in pretrained_state.items() if k != "ln_post.bias"}
    with pytest.raises(CheckpointError, match=r"lacks parameter ln_post\.bias"):
        check_compatible(base, open_encoder(write_open_clip(fewer, tmp_path / "fewer.safetensors")))
    deeper = random_encoder(VisionArch(**{**TINY.as_dict(), "layers": 3}))
    with pytest.raises(CheckpointError) as exc:
        check_compatible(base, open_encoder(write_open_clip(deeper, tmp_path / "deeper.safetensors")))
    assert "transformer.resblocks.2." in one_line(exc) and "blocks 3 vs 2" in str(exc.value)


def test_pickle_needs_opt_in_and_then_loads_weights_only(tmp_path, pretrained_state):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": {"module." + k: v for k, v in to_hf(pretrained_state).items()}}, path)
    with pytest.raises(CheckpointError) as exc:
        open_encoder(path)
    assert "the allow-pickle option" in one_line(exc)
    state = open_encoder(path, allow_pickle=True).load()
    assert all(torch.equal(state[k], pretrained_state[k]) for k in pretrained_state)


class NotATensor:
    """An arbitrary class: a weights_only unpickler must refuse to build it."""


def test_pickle_with_python_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": NotATensor()}, path)
    with pytest.raises(CheckpointError) as exc:
        open_encoder(path, allow_pickle=True)
    assert one_line(exc).startswith(f"corrupt or unsafe pickle checkpoint {path}")


def test_unsupported_file_type(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unsupported file type \.npz"):
        resolve_source(tmp_path / "weights.npz")


def test_empty_checkpoint_list(tmp_path, pretrained_state):
    base = write_open_clip(pretrained_state, tmp_path / "base.safetensors")
    with pytest.raises(CheckpointError, match="no fine-tuned checkpoints given"):
        ContinualMerge("opcm", str(base), [])


def test_fine_tuned_checkpoints_must_agree_with_each_other(tmp_path, pretrained_state):
    base = write_open_clip(pretrained_state, tmp_path / "base.safetensors")
    with_projection = write_open_clip(finetuned(pretrained_state, 1), tmp_path / "a.safetensors")
    without = write_hf({k: v for k, v in finetuned(pretrained_state, 2).items() if k != "proj"}, tmp_path / "b")
    with pytest.raises(CheckpointError, match="differ at parameter proj"):
        ContinualMerge("opcm", str(base), [str(with_projection), str(without)]).prepare()
