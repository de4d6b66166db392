"""Merging checkpoints from disk: the workflow behind ``python -m merging merge`` and the app.

Everything that can be checked without reading weights is checked first (files exist,
layouts are recognised, every checkpoint matches the pretrained encoder), so a typo in
the fifth path fails in a second, not after four merges. A fine-tuned checkpoint is then
streamed into its step one parameter at a time (safetensors are memory-mapped per
parameter), so memory is the method's own: the pretrained and merged encoders.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from .architecture import VisionArch
from .checkpoints import EncoderReader, check_compatible, open_encoder, save_encoder
from .devices import resolve_device
from .errors import CheckpointError
from .methods import ContinualMerger, create_merger
from .sources import check_no_duplicates, locate

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class MergeStep:
    """One completed step: which checkpoint entered, how long it took, what the method reports."""

    index: int
    total: int
    source: str
    seconds: float  # reading the checkpoint and merging it (the two are interleaved)
    diagnostics: dict[str, Any]


@dataclass
class ContinualMerge:
    """A continual merge of ``checkpoints`` (in order) into ``pretrained`` with one method."""

    method: str
    pretrained: str
    checkpoints: Sequence[str]
    options: Mapping[str, Any] = field(default_factory=dict)
    device: str = "auto"
    allow_pickle: bool = False
    allow_duplicates: bool = False

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise CheckpointError("no fine-tuned checkpoints given: at least one is needed")
        check_no_duplicates(list(self.checkpoints), self.allow_duplicates)
        self.merger: ContinualMerger = create_merger(self.method, self.options)
        self.torch_device = resolve_device(self.device)
        self.base: EncoderReader = open_encoder(locate(self.pretrained), self.allow_pickle)
        self.readers: list[EncoderReader] = []
        for source in self.checkpoints:
            reader = open_encoder(locate(source), self.allow_pickle)
            check_compatible(self.base, reader)
            if self.readers and set(reader) != set(self.readers[0]):
                differing = sorted(set(reader) ^ set(self.readers[0]))[0]
                raise CheckpointError(f"{source} and {self.readers[0].source} differ at parameter {differing}")
            self.readers.append(reader)
        self.completed: list[MergeStep] = []

    def steps(self) -> Iterator[MergeStep]:
        """Merge checkpoint after checkpoint, yielding after each; completed steps stay recorded."""
        self.merger.start(self.base.load(), self.torch_device)
        total = len(self.readers)
        for index, reader in enumerate(self.readers, start=1):
            started = time.perf_counter()
            result = self.merger.step(reader if reader.is_lazy else reader.load())
            if self.torch_device.type == "cuda":
                torch.cuda.synchronize(self.torch_device)
            step = MergeStep(index, total, reader.source, time.perf_counter() - started, result.diagnostics)
            self.completed.append(step)
            yield step

    @property
    def default_format(self) -> Literal["hf", "open_clip"]:
        """The layout family of the fine-tuned checkpoints (of the pretrained one if they differ)."""
        families = {r.layout.family for r in self.readers}
        return families.pop() if len(families) == 1 else self.base.layout.family

    def save(self, out: str | Path, fmt: str | None = None, dtype: str = "auto") -> list[Path]:
        """Write the merged encoder after the last completed step, with provenance metadata."""
        if not self.completed:
            raise CheckpointError("nothing to save: no checkpoint has been merged yet")
        fmt = fmt or self.default_format
        torch_dtype = self.readers[0].dtype if dtype == "auto" else DTYPES[dtype]
        merged_sources = [s.source for s in self.completed]
        metadata = {
            "merging.method": self.method,
            "merging.options": json.dumps(self.merger.config, sort_keys=True),
            "merging.pretrained": self.pretrained,
            "merging.checkpoints": json.dumps(merged_sources),
        }
        include_projection = "proj" in self.merger.merge_keys
        return save_encoder(
            self.merger.merged,
            out,
            fmt,
            self.output_arch,
            include_projection,
            torch_dtype,
            metadata,  # type: ignore[arg-type]
        )

    @property
    def output_arch(self) -> VisionArch:
        """The architecture to describe the output with: heads and activation from a config
        file when any input has one (the fine-tuned checkpoints first), sizes from the weights."""
        with_config = next((r for r in (*self.readers, self.base) if r.config is not None), self.base)
        return replace(with_config.arch, output_dim=self.base.arch.output_dim)
