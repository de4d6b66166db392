"""A second, tiny model family: a stack of ``nn.Linear`` layers (a multi-layer perceptron).

It exists to keep the family boundary honest: every method and the ``merge`` command work
on it through :class:`merging.families.base.ModelFamily` alone, so anything CLIP-specific
that leaks out of :mod:`merging.families.clip_vit` shows up as a failure here.

Canonical keys are those of :class:`MLP`'s state dict, ``layers.N.weight`` (out × in) and
``layers.N.bias``; indices may skip numbers, as in an ``nn.Sequential`` with activations
between the layers. Every weight is a matrix (OPCM projects it). A merged MLP is written as
one ``.safetensors`` file holding the state dict as is.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from merging.errors import CheckpointError
from merging.families.base import ModelFamily, Recipe, cast_for_saving

if TYPE_CHECKING:
    from merging.io.checkpoints import ResolvedSource

_KEY = re.compile(r"^layers\.(?P<n>\d+)\.(?P<p>weight|bias)$")
_WEIGHT = re.compile(r"^layers\.\d+\.weight$")


class MLPLayout(str, Enum):
    """The one layout: an MLP's own state dict."""

    LAYERS = "mlp"

    @property
    def description(self) -> str:
        return "MLP of nn.Linear layers (layers.N.weight, layers.N.bias)"

    @property
    def format(self) -> str:
        return "safetensors"


@dataclass(frozen=True)
class MLPArch:
    """Layer sizes: ``sizes[0]`` inputs, then each layer's outputs; whether the layers have biases."""

    sizes: tuple[int, ...]
    bias: bool = True

    @property
    def summary(self) -> str:
        return f"{len(self.sizes) - 1} linear layers {'→'.join(map(str, self.sizes))}"

    def as_dict(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes), "bias": self.bias}

    def build(self) -> MLP:
        """An :class:`MLP` of this shape with random weights."""
        return MLP(self.sizes, self.bias)


class MLP(nn.Module):
    """Linear layers with ReLU between them; its state dict is the family's canonical layout."""

    def __init__(self, sizes: Iterable[int], bias: bool = True):
        super().__init__()
        sizes = list(sizes)
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in itertools.pairwise(sizes))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x) if index == 0 else layer(torch.relu(x))
        return x


class MLPFamily(ModelFamily):
    """Checkpoints whose every tensor is ``layers.N.weight`` or ``layers.N.bias``."""

    name: ClassVar[str] = "mlp"
    kind: ClassVar[str] = "an MLP of nn.Linear layers (layers.N.weight)"
    formats: ClassVar[tuple[str, ...]] = ("safetensors",)

    def recognise(self, keys: Collection[str]) -> MLPLayout | None:
        if keys and all(_KEY.match(k) for k in keys) and any(_WEIGHT.match(k) for k in keys):
            return MLPLayout.LAYERS
        return None

    def recipes(self, layout: Any, keys: Collection[str]) -> dict[str, Recipe]:
        return {k: Recipe((k,)) for k in keys}

    def architecture(self, shapes: Mapping[str, tuple[int, ...]], resolved: ResolvedSource | None = None) -> MLPArch:
        """The layer sizes, checking that each layer takes what the previous one gives."""
        indices = sorted({int(_KEY.match(k)["n"]) for k in shapes if _KEY.match(k)})  # type: ignore[index]
        sizes: list[int] = []
        biases = set()
        for n in indices:
            weight = shapes.get(f"layers.{n}.weight")
            if weight is None or len(weight) != 2:
                raise CheckpointError(f"layers.{n} of an MLP needs a 2-D weight, not {weight or 'none'}")
            out_features, in_features = weight
            if sizes and in_features != sizes[-1]:
                raise CheckpointError(
                    f"layers.{n}.weight takes {in_features} inputs but the layer before it gives {sizes[-1]}"
                )
            bias = shapes.get(f"layers.{n}.bias")
            if bias is not None and tuple(bias) != (out_features,):
                raise CheckpointError(f"layers.{n}.bias has shape {tuple(bias)}, not ({out_features},)")
            biases.add(bias is not None)
            sizes = [*sizes, out_features] if sizes else [in_features, out_features]
        return MLPArch(tuple(sizes), bias=biases == {True})

    def architecture_difference(self, pretrained: MLPArch, finetuned: MLPArch) -> str:
        if pretrained.sizes == finetuned.sizes:
            return ""
        sizes = "→".join(map(str, finetuned.sizes)), "→".join(map(str, pretrained.sizes))
        return f"a different architecture: layer sizes {sizes[0]} vs {sizes[1]} in the pretrained model"

    def matrix_views(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        return [(key, tensor)] if _WEIGHT.match(key) and tensor.dim() == 2 else []

    def matrix_labels(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if _WEIGHT.match(k)]

    def get_matrix(self, state: Mapping[str, Tensor], label: str) -> Tensor:
        tensor = state[label]
        if tensor.dim() != 2:
            raise KeyError(f"{label} is not a matrix (shape {tuple(tensor.shape)})")
        return tensor

    def output_files(self, out: str | Path, fmt: str) -> list[Path]:
        self.check_format(fmt)
        if Path(out).suffix != ".safetensors":
            raise CheckpointError(f"--out {out}: an MLP is written to a .safetensors file")
        return [Path(out)]

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
        """The state dict as is, with the architecture and provenance in the file's metadata."""
        (path,) = self.output_files(out, fmt)
        meta = {
            "format": "pt",
            "merging.layout": MLPLayout.LAYERS.value,
            "merging.architecture": json.dumps(arch.as_dict()),
        }
        meta.update(metadata or {})
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(cast_for_saving(state, dtype), str(path), metadata=meta)
        return [path]


MLP_FAMILY = MLPFamily()
