"""The shape of a CLIP ViT image encoder, and building it as an open_clip module.

Weights alone fix every size but the number of attention heads and the activation, so
those come from the checkpoint's config (Hugging Face ``config.json`` or open_clip's
``open_clip_config.json``) when there is one, and otherwise from the conventions of the
OpenAI CLIP models (64-dimensional heads, QuickGELU).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

from merging.errors import CheckpointError

OPENAI_HEAD_WIDTH = 64


@dataclass(frozen=True)
class VisionArch:
    """Hyper-parameters of a CLIP ViT image encoder."""

    width: int
    layers: int
    heads: int
    mlp_width: int
    patch_size: int
    image_size: int
    output_dim: int | None
    quick_gelu: bool = True
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], **known: Any) -> VisionArch:
        """Infer the architecture from canonical parameter shapes; ``known`` overrides guesses."""
        try:
            width, _, patch, _ = shapes["conv1.weight"]
            tokens = shapes["positional_embedding"][0]
            mlp_width = shapes["transformer.resblocks.0.mlp.c_fc.weight"][0]
        except KeyError as missing:
            raise CheckpointError(f"cannot infer the ViT architecture: no {missing.args[0]} parameter") from None
        layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("transformer.resblocks."))
        grid = math.isqrt(tokens - 1)
        if grid * grid != tokens - 1:
            raise CheckpointError(f"positional_embedding has {tokens} tokens, not 1 + a square grid of patches")
        output_dim = shapes["proj"][1] if "proj" in shapes else None
        guessed = cls(
            width=width,
            layers=layers,
            heads=max(1, width // OPENAI_HEAD_WIDTH),
            mlp_width=mlp_width,
            patch_size=patch,
            image_size=grid * patch,
            output_dim=output_dim,
        )
        return replace(guessed, **{k: v for k, v in known.items() if v is not None})

    @staticmethod
    def hints_from_hf_config(config: Mapping[str, Any]) -> dict[str, Any]:
        """Heads, activation, eps and projection size from a transformers CLIP config.json."""
        vision = config.get("vision_config", config)
        act = vision.get("hidden_act", "quick_gelu")
        if act not in ("quick_gelu", "gelu"):
            raise CheckpointError(f"unsupported activation {act!r} in config.json (expected quick_gelu or gelu)")
        return {
            "heads": vision.get("num_attention_heads"),
            "quick_gelu": act == "quick_gelu",
            "layer_norm_eps": vision.get("layer_norm_eps"),
            "output_dim": config.get("projection_dim") if "vision_config" in config else None,
        }

    @staticmethod
    def hints_from_open_clip_config(config: Mapping[str, Any]) -> dict[str, Any]:
        """Heads and activation from an open_clip ``open_clip_config.json`` (or a bare model config)."""
        model_cfg = config.get("model_cfg", config)
        vision = model_cfg.get("vision_cfg", {})
        width = vision.get("width")
        head_width = vision.get("head_width", OPENAI_HEAD_WIDTH)
        return {
            "heads": width // head_width if width else None,
            "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
            "output_dim": model_cfg.get("embed_dim"),
        }

    def hf_config(self) -> dict[str, Any]:
        """A transformers ``CLIPVisionConfig`` dict that ``CLIPVisionModel.from_pretrained`` accepts."""
        return {
            "architectures": ["CLIPVisionModel"],
            "model_type": "clip_vision_model",
            "hidden_size": self.width,
            "intermediate_size": self.mlp_width,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_channels": 3,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_act": "quick_gelu" if self.quick_gelu else "gelu",
            "layer_norm_eps": self.layer_norm_eps,
            "projection_dim": self.output_dim or self.width,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "initializer_factor": 1.0,
        }

    def build_open_clip(self):
        """An open_clip ``VisionTransformer`` of this shape (random weights), in eval mode."""
        from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer
        from torch import nn

        model = VisionTransformer(
            image_size=self.image_size,
            patch_size=self.patch_size,
            width=self.width,
            layers=self.layers,
            heads=self.heads,
            # open_clip computes int(width * mlp_ratio); the half keeps float rounding from losing one
            mlp_ratio=(self.mlp_width + 0.5) / self.width,
            output_dim=self.output_dim or self.width,
            act_layer=QuickGELU if self.quick_gelu else nn.GELU,
            norm_layer=partial(LayerNorm, eps=self.layer_norm_eps),
        )
        if self.output_dim is None:
            model.proj = None
        return model.eval()

    @property
    def summary(self) -> str:
        """Depth and width, for the line that describes an opened checkpoint."""
        return f"{self.layers} blocks of width {self.width}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
