"""Layout detection and the Hugging Face ↔ open_clip conversion, proven numerically."""

from __future__ import annotations

import shutil

import pytest
import torch

from merging.errors import CheckpointError
from merging.families.clip_vit.architecture import VisionArch
from merging.families.clip_vit.layouts import Layout, detect_layout, to_canonical, to_hf, to_open_clip
from merging.families.clip_vit.saving import save_encoder
from merging.io.checkpoints import open_encoder

transformers = pytest.importorskip("transformers")


def tiny_hf_model(act: str = "quick_gelu", seed: int = 0):
    """A random transformers CLIPVisionModelWithProjection, LayerNorms perturbed off 1/0."""
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
        projection_dim=16,
        hidden_act=act,
    )
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def hf_state(model) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if not any(k.startswith("vision_model.") for k in state):  # transformers 5 may drop the prefix
        state = {("vision_model." + k if k != "visual_projection.weight" else k): v for k, v in state.items()}
    return state


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_to_open_clip_gives_the_same_embeddings(act):
    hf = tiny_hf_model(act)
    canonical = to_canonical(hf_state(hf))
    hints = VisionArch.hints_from_hf_config(hf.config.to_dict())
    arch = VisionArch.from_shapes({k: tuple(v.shape) for k, v in canonical.items()}, **hints)
    assert arch.heads == 4 and arch.quick_gelu == (act == "quick_gelu") and arch.output_dim == 16
    visual = arch.build_open_clip()
    visual.load_state_dict(canonical, strict=True)
    images = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        expected = hf(pixel_values=images).image_embeds
        got = visual(images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_round_trips_are_exact():
    state = hf_state(tiny_hf_model())
    canonical = to_canonical(state)
    back = to_hf(canonical)
    assert set(back) == set(state) - {"vision_model.embeddings.position_ids"}
    for key, value in back.items():
        assert torch.equal(value, state[key]), key
    again = to_canonical(back)
    assert set(again) == set(canonical) and all(torch.equal(again[k], canonical[k]) for k in canonical)
    from_open_clip = to_canonical(to_open_clip(canonical))
    assert all(torch.equal(from_open_clip[k], canonical[k]) for k in canonical)


def test_detects_every_layout():
    canonical = to_canonical(hf_state(tiny_hf_model()))
    hf = to_hf(canonical)
    assert detect_layout(hf) is Layout.HF_CLIP_VISION
    assert detect_layout({**hf, "text_model.embeddings.token_embedding.weight": torch.zeros(1)}) is Layout.HF_CLIP
    no_prefix = {k.removeprefix("vision_model."): v for k, v in hf.items()}
    assert detect_layout(no_prefix) is Layout.HF_CLIP_VISION
    assert set(to_canonical(no_prefix)) == set(canonical)
    assert detect_layout(to_open_clip(canonical)) is Layout.OPEN_CLIP
    assert detect_layout(canonical) is Layout.OPEN_CLIP_VISUAL
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        detect_layout({"encoder.block.0.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="ResNet"):
        detect_layout({"visual.conv1.weight": torch.zeros(1), "visual.layer1.0.conv1.weight": torch.zeros(1)})


def test_clip_model_layout_keeps_only_the_image_tower(tmp_path):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=8,
        ),
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=99,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
        ),
        projection_dim=16,
    )
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(tmp_path / "clip")
    reader = open_encoder(tmp_path / "clip")
    assert reader.layout is Layout.HF_CLIP
    assert reader.arch.heads == 4 and reader.arch.output_dim == 16
    state = reader.load()
    assert not any(k.startswith(("text", "token")) for k in state)
    visual = reader.arch.build_open_clip()
    visual.load_state_dict(state, strict=True)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model.visual_projection(model.vision_model(pixel_values=images).pooler_output)
        torch.testing.assert_close(visual(images), expected, atol=1e-5, rtol=0)


def test_written_hf_encoder_loads_with_transformers(tmp_path):
    hf = tiny_hf_model()
    canonical = to_canonical(hf_state(hf))
    arch = VisionArch.from_shapes({k: tuple(v.shape) for k, v in canonical.items()}, heads=4)
    written = save_encoder(canonical, tmp_path / "merged", "hf", arch, include_projection=False)
    assert [p.name for p in written] == ["model.safetensors", "config.json"]
    loaded = transformers.CLIPVisionModel.from_pretrained(tmp_path / "merged").eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixel_values=images).pooler_output,
            hf.vision_model(pixel_values=images).pooler_output,
            atol=1e-5,
            rtol=0,
        )
    # A bare .safetensors file next to the source config.json loads too.
    beside = tmp_path / "beside"
    beside.mkdir()
    save_encoder(canonical, beside / "model.safetensors", "hf", arch, include_projection=False)
    shutil.copy(tmp_path / "merged" / "config.json", beside / "config.json")
    again = transformers.CLIPVisionModel.from_pretrained(beside)
    reference = loaded.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in again.state_dict().items())


def test_open_clip_output_reads_back(tmp_path):
    canonical = to_canonical(hf_state(tiny_hf_model()))
    arch = VisionArch.from_shapes({k: tuple(v.shape) for k, v in canonical.items()}, heads=4)
    save_encoder(canonical, tmp_path / "m.safetensors", "open_clip", arch)
    reader = open_encoder(tmp_path / "m.safetensors")
    assert reader.layout is Layout.OPEN_CLIP
    state = reader.load()
    assert all(torch.equal(state[k], canonical[k]) for k in canonical)


def test_unconvertible_open_clip_parameter_is_named():
    canonical = to_canonical(hf_state(tiny_hf_model()))
    canonical["transformer.resblocks.0.ls_1.gamma"] = torch.ones(32)
    with pytest.raises(CheckpointError, match=r"ls_1\.gamma has no Hugging Face"):
        to_hf(canonical)
