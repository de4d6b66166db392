"""A whole transformers ``CLIPModel`` (image and text towers) as an open_clip ``CLIP``.

FusionBench's checkpoints were fine-tuned from the transformers repositories
``openai/clip-vit-*``; converting exactly those weights (rather than loading open_clip's
copy of OpenAI's) makes task vectors differences against the base they came from. The
image tower goes through :mod:`merging.families.clip_vit.layouts` (tested to 1e-5 against
transformers); the text tower is renamed here: q/k/v packed into ``in_proj``, the
projection transposed, the positional embedding taken from the position-embedding table. Pooling agrees: open_clip
takes the highest token id (the end-of-text token of CLIP's BPE), transformers the first
end-of-text token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from merging.errors import MergingError
from merging.families.clip_vit.layouts import Layout, to_canonical, to_open_clip

_TEXT_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_TEXT_RENAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def clip_model_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """open_clip's ``model_cfg`` for a transformers CLIPConfig (config.json as a dict)."""
    vision, text = hf_config["vision_config"], hf_config["text_config"]
    activations = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
    if not activations <= {"quick_gelu", "gelu"} or len(activations) != 1:
        raise MergingError(
            f"unsupported activations {sorted(activations)} (expected quick_gelu or gelu in both towers)"
        )
    return {
        "embed_dim": hf_config.get("projection_dim", 512),
        "quick_gelu": activations == {"quick_gelu"},
        "vision_cfg": {
            "image_size": vision.get("image_size", 224),
            "patch_size": vision.get("patch_size", 32),
            "width": vision["hidden_size"],
            "layers": vision["num_hidden_layers"],
            "head_width": vision["hidden_size"] // vision["num_attention_heads"],
            "mlp_ratio": vision["intermediate_size"] / vision["hidden_size"],
        },
        "text_cfg": {
            "context_length": text.get("max_position_embeddings", 77),
            "vocab_size": text.get("vocab_size", 49408),
            "width": text["hidden_size"],
            "heads": text["num_attention_heads"],
            "layers": text["num_hidden_layers"],
            "mlp_ratio": text["intermediate_size"] / text["hidden_size"],
        },
    }


def hf_clip_to_open_clip(state: Mapping[str, Tensor], hf_config: Mapping[str, Any]) -> dict[str, Tensor]:
    """open_clip CLIP state dict (``visual.*`` and the text tower) from a CLIPModel state dict."""
    keys = set(state)
    if "text_projection.weight" not in keys or "text_model.final_layer_norm.weight" not in keys:
        raise MergingError("not a transformers CLIPModel with a text tower (no text_model.* / text_projection)")
    vision = {k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_projection."))}
    out = to_open_clip(to_canonical(vision, Layout.HF_CLIP), prefix="visual.")
    layers: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        match = _TEXT_LAYER.match(key)
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = value
    for index, layer in sorted(layers.items()):
        prefix = f"transformer.resblocks.{index}."
        for part in ("weight", "bias"):
            out[prefix + f"attn.in_proj_{part}"] = torch.cat(
                [layer[f"self_attn.{p}_proj.{part}"] for p in ("q", "k", "v")]
            )
        for name, value in layer.items():
            if name.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
                continue
            stem, part = name.rsplit(".", 1)
            if stem not in _TEXT_RENAMES:
                raise MergingError(f"unexpected text-tower parameter text_model.encoder.layers.{index}.{name}")
            out[prefix + f"{_TEXT_RENAMES[stem]}.{part}"] = value
    context = hf_config["text_config"].get("max_position_embeddings", 77)
    out["token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = state["text_model.embeddings.position_embedding.weight"][:context]
    out["ln_final.weight"] = state["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = state["text_model.final_layer_norm.bias"]
    out["text_projection"] = state["text_projection.weight"].T.contiguous()
    out["logit_scale"] = state["logit_scale"].reshape(())
    return out
