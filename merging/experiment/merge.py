"""Merging checkpoints from disk: the workflow behind ``python -m merging merge`` and the app.

Everything that can be checked without reading weights is checked first (files exist,
model families and layouts are recognised, every checkpoint matches the pretrained model),
so a typo in the fifth path fails in a second, not after four merges. A fine-tuned
checkpoint is then streamed into its step one parameter at a time (safetensors are
memory-mapped per parameter), so memory is the method's own: the pretrained and merged
models. Opening and the step loop are the shared :class:`merging.experiment.driver.Experiment`'s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merging.compute.devices import resolve_device
from merging.errors import CheckpointError
from merging.experiment.driver import Experiment, StateModel
from merging.families import ModelFamily
from merging.io.checkpoints import EncoderReader
from merging.methods import ContinualMerger, create_merger

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
    """A continual merge of ``checkpoints`` (in order) into ``pretrained`` with one method.

    Constructing one checks the method and its options and reads nothing; :meth:`prepare`
    opens and validates the checkpoints (and :meth:`steps` does, if it was not called).
    """

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
        self.merger: ContinualMerger = create_merger(self.method, self.options)
        self.experiment = Experiment(self.pretrained, self.checkpoints, self.allow_pickle, self.allow_duplicates)
        self.torch_device: torch.device | None = None
        self.completed: list[MergeStep] = []

    def prepare(self) -> None:
        """Resolve the device and open and validate every checkpoint, before any work; idempotent."""
        if self.torch_device is None:
            self.torch_device = resolve_device(self.device)
        self.experiment.open()

    @property
    def base(self) -> EncoderReader | StateModel:
        return self.experiment.base

    @property
    def readers(self) -> list[EncoderReader]:
        return self.experiment.readers

    @property
    def family(self) -> ModelFamily:
        return self.experiment.family

    def steps(self) -> Iterator[MergeStep]:
        """Merge checkpoint after checkpoint, yielding after each; completed steps stay recorded."""
        self.prepare()
        assert self.torch_device is not None
        mergers = {self.method: self.merger}
        self.experiment.start(mergers, self.torch_device)
        for timed in self.experiment.merge_steps(mergers, self.torch_device):
            step = MergeStep(timed.index, timed.total, timed.reader.source, timed.seconds, timed.result.diagnostics)
            self.completed.append(step)
            yield step

    @property
    def default_format(self) -> str:
        """The format of the fine-tuned checkpoints' layout (of the pretrained one's if they differ)."""
        formats = {r.layout.format for r in self.readers}
        if len(formats) == 1:
            return formats.pop()
        layout = getattr(self.base, "layout", None)
        return layout.format if layout is not None else self.family.formats[0]

    def output_files(self, out: str | Path, fmt: str | None = None) -> list[Path]:
        """The files :meth:`save` will write; raises now if the family cannot write ``out`` in ``fmt``."""
        return self.family.output_files(out, fmt or self.default_format)

    def save(self, out: str | Path, fmt: str | None = None, dtype: str = "auto") -> list[Path]:
        """Write the merged model after the last completed step, with provenance metadata."""
        if not self.completed:
            raise CheckpointError("nothing to save: no checkpoint has been merged yet")
        torch_dtype = self.readers[0].dtype if dtype == "auto" else DTYPES[dtype]
        merged_sources = [s.source for s in self.completed]
        metadata = {
            "merging.method": self.method,
            "merging.options": json.dumps(self.merger.config, sort_keys=True),
            "merging.pretrained": self.pretrained,
            "merging.io.checkpoints": json.dumps(merged_sources),
        }
        return self.family.save(
            self.merger.merged,
            out,
            fmt or self.default_format,
            self.output_arch,
            torch_dtype,
            metadata,
            finetuned_keys=self.merger.merge_keys,
        )

    @property
    def output_arch(self) -> Any:
        """The architecture the output is described with (the family decides from all inputs)."""
        return self.family.output_architecture(self.base, self.readers)
