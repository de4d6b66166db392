"""CLIP with a ViT image tower and a causal text transformer, without importing open_clip.

Importing open_clip costs about 2 s on two cores (it imports torchvision, ``torch._dynamo``,
transformers and timm), which was a fifth of the default command-line run. Every backbone the
lab merges is the plain CLIP architecture, so it is built here from the same ``torch.nn``
modules, under the same parameter names and with the same operations in the same order as
open_clip 3.x's ``CLIP``: open_clip state dicts load as they are, and image and text features
are open_clip's bit for bit (``tests/test_clip_model.py``). A configuration with anything
else (layer scale, attentional pooling, a timm or Hugging Face tower, ...) is not plain, and
the backbone loader builds it with open_clip instead (:func:`is_plain_config`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# open_clip's defaults for the settings this module implements; any other value is not plain
_BLOCK_DEFAULTS: dict[str, Any] = {  # settings both towers' blocks share
    "ls_init_value": None,
    "final_ln_after_pool": False,
    "output_tokens": False,
    "act_kwargs": None,
    "norm_kwargs": None,
    "block_type": None,
    **dict.fromkeys(
        ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc"), False
    ),
}
_VISION_DEFAULTS: dict[str, Any] = {
    **_BLOCK_DEFAULTS,
    "patch_dropout": 0.0,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "pool_type": "tok",
    "timm_model_name": None,
}
_VISION_SIZES = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"}
_TEXT_DEFAULTS: dict[str, Any] = {
    **_BLOCK_DEFAULTS,
    "hf_tokenizer_name": None,
    "tokenizer_mode": None,
    "tokenizer_kwargs": None,
    "embed_cls": False,
    "pad_id": 0,
    "eos_id": 2,
    "no_causal_mask": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "hf_model_name": None,
}
_TEXT_SIZES = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_MODEL_KEYS = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}


def is_plain_config(model_cfg: Mapping[str, Any]) -> bool:
    """Whether an open_clip model config is the plain CLIP this module builds.

    Plain: a ViT image tower (integer depth, square images and patches, learnt positional
    embedding, class-token pooling, LayerNorm before and after, no layer scale) and open_clip's
    own causal text transformer (argmax pooling, a linear projection without bias), with every
    other setting at open_clip's default. Anything else goes to open_clip.
    """
    vision, text = model_cfg.get("vision_cfg"), model_cfg.get("text_cfg")
    if set(model_cfg) - _MODEL_KEYS or not isinstance(vision, Mapping) or not isinstance(text, Mapping):
        return False
    if not isinstance(vision.get("layers", 12), int) or model_cfg.get("embed_dim") is None:
        return False
    for size in (vision.get("image_size", 224), vision.get("patch_size", 16)):
        if isinstance(size, (list, tuple)) and len(set(size)) != 1:  # a non-square grid
            return False
    for cfg, sizes, defaults in ((vision, _VISION_SIZES, _VISION_DEFAULTS), (text, _TEXT_SIZES, _TEXT_DEFAULTS)):
        for key, value in cfg.items():
            if key not in sizes and (key not in defaults or value != defaults[key]):
                return False
    return True


class LayerNorm(nn.LayerNorm):
    """open_clip's LayerNorm: torch's, with the output cast back to the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        orig_type = x.dtype
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.to(orig_type)


class QuickGELU(nn.Module):
    """x · sigmoid(1.702 x), the activation OpenAI's CLIP was trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm attention and MLP, each with a residual connection (open_clip's block)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ls_1 = nn.Identity()
        self.ln_2 = LayerNorm(width)
        mlp_width = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, mlp_width)),
                    ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
                    ("c_proj", nn.Linear(mlp_width, width)),
                ]
            )
        )
        self.ls_2 = nn.Identity()

    def attention(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        attn_mask = attn_mask.to(x.dtype) if attn_mask is not None else None
        return self.attn(x, x, x, need_weights=False, attn_mask=attn_mask)[0]

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.ls_1(self.attention(self.ln_1(x), attn_mask=attn_mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)
        )

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


class VisionTransformer(nn.Module):
    """The image tower: patches, class token, blocks, the class token's LayerNorm and projection."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float,
        output_dim: int,
        quick_gelu: bool,
    ):
        super().__init__()
        self.image_size = (image_size, image_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.output_dim = output_dim
        self.attn_pool = None
        self.pool_type = "tok"
        self.final_ln_after_pool = False
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5  # open_clip's initial scale (the checkpoint's values replace it)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size[0] * self.grid_size[1] + 1, width))
        self.patch_dropout = nn.Identity()
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(self.patch_dropout(x))
        x = self.ln_post(self.transformer(x))
        pooled = x[:, 0]
        return pooled @ self.proj if self.proj is not None else pooled


def causal_mask(length: int) -> Tensor:
    """The additive mask that lets each text token attend to itself and earlier tokens only."""
    return torch.full((length, length), float("-inf")).triu_(1)


class CLIP(nn.Module):
    """open_clip's ``CLIP`` for the plain architecture: ``visual`` plus the text tower's parts."""

    def __init__(self, embed_dim: int, vision_cfg: Mapping[str, Any], text_cfg: Mapping[str, Any], quick_gelu: bool):
        super().__init__()
        image_size, patch_size = vision_cfg.get("image_size", 224), vision_cfg.get("patch_size", 16)
        width = vision_cfg.get("width", 768)
        self.visual = VisionTransformer(
            image_size=image_size if isinstance(image_size, int) else image_size[0],
            patch_size=patch_size if isinstance(patch_size, int) else patch_size[0],
            width=width,
            layers=vision_cfg.get("layers", 12),
            heads=width // vision_cfg.get("head_width", 64),
            mlp_ratio=vision_cfg.get("mlp_ratio", 4.0),
            output_dim=embed_dim,
            quick_gelu=quick_gelu,
        )
        text_width = text_cfg.get("width", 512)
        self.context_length = text_cfg.get("context_length", 77)
        self.vocab_size = text_cfg.get("vocab_size", 49408)
        self.transformer = Transformer(
            text_width,
            text_cfg.get("layers", 12),
            text_cfg.get("heads", 8),
            text_cfg.get("mlp_ratio", 4.0),
            quick_gelu,
        )
        self.token_embedding = nn.Embedding(self.vocab_size, text_width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(self.context_length, text_width))
        self.ln_final = LayerNorm(text_width)
        self.text_projection = nn.Parameter(text_width**-0.5 * torch.randn(text_width, embed_dim))
        self.text_pool_type = "argmax"
        self.register_buffer("attn_mask", causal_mask(self.context_length), persistent=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = None

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        cast_dtype = self.transformer.resblocks[0].mlp.c_fc.weight.dtype
        x = self.token_embedding(text).to(cast_dtype)
        x = x + self.positional_embedding.to(cast_dtype)
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]  # the end-of-text token
        x = x @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x


def build_clip(model_cfg: Mapping[str, Any]) -> CLIP:
    """A plain CLIP of ``model_cfg``'s shape on the CPU, in eval mode, to load weights into.

    Its parameters start from torch's default initialisation (0.6 s for ViT-B/32 here), as
    open_clip's do; building on the meta device instead would import ``torch._dynamo``
    (through torch's reference initialisers), which costs more than it saves.
    """
    if not is_plain_config(model_cfg):
        raise ValueError("not a plain CLIP configuration (build it with open_clip)")
    model = CLIP(
        model_cfg["embed_dim"], model_cfg["vision_cfg"], model_cfg["text_cfg"], bool(model_cfg.get("quick_gelu"))
    )
    return model.eval()
