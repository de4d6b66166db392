"""CLIP ViT image encoders as a model family: the one place the rest of the library meets them."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from merging.families.base import ModelFamily, Recipe
from merging.families.clip_vit import matrices
from merging.families.clip_vit.architecture import VisionArch
from merging.families.clip_vit.layouts import Layout, canonical_recipes, recognise_layout
from merging.families.clip_vit.saving import encoder_files, save_encoder

if TYPE_CHECKING:
    from merging.io.checkpoints import ResolvedSource


class ClipViT(ModelFamily):
    """CLIP ViT image encoders in the open_clip and Hugging Face layouts (canonical: open_clip's keys)."""

    name: ClassVar[str] = "clip_vit"
    kind: ClassVar[str] = "a CLIP ViT image encoder"
    formats: ClassVar[tuple[str, ...]] = ("hf", "open_clip")
    # A transformers CLIPVisionModel has no output projection, which FusionBench keeps frozen.
    optional_in_finetuned: ClassVar[frozenset[str]] = frozenset({"proj"})

    def recognise(self, keys: Collection[str]) -> Layout | None:
        return recognise_layout(keys)

    def recipes(self, layout: Any, keys: Collection[str]) -> dict[str, Recipe]:
        return canonical_recipes(layout, keys)

    def architecture(self, shapes: Mapping[str, tuple[int, ...]], resolved: ResolvedSource | None = None) -> VisionArch:
        """Sizes from the shapes; heads, activation and eps from a config file when there is one."""
        hints: dict[str, Any] = {}
        if resolved is not None and resolved.config_kind == "hf":
            hints = VisionArch.hints_from_hf_config(resolved.config or {})
        elif resolved is not None and resolved.config_kind == "open_clip":
            hints = VisionArch.hints_from_open_clip_config(resolved.config or {})
        if "proj" in shapes:
            hints["output_dim"] = shapes["proj"][1]
        return VisionArch.from_shapes(shapes, **hints)

    def architecture_difference(self, pretrained: VisionArch, finetuned: VisionArch) -> str:
        fields = (("width", "width"), ("layers", "blocks"), ("patch_size", "patch size"), ("image_size", "image size"))
        diffs = [
            f"{label} {getattr(finetuned, name)} vs {getattr(pretrained, name)}"
            for name, label in fields
            if getattr(pretrained, name) != getattr(finetuned, name)
        ]
        return "a different architecture: " + ", ".join(diffs) + " in the pretrained encoder" if diffs else ""

    def matrix_views(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        return matrices.matrix_views(key, tensor)

    def matrix_labels(self, keys: Iterable[str]) -> list[str]:
        return matrices.matrix_labels(keys)

    def get_matrix(self, state: Mapping[str, Tensor], label: str) -> Tensor:
        return matrices.get_matrix(state, label)

    def matrix_type(self, label: str) -> str:
        return matrices.matrix_type(label)

    def default_spectrum_label(self, keys: Iterable[str]) -> str | None:
        """The last block's MLP input weight: the widest matrix, where task vectors differ most."""
        blocks = sorted({int(k.split(".")[2]) for k in keys if k.startswith("transformer.resblocks.")})
        return f"transformer.resblocks.{blocks[-1]}.mlp.c_fc.weight" if blocks else None

    def output_architecture(self, pretrained: Any, finetuned: Sequence[Any]) -> VisionArch:
        """Heads and activation from a config file when any input has one (the fine-tuned
        checkpoints first), sizes from the weights, the output size from the pretrained encoder."""
        with_config = next((m for m in (*finetuned, pretrained) if m.config is not None), pretrained)
        return replace(with_config.arch, output_dim=pretrained.arch.output_dim)

    def output_files(self, out: str | Path, fmt: str) -> list[Path]:
        return encoder_files(out, self.check_format(fmt))  # type: ignore[arg-type]

    def save(
        self,
        state: Mapping[str, Tensor],
        out: str | Path,
        fmt: str,
        arch: Any,
        dtype: torch.dtype | None = None,
        metadata: Mapping[str, str] | None = None,
        finetuned_keys: Collection[str] | None = None,
    ) -> list[Path]:
        """Without a projection in the fine-tuned checkpoints, the Hugging Face output has none either."""
        include_projection = finetuned_keys is None or "proj" in finetuned_keys
        return save_encoder(state, out, self.check_format(fmt), arch, include_projection, dtype, metadata)  # type: ignore[arg-type]


CLIP_VIT = ClipViT()
