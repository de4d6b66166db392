"""Backbones: a whole CLIP model (image and text towers), its tokenizer and preprocessing.

The image tower is what gets merged; the text tower turns class names into zero-shot
heads. ``mini`` is the embedded mini benchmark's CLIP, stored in open_clip's Hub format
(``open_clip_config.json`` + ``open_clip_model.safetensors``) in ``assets/mini/base``;
``local-dir:PATH`` names any folder in that format, and ``hf-hub:ORG/NAME[@REV]`` a Hub
repository in it (only its config and safetensors weights are fetched). Weights are read
with safetensors, never unpickled.

Every backbone of the plain CLIP architecture (all the lab's) is built by
:mod:`merging.evaluation.clip_model` with :mod:`merging.evaluation.tokenizer`, which equal
open_clip's bit for bit without importing it (about 2 s); any other configuration is built
by open_clip.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from merging.errors import MergingError
from merging.evaluation.tasks import ASSETS
from merging.families.clip_vit.architecture import VisionArch
from merging.io.hub import HF_HUB_PREFIX, HubError, fetch, parse_hub_id
from merging.io.paths import expanded

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
TRANSFORMERS_PREFIX = "transformers:"  # any transformers CLIPModel repository (or local copy), converted


class _QuietRandomInit(logging.Filter):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" when a model is
    created empty, which is how every backbone here starts before its weights are loaded."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _create_open_clip(*args: Any, **kwargs: Any) -> nn.Module:
    import open_clip

    quiet = _QuietRandomInit()
    logging.getLogger().addFilter(quiet)
    try:
        return open_clip.create_model(*args, **kwargs)
    finally:
        logging.getLogger().removeFilter(quiet)


def backbone_directory(name: str) -> Path:
    """The open_clip-format folder a backbone name refers to (fetched from the Hub for hf-hub:)."""
    if name == MINI:
        return ASSETS / "mini" / "base"
    if name.startswith(LOCAL_DIR):
        return expanded(name[len(LOCAL_DIR) :])
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
    raise MergingError(
        f"unknown backbone {name!r}; available: {', '.join(backbone_choices())}, {HF_HUB_PREFIX}ORG/NAME (open_clip "
        f"format), {TRANSFORMERS_PREFIX}ORG/NAME (a transformers CLIPModel), {LOCAL_DIR}PATH"
    )


@dataclass(frozen=True)
class OpenAIBackbone:
    """A CLIP with OpenAI's weights: its open_clip model name, the Hub repositories that hold
    it (open_clip weights on timm's repository, the transformers model on openai's) and the
    name FusionBench gives its fine-tuned checkpoints (``tanganke/<family>_<task>``)."""

    open_clip_name: str
    open_clip_repo: str
    transformers_repo: str
    family: str


OPENAI_BACKBONES = {
    "ViT-B-32": OpenAIBackbone(
        "ViT-B-32", "timm/vit_base_patch32_clip_224.openai", "openai/clip-vit-base-patch32", "clip-vit-base-patch32"
    ),
    "ViT-B-16": OpenAIBackbone(
        "ViT-B-16", "timm/vit_base_patch16_clip_224.openai", "openai/clip-vit-base-patch16", "clip-vit-base-patch16"
    ),
    "ViT-L-14": OpenAIBackbone(
        "ViT-L-14", "timm/vit_large_patch14_clip_224.openai", "openai/clip-vit-large-patch14", "clip-vit-large-patch14"
    ),
}


def openai_backbone(name: str) -> OpenAIBackbone | None:
    """The OpenAI CLIP a backbone name means: ``ViT-B-32`` (open_clip) or ``openai/clip-vit-base-patch32``."""
    if name in OPENAI_BACKBONES:
        return OPENAI_BACKBONES[name]
    bare = name[len(HF_HUB_PREFIX) :] if name.startswith(HF_HUB_PREFIX) else name
    return next((b for b in OPENAI_BACKBONES.values() if bare.split("@")[0] == b.transformers_repo), None)


def checkpoint_family(backbone: str) -> str | None:
    """FusionBench's name for fine-tunes of this backbone (``clip-vit-base-patch32``), if it has one."""
    spec = openai_backbone(backbone)
    return None if spec is None else spec.family


def backbone_choices() -> list[str]:
    return [MINI, *OPENAI_BACKBONES, *(b.transformers_repo for b in OPENAI_BACKBONES.values())]


@lru_cache(maxsize=4)
def load_backbone(name: str) -> Backbone:
    """Load a backbone once per process (it is shared by every run that names it).

    ``mini``, ``local-dir:PATH`` and ``hf-hub:ORG/NAME`` are open_clip-format folders;
    ``ViT-B-32``/``ViT-B-16``/``ViT-L-14`` are open_clip's models with OpenAI's weights
    (QuickGELU); ``openai/clip-vit-*`` are the transformers repositories, converted to
    open_clip with their text towers, so that task vectors of checkpoints fine-tuned from
    them are taken against exactly that base.
    """
    if name in OPENAI_BACKBONES:
        return _load_openai_open_clip(name, OPENAI_BACKBONES[name])
    spec = openai_backbone(name)
    if spec is not None or name.startswith(TRANSFORMERS_PREFIX):
        return _load_transformers(name, spec)
    return _load_open_clip_folder(name, backbone_directory(name))


def _plain_clip(model_cfg: dict[str, Any]) -> tuple[nn.Module, Any] | None:
    """The lab's own CLIP and tokenizer for a plain configuration (no open_clip import), else None."""
    from merging.evaluation.clip_model import build_clip, is_plain_config
    from merging.evaluation.tokenizer import tokenizer_for

    tokenizer = tokenizer_for(model_cfg.get("text_cfg", {})) if is_plain_config(model_cfg) else None
    return None if tokenizer is None else (build_clip(model_cfg), tokenizer)


def _load_open_clip_folder(name: str, directory: Path) -> Backbone:
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
    plain = _plain_clip(config["model_cfg"])
    if plain is not None:
        model, tokenizer = plain
    else:
        import open_clip

        model = _create_open_clip(f"{LOCAL_DIR}{directory}", load_weights=False)
        tokenizer = open_clip.get_tokenizer(f"{LOCAL_DIR}{directory}")
    return _assemble(name, model, tokenizer, config, weights_path, _read_weights(name, weights_path))


def _load_openai_open_clip(name: str, spec: OpenAIBackbone) -> Backbone:
    """open_clip's architecture (QuickGELU) with OpenAI's weights from timm's Hub repository."""
    import open_clip

    ref = parse_hub_id(HF_HUB_PREFIX + spec.open_clip_repo)

    def choose(files: list[str]) -> list[str]:
        if "open_clip_model.safetensors" not in files:
            raise HubError(f"backbone {name}: {spec.open_clip_repo} has no open_clip_model.safetensors")
        return ["open_clip_model.safetensors"]

    weights_path = fetch(ref, choose, ("open_clip_model.safetensors",)) / "open_clip_model.safetensors"
    model_cfg = dict(open_clip.get_model_config(spec.open_clip_name) or {})
    if not model_cfg:
        raise MergingError(f"backbone {name}: open_clip has no model config {spec.open_clip_name}")
    model_cfg["quick_gelu"] = True
    pretrained = open_clip.get_pretrained_cfg(spec.open_clip_name, "openai") or {}
    preprocess_cfg = {k: pretrained[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pretrained}
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    plain = _plain_clip(model_cfg)
    if plain is not None:
        model, tokenizer = plain
    else:
        model = _create_open_clip(spec.open_clip_name, force_quick_gelu=True, load_weights=False)
        tokenizer = open_clip.get_tokenizer(spec.open_clip_name)
    return _assemble(name, model, tokenizer, config, weights_path, _read_weights(name, weights_path))


def _load_transformers(name: str, spec: OpenAIBackbone | None) -> Backbone:
    """A transformers CLIPModel repository (config.json + model.safetensors), converted to open_clip."""
    from merging.families.clip_vit.conversion import clip_model_config, hf_clip_to_open_clip
    from merging.io.hub import choose_model_files

    if spec is not None:
        repo = spec.transformers_repo
        revision = name.split("@", 1)[1] if "@" in name else None
    else:
        repo, _, revision = name[len(TRANSFORMERS_PREFIX) :].partition("@")
    folder = expanded(repo)
    if not folder.is_dir():  # not a local copy of such a repository: the Hub's
        ref = parse_hub_id(HF_HUB_PREFIX + repo + (f"@{revision}" if revision else ""))
        folder = fetch(ref, lambda files: choose_model_files(files, source=str(ref)))
    hf_config = json.loads((folder / "config.json").read_text())
    if hf_config.get("model_type") != "clip" or "text_config" not in hf_config:
        raise MergingError(
            f"backbone {name}: {repo} is not a transformers CLIPModel with a text tower "
            f"(model_type {hf_config.get('model_type')!r})"
        )
    weights_path = folder / "model.safetensors"
    if not weights_path.is_file():
        raise MergingError(f"backbone {name}: {repo} has no model.safetensors")
    model_cfg = clip_model_config(hf_config)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {}}
    plain = _plain_clip(model_cfg)
    if plain is not None:
        model, tokenizer = plain
    else:
        import open_clip

        model = open_clip.model.CLIP(
            **{k: v for k, v in model_cfg.items() if k != "quick_gelu"}, quick_gelu=model_cfg["quick_gelu"]
        )
        tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=model_cfg["text_cfg"]["context_length"])
    state = hf_clip_to_open_clip(_read_weights(name, weights_path), hf_config)
    return _assemble(name, model, tokenizer, config, weights_path, state)


def _read_weights(name: str, path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise MergingError(f"backbone {name}: cannot read {path}: {exc}") from None


def _assemble(
    name: str, model: nn.Module, tokenizer: Any, config: dict, weights_path: Path, state: dict[str, torch.Tensor]
) -> Backbone:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "attn_mask"]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise MergingError(f"backbone {name}: weights do not match the model's configuration (at {first})")
    model.eval()
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
    return Backbone(name, model, tokenizer, preprocess, fingerprint[:16], weights_path.parent, config)
