"""Real backbones: transformers CLIPModel converted to open_clip, OpenAI open_clip models, presets."""

from __future__ import annotations

import json

import pytest
import torch

from merging.errors import MergingError
from merging.evaluation.backbones import OPENAI_BACKBONES, OpenAIBackbone, checkpoint_family, load_backbone
from merging.evaluation.tasks import registry
from merging.evaluation.zeroshot import build_head
from merging.experiment.runner import preset_checkpoints

from .hubcache import add_folder, add_repo

transformers = pytest.importorskip("transformers")


def tiny_clip_model(act: str = "quick_gelu", seed: int = 0):
    """A random transformers CLIPModel with CLIP's real vocabulary and context, tiny otherwise."""
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act=act)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=77, **tower),
        vision_config=dict(image_size=32, patch_size=8, **tower),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def features(output):
    """transformers 5 returns a model output from get_*_features; earlier versions a tensor."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    load_backbone.cache_clear()
    yield cache
    load_backbone.cache_clear()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_transformers_clip_converts_with_its_text_tower(tmp_path, act):
    model = tiny_clip_model(act)
    model.save_pretrained(tmp_path / "clip")
    load_backbone.cache_clear()
    backbone = load_backbone(f"transformers:{tmp_path / 'clip'}")
    prompts = ["a photo of a cat.", "a blurry photo of a very long and winding road, seen from above"]
    tokens = backbone.tokenizer(prompts)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            backbone.model.encode_text(tokens), features(model.get_text_features(input_ids=tokens)), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            backbone.model.encode_image(images),
            features(model.get_image_features(pixel_values=images)),
            atol=1e-5,
            rtol=0,
        )
    assert backbone.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    assert backbone.arch.quick_gelu == (act == "quick_gelu") and backbone.preprocess.image_size == 32
    head = build_head(backbone, ("cat", "dog"), ("a photo of a {}.",))
    assert head.shape == (2, 16) and torch.allclose(head.norm(dim=-1), torch.ones(2))
    load_backbone.cache_clear()


def test_openai_transformers_backbone_by_its_hub_id(offline_hub, tmp_path):
    """``openai/clip-vit-base-patch32`` resolves through the Hub cache (here a tiny stand-in)."""
    model = tiny_clip_model(seed=1)
    model.save_pretrained(tmp_path / "clip")
    add_folder(offline_hub, "openai/clip-vit-base-patch32", tmp_path / "clip")
    backbone = load_backbone("openai/clip-vit-base-patch32")
    tokens = backbone.tokenizer(["a photo of a dog."])
    with torch.no_grad():
        torch.testing.assert_close(
            backbone.model.encode_text(tokens), features(model.get_text_features(input_ids=tokens)), atol=1e-5, rtol=0
        )
    with pytest.raises(MergingError, match="openai/clip-vit-base-patch16 is not in the local Hub cache"):
        load_backbone("openai/clip-vit-base-patch16")


def test_openai_open_clip_backbone_reads_timms_safetensors(offline_hub, tmp_path, monkeypatch):
    """``ViT-B-32`` = open_clip's config with QuickGELU + timm's open_clip_model.safetensors (tiny stand-in)."""
    import open_clip
    from safetensors.torch import save_file

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (tmp_path / "Tiny-Test-ViT.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "Tiny-Test-ViT.json")
    reference = open_clip.create_model("Tiny-Test-ViT", force_quick_gelu=True, load_weights=False).eval()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "w.safetensors"))
    add_repo(offline_hub, "testorg/tiny.openai", {"open_clip_model.safetensors": tmp_path / "w.safetensors"})
    spec = OpenAIBackbone("Tiny-Test-ViT", "testorg/tiny.openai", "openai/none", "clip-vit-base-patch32")
    monkeypatch.setitem(OPENAI_BACKBONES, "ViT-B-32", spec)
    backbone = load_backbone("ViT-B-32")
    assert backbone.arch.quick_gelu and backbone.config["model_cfg"]["quick_gelu"] is True
    images, tokens = torch.randn(2, 3, 32, 32), backbone.tokenizer(["a cat"])
    with torch.no_grad():
        torch.testing.assert_close(backbone.model.encode_image(images), reference.encode_image(images))
        torch.testing.assert_close(backbone.model.encode_text(tokens), reference.encode_text(tokens))


def test_standard_presets_name_fusionbench_checkpoints_for_the_backbone():
    ta8 = preset_checkpoints("TA8", backbone="ViT-B-32")
    assert [s.task for s in ta8] == list(registry().task_set("TA8"))
    assert ta8[0].source == "tanganke/clip-vit-base-patch32_sun397"
    assert all(s.source == f"tanganke/clip-vit-base-patch32_{s.task}" for s in ta8)
    tall20 = preset_checkpoints("TALL20", backbone="openai/clip-vit-large-patch14")
    assert len(tall20) == 20 and tall20[-1].source.startswith("tanganke/clip-vit-large-patch14_")
    assert preset_checkpoints("TALL14", backbone="ViT-B-16")[0].source == "tanganke/clip-vit-base-patch16_sun397"
    assert checkpoint_family("hf-hub:openai/clip-vit-base-patch16") == "clip-vit-base-patch16"
    with pytest.raises(
        MergingError, match=r"preset TA8 has Hub checkpoints only for the OpenAI CLIP backbones.*not for backbone mini"
    ):
        preset_checkpoints("TA8", backbone="mini")
    assert preset_checkpoints("mini-8", backbone="ViT-B-32")[0].task == "mini-land-cover"  # mini presets are local


def test_a_transformers_repository_without_text_tower_is_refused(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(tmp_path / "v")
    load_backbone.cache_clear()
    with pytest.raises(MergingError, match="is not a transformers CLIPModel with a text tower"):
        load_backbone(f"transformers:{tmp_path / 'v'}")
