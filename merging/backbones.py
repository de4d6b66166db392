"""Backbones: a whole CLIP model (image and text towers), its tokenizer and preprocessing.

The image tower is what gets merged; the text tower turns class names into zero-shot
heads. ``mini`` is the embedded mini benchmark's CLIP, stored in open_clip's Hub format
(``open_clip_config.json`` + ``open_clip_model.safetensors``) in ``assets/mini/base``;
``local-dir:PATH`` names any folder in that format, and ``hf-hub:ORG/NAME[@REV]`` a Hub
repository in it (only its config and safetensors weights are fetched). Weights are read
with safetensors, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .architecture import VisionArch
from .errors import MergingError
from .hub import HF_HUB_PREFIX, HubError, fetch, parse_hub_id
from .tasks import ASSETS

MINI = "mini"
LOCAL_DIR = "local-dir:"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocess:
    """CLIP's evaluation preprocessing: RGB, resize of the short side, centre crop, mean/std."""

    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def key(self) -> str:
        return f"{self.image_size}-{self.interpolation}-{self.resize_mode}"


@dataclass
class Backbone:
    """A loaded CLIP model in eval mode on the CPU, with what evaluation needs around it."""

    name: str
    model: nn.Module
    tokenizer: Any
    preprocess: Preprocess
    fingerprint: str
    source: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def visual_state(self) -> dict[str, torch.Tensor]:
        """The pretrained image encoder under canonical (open_clip VisionTransformer) keys."""
        return {k: v.detach().clone() for k, v in self.model.visual.state_dict().items()}

    @property
    def arch(self) -> VisionArch:
        shapes = {k: tuple(v.shape) for k, v in self.model.visual.state_dict().items()}
        hints = VisionArch.hints_from_open_clip_config(self.config) if self.config else {}
        return VisionArch.from_shapes(shapes, **hints)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())


OPEN_CLIP_FILES = ("open_clip_config.json", "open_clip_model.safetensors")


def backbone_directory(name: str) -> Path:
    """The open_clip-format folder a backbone name refers to (fetched from the Hub for hf-hub:)."""
    if name == MINI:
        return ASSETS / "mini" / "base"
    if name.startswith(LOCAL_DIR):
        return Path(name[len(LOCAL_DIR) :]).expanduser()
    if name.startswith(HF_HUB_PREFIX):
        ref = parse_hub_id(name)

        def choose(files: list[str]) -> list[str]:
            missing = [f for f in OPEN_CLIP_FILES if f not in files]
            if missing:
                raise HubError(
                    f"backbone {name}: the repository lacks {missing[0]} (an open_clip Hub model has both "
                    f"{' and '.join(OPEN_CLIP_FILES)})"
                )
            return list(OPEN_CLIP_FILES)

        return fetch(ref, choose, OPEN_CLIP_FILES)
    raise MergingError(f"unknown backbone {name!r}; available: {MINI}, {HF_HUB_PREFIX}ORG/NAME, {LOCAL_DIR}PATH")


@lru_cache(maxsize=4)
def load_backbone(name: str) -> Backbone:
    """Load a backbone once per process (it is shared by every run that names it)."""
    import open_clip

    directory = backbone_directory(name)
    config_path = directory / "open_clip_config.json"
    weights_path = directory / "open_clip_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        hint = " (build it with python scripts/build_mini_benchmark.py)" if name == MINI else ""
        raise MergingError(
            f"backbone {name}: {directory} lacks open_clip_config.json or open_clip_model.safetensors{hint}"
        )
    config = json.loads(config_path.read_text())
    if config.get("model_cfg") is None:
        raise MergingError(f"backbone {name}: {config_path} has no model_cfg")
    model = open_clip.create_model(f"{LOCAL_DIR}{directory}", load_weights=False)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise MergingError(f"backbone {name}: cannot read {weights_path}: {exc}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise MergingError(f"backbone {name}: weights do not match open_clip_config.json (at {first})")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"{LOCAL_DIR}{directory}")
    pre = config.get("preprocess_cfg", {})
    size = config["model_cfg"]["vision_cfg"]["image_size"]
    preprocess = Preprocess(
        image_size=size if isinstance(size, int) else size[0],
        mean=tuple(pre.get("mean", OPENAI_MEAN)),
        std=tuple(pre.get("std", OPENAI_STD)),
        interpolation=pre.get("interpolation", "bicubic"),
        resize_mode=pre.get("resize_mode", "shortest"),
    )
    stat = weights_path.stat()
    fingerprint = hashlib.sha1(
        f"{name}|{weights_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    ).hexdigest()
    return Backbone(name, model, tokenizer, preprocess, fingerprint[:16], directory, config)
