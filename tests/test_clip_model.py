"""The lab's own CLIP (merging.evaluation.clip_model) against open_clip's: same names, same bits."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from merging.evaluation.backbones import MINI, backbone_directory
from merging.evaluation.clip_model import build_clip, is_plain_config

SMALL_GELU = {
    "embed_dim": 24,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 48, "layers": 2, "width": 64, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def mini_config() -> dict:
    return json.loads((backbone_directory(MINI) / "open_clip_config.json").read_text())["model_cfg"]


def pair(model_cfg: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """open_clip's CLIP with random weights, and the lab's with the same weights loaded."""
    torch.manual_seed(0)
    reference = open_clip.model.CLIP(
        **{k: v for k, v in model_cfg.items() if k != "quick_gelu"}, quick_gelu=model_cfg["quick_gelu"]
    ).eval()
    with torch.no_grad():  # open_clip leaves the biases at zero: make every parameter count
        for parameter in reference.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    ours = build_clip(model_cfg)
    loaded = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    return reference, ours


@pytest.mark.parametrize("model_cfg", [mini_config(), SMALL_GELU], ids=["mini (QuickGELU)", "GELU"])
def test_state_dict_names_and_shapes_are_open_clips(model_cfg):
    reference, ours = pair(model_cfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("model_cfg", [mini_config(), SMALL_GELU], ids=["mini (QuickGELU)", "GELU"])
def test_image_and_text_features_equal_open_clips_bit_for_bit(model_cfg):
    reference, ours = pair(model_cfg)
    size = model_cfg["vision_cfg"]["image_size"]
    images = torch.randn(7, 3, size, size)
    text = torch.randint(1, 49406, (5, model_cfg["text_cfg"]["context_length"]))
    text[:, 6] = 49407  # an end-of-text token, where the text features are read
    with torch.no_grad():
        assert torch.equal(ours.encode_image(images), reference.encode_image(images))
        assert torch.equal(ours.encode_text(text), reference.encode_text(text))
    assert torch.equal(ours.attn_mask, reference.attn_mask)
    assert float(ours.logit_scale) == float(reference.logit_scale)


def test_gradients_through_the_image_tower_equal_open_clips():
    """Data-driven methods (OTMF, MINGLE) train through the tower with functional_call."""
    reference, ours = pair(mini_config())
    images = torch.randn(4, 3, 32, 32)
    grads = []
    for model in (reference, ours):
        model.visual.train()
        model.visual.zero_grad()
        model.visual(images).square().sum().backward()
        grads.append({k: p.grad for k, p in model.visual.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        assert torch.equal(grads[0][key], grads[1][key]), key


def test_the_mini_backbone_is_built_without_open_clip_and_matches_it():
    from merging.evaluation.backbones import load_backbone

    backbone = load_backbone(MINI)
    assert type(backbone.model).__module__ == "merging.evaluation.clip_model"
    reference = open_clip.create_model(f"local-dir:{backbone_directory(MINI)}", load_weights=False).eval()
    reference.load_state_dict(backbone.model.state_dict(), strict=True)
    tokens = backbone.tokenizer(["a photo of a 7.", "a blurry photo of a tench."])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone.model.encode_text(tokens), reference.encode_text(tokens))
        assert torch.equal(backbone.model.encode_image(images), reference.encode_image(images))


@pytest.mark.parametrize(
    "change",
    [
        {"vision_cfg": {"ls_init_value": 1e-5}},
        {"vision_cfg": {"layers": [3, 4, 6, 3]}},
        {"vision_cfg": {"image_size": [48, 32]}},
        {"vision_cfg": {"timm_model_name": "vit_base_patch32_224"}},
        {"vision_cfg": {"attentional_pool": True}},
        {"vision_cfg": {"pool_type": "avg"}},
        {"vision_cfg": {"unknown_setting": 1}},
        {"text_cfg": {"hf_model_name": "xlm-roberta-base"}},
        {"text_cfg": {"proj_bias": True}},
        {"text_cfg": {"no_causal_mask": True}},
        {"custom_text": True},
        {"init_logit_bias": -10.0},
    ],
)
def test_any_other_architecture_is_left_to_open_clip(change):
    model_cfg = json.loads(json.dumps(SMALL_GELU))
    for key, value in change.items():
        if isinstance(value, dict):
            model_cfg[key].update(value)
        else:
            model_cfg[key] = value
    assert is_plain_config(SMALL_GELU)
    assert not is_plain_config(model_cfg)
    with pytest.raises(ValueError, match="not a plain CLIP"):
        build_clip(model_cfg)


def test_settings_at_open_clips_defaults_are_still_plain():
    model_cfg = json.loads(json.dumps(SMALL_GELU))
    model_cfg["vision_cfg"].update(pool_type="tok", patch_dropout=0.0, ls_init_value=None, image_size=[48, 48])
    model_cfg["text_cfg"].update(pool_type="argmax", proj_type="linear", embed_cls=False)
    assert is_plain_config(model_cfg)
