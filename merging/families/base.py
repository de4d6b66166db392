"""What the library needs from a model family, in one interface.

A *family* is a kind of network whose checkpoints can be merged: CLIP ViT image encoders
(:mod:`merging.families.clip_vit`), or a plain stack of ``nn.Linear`` layers
(:mod:`merging.families.mlp`). Everything that depends on the kind of network lives behind
:class:`ModelFamily`: recognising a checkpoint from its parameter names and converting its
layout to the family's canonical keys, telling which parameters are matrices (OPCM projects
them, the analysis takes their spectra), describing the architecture from shapes, checking
that a fine-tuned checkpoint fits the pretrained model, and saving a merged model. The rest
of the library (checkpoint I/O, the experiment driver, the methods) only talks to this
interface, so a second family needs no change outside its own module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import torch
from torch import Tensor

from merging.errors import CheckpointError

if TYPE_CHECKING:
    from merging.io.checkpoints import ResolvedSource


class Layout(Protocol):
    """One way a family's checkpoints name their tensors (a member of the family's layout enum)."""

    @property
    def value(self) -> str: ...

    @property
    def description(self) -> str:
        """In words, for the line that describes an opened checkpoint."""
        ...

    @property
    def format(self) -> str:
        """The output format that writes a checkpoint in this layout (the default when saving)."""
        ...


class Architecture(Protocol):
    """A family's description of one network's shape (sizes, depth), inferred from its weights."""

    @property
    def summary(self) -> str:
        """A few words for the line that describes an opened checkpoint."""
        ...


class Model(Protocol):
    """What the compatibility check reads: a model's name, architecture, parameter names and shapes.

    Opened checkpoints (:class:`merging.io.checkpoints.EncoderReader`) qualify, and so does a
    loaded backbone's image tower seen through the same interface, without reading weights.
    """

    source: str

    @property
    def family(self) -> ModelFamily: ...

    @property
    def arch(self) -> Any: ...

    def __iter__(self) -> Any: ...

    def __contains__(self, key: object) -> bool: ...

    def shape(self, key: str) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class Recipe:
    """How one canonical tensor is made from a checkpoint's tensors.

    One table of recipes serves eager conversion of a state dict, lazy tensor-by-tensor
    reading of a file, and shapes without reading any data (so a checkpoint is checked
    from its header).
    """

    sources: tuple[str, ...]
    op: Literal["copy", "concat", "transpose"] = "copy"

    def build(self, get: Callable[[str], Tensor]) -> Tensor:
        if self.op == "concat":
            return torch.cat([get(k) for k in self.sources], dim=0)
        tensor = get(self.sources[0])
        return tensor.t().contiguous() if self.op == "transpose" else tensor

    def shape(self, get_shape: Callable[[str], tuple[int, ...]]) -> tuple[int, ...]:
        shapes = [tuple(get_shape(k)) for k in self.sources]
        if self.op == "concat":
            return (sum(s[0] for s in shapes), *shapes[0][1:])
        return shapes[0][::-1] if self.op == "transpose" else shapes[0]


class ModelFamily(ABC):
    """A kind of network the library can merge; one instance per family, in the registry."""

    name: ClassVar[str]
    # What a checkpoint of the family is, in words ("a CLIP ViT image encoder"), for messages
    # such as "unknown checkpoint layout: not a CLIP ViT image encoder nor ...".
    kind: ClassVar[str]
    # Output formats save() writes; the first is the default when nothing else decides.
    formats: ClassVar[tuple[str, ...]]
    # Parameters a fine-tuned checkpoint may lack (kept at the pretrained value when merging).
    optional_in_finetuned: ClassVar[frozenset[str]] = frozenset()

    # ------------------------------------------------------------ recognising and reading

    @abstractmethod
    def recognise(self, keys: Collection[str]) -> Layout | None:
        """The layout of a checkpoint with these parameter names, or None if it is not of this family.

        A checkpoint that is of the family but in a form the library cannot merge (say, an
        open_clip model with a ResNet image tower) raises a :class:`CheckpointError` saying so.
        """

    @abstractmethod
    def recipes(self, layout: Layout, keys: Collection[str]) -> dict[str, Recipe]:
        """For each canonical key, the recipe that builds it from a checkpoint's ``keys``."""

    @abstractmethod
    def architecture(self, shapes: Mapping[str, tuple[int, ...]], resolved: ResolvedSource | None = None) -> Any:
        """The architecture from canonical shapes, with what the checkpoint's config file adds."""

    def architecture_difference(self, pretrained: Any, finetuned: Any) -> str:
        """How two architectures differ, in words ("" when the family cannot say), for messages."""
        return ""

    def check_compatible(self, pretrained: Model, finetuned: Model) -> None:
        """Raise unless ``finetuned`` has the pretrained model's parameters with the same shapes.

        It may lack only :attr:`optional_in_finetuned`; the message names the first
        offending parameter (and both shapes), and how the architectures differ when they do.
        """
        how = self.architecture_difference(pretrained.arch, finetuned.arch)
        suffix = f" ({how})" if how else ""
        for key in finetuned:
            if key not in pretrained:
                raise CheckpointError(
                    f"{finetuned.source} has parameter {key}, which the pretrained encoder lacks{suffix}"
                )
        for key in pretrained:
            if key not in finetuned:
                if key in self.optional_in_finetuned:
                    continue
                raise CheckpointError(f"{finetuned.source} lacks parameter {key} of the pretrained encoder{suffix}")
            if pretrained.shape(key) != finetuned.shape(key):
                raise CheckpointError(
                    f"shape mismatch at {key}: pretrained {pretrained.shape(key)} vs "
                    f"{finetuned.source} {finetuned.shape(key)}{suffix}"
                )

    # ------------------------------------------------------------ matrices

    @abstractmethod
    def matrix_views(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """The matrices inside parameter ``key`` as ``(label, view)`` pairs; empty for other parameters.

        The views share storage with ``tensor``, so writing into them updates the parameter in place.
        """

    @abstractmethod
    def matrix_labels(self, keys: Iterable[str]) -> list[str]:
        """Labels of every matrix among the parameters ``keys``, in order."""

    @abstractmethod
    def get_matrix(self, state: Mapping[str, Tensor], label: str) -> Tensor:
        """The matrix a label names (any 2-D parameter can be named by its key)."""

    def matrix_type(self, label: str) -> str:
        """The layer type of a matrix, for per-type summaries: the label without its block numbers."""
        return ".".join(part for part in label.split(".") if not part.isdigit())

    def default_spectrum_label(self, keys: Iterable[str]) -> str | None:
        """The matrix whose spectrum the analysis shows when none is chosen (the last one by default)."""
        labels = self.matrix_labels(keys)
        return labels[-1] if labels else None

    # ------------------------------------------------------------ saving

    def output_architecture(self, pretrained: Any, finetuned: Sequence[Any]) -> Any:
        """The architecture a merged model is described with (the pretrained one by default).

        ``pretrained`` and ``finetuned`` are opened models (they have ``arch`` and ``config``).
        """
        return pretrained.arch

    def check_format(self, fmt: str) -> str:
        """``fmt`` when the family writes it; otherwise an error listing the formats it writes."""
        if fmt not in self.formats:
            raise CheckpointError(f"a {self.kind} is written in format {' or '.join(self.formats)}, not {fmt}")
        return fmt

    @abstractmethod
    def output_files(self, out: str | Path, fmt: str) -> list[Path]:
        """The files :meth:`save` writes for ``out`` in ``fmt``; raises when it cannot write that.

        Called before any work, so an impossible output fails in a second.
        """

    @abstractmethod
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
        """Write a merged model (canonical keys) to ``out``; return the files written.

        ``finetuned_keys`` are the parameters the fine-tuned checkpoints had (None: all), so
        the output can leave out what they lacked, as the checkpoints it replaces did.
        """


def cast_for_saving(tensors: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Contiguous CPU tensors, floating-point ones in ``dtype`` when given (safetensors needs all three)."""
    return {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
        for k, v in tensors.items()
    }
