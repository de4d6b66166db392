"""The experiment driver that ``merge`` and ``run`` share: open, validate, then merge step by step.

Both jobs do the same thing around their methods: open every checkpoint (through its model
family, reading headers only), check them all before any work (each fits the pretrained
model, all have the same parameters, none is listed twice), start the mergers on the
pretrained weights, and step them through the checkpoints in order while timing each step.
That lives here once. Constructing an :class:`Experiment` stores its configuration only;
:meth:`Experiment.open` does the I/O, so callers decide when a bad input should fail.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from merging.compute.devices import memory_in_use, peak_memory_bytes, reset_peak_memory
from merging.errors import CheckpointError
from merging.families import ModelFamily, family_of
from merging.io.checkpoints import EncoderReader, check_compatible, open_encoder
from merging.io.sources import check_no_duplicates, locate
from merging.methods import ContinualMerger, MergeContext, StepResult


class StateModel:
    """A pretrained model already in memory (a backbone's image tower) seen as an opened checkpoint.

    It has what validation reads (source, family, architecture, names and shapes) and
    :meth:`load`, which gives the mergers their own copy of the weights.
    """

    def __init__(self, source: str, state: Mapping[str, Tensor], arch: Any, config: dict[str, Any] | None = None):
        self.source = source
        self._state = state
        self.arch = arch
        self.config = config
        self.family: ModelFamily = family_of(state.keys(), source)

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __contains__(self, key: object) -> bool:
        return key in self._state

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def load(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self._state.items()}


@dataclass
class TimedStep:
    """One method's merge of one checkpoint, with how long it took and the memory it used."""

    index: int  # of the checkpoint, from 1
    total: int
    method: str
    reader: EncoderReader
    result: StepResult
    seconds: float  # reading the checkpoint and merging it (the two are interleaved)
    peak_memory_bytes: int | None = None  # with measure_memory: the peak during the merge
    memory_in_use_bytes: int | None = None  # ... and what was in use when it began

    @property
    def memory_increase_bytes(self) -> int | None:
        if self.peak_memory_bytes is None or self.memory_in_use_bytes is None:
            return None
        return max(0, self.peak_memory_bytes - self.memory_in_use_bytes)


class Experiment:
    """The pretrained model and fine-tuned checkpoints of one experiment, and the loop over them.

    ``pretrained`` is a checkpoint source, a model already loaded (:class:`StateModel`), or
    a function that loads one when the experiment is opened (a run's backbone).
    """

    def __init__(
        self,
        pretrained: str | StateModel | Callable[[], StateModel],
        checkpoints: Sequence[str],
        allow_pickle: bool = False,
        allow_duplicates: bool = False,
    ):
        self.pretrained = pretrained
        self.checkpoints = list(checkpoints)
        self.allow_pickle = allow_pickle
        self.allow_duplicates = allow_duplicates
        self._base: EncoderReader | StateModel | None = None
        self._readers: list[EncoderReader] = []

    @property
    def is_open(self) -> bool:
        return self._base is not None

    def open(self) -> None:
        """Open every checkpoint once (headers only) and validate them all; a second call does nothing.

        Raises, naming the culprit, for a checkpoint listed twice, one that no model family
        recognises, one that does not fit the pretrained model, and one whose parameters
        differ from the first fine-tuned checkpoint's.
        """
        if self.is_open:
            return
        if not self.checkpoints:
            raise CheckpointError("no fine-tuned checkpoints given: at least one is needed")
        check_no_duplicates(self.checkpoints, self.allow_duplicates)
        pretrained = self.pretrained
        if isinstance(pretrained, str):
            base: EncoderReader | StateModel = open_encoder(locate(pretrained), self.allow_pickle)
        else:
            base = pretrained if isinstance(pretrained, StateModel) else pretrained()
        readers: list[EncoderReader] = []
        for source in self.checkpoints:
            reader = open_encoder(locate(source), self.allow_pickle)
            check_compatible(base, reader)
            if readers and set(reader) != set(readers[0]):
                differing = sorted(set(reader) ^ set(readers[0]))[0]
                raise CheckpointError(f"{source} and {readers[0].source} differ at parameter {differing}")
            readers.append(reader)
        self._base, self._readers = base, readers

    @property
    def base(self) -> EncoderReader | StateModel:
        """The pretrained model (opening the experiment if it is not open yet)."""
        self.open()
        assert self._base is not None
        return self._base

    @property
    def readers(self) -> list[EncoderReader]:
        """The fine-tuned checkpoints, in merge order (opening the experiment if needed)."""
        self.open()
        return self._readers

    @property
    def family(self) -> ModelFamily:
        return self.base.family

    def start(
        self,
        mergers: Mapping[str, ContinualMerger],
        device: torch.device,
        context: MergeContext | None = None,
    ) -> None:
        """Give every merger the pretrained weights (and data-driven ones the ``context``)."""
        pretrained = self.base.load()
        for merger in mergers.values():
            if context is not None and merger.requires_data:
                merger.attach(context)
            merger.start(pretrained, device, family=self.family)

    def merge_steps(
        self,
        mergers: Mapping[str, ContinualMerger],
        device: torch.device,
        tasks: Sequence[str] | None = None,
        measure_memory: bool = False,
        before_merge: Callable[[], None] | None = None,
    ) -> Iterator[TimedStep]:
        """Step every merger through the checkpoints in order, yielding after each merge.

        ``tasks`` (one per checkpoint) tell data-driven methods what each checkpoint was
        fine-tuned on, and that the last one is last. With ``measure_memory`` each merge's
        peak memory is taken; ``before_merge`` runs just before the clock starts (a run
        takes its share of the cores there). The caller may do other work (evaluate)
        between yields without it being counted.
        """
        readers = self.readers
        total = len(readers)
        for index, reader in enumerate(readers):
            task = tasks[index] if tasks is not None else None
            last = tasks is not None and index == total - 1
            for name, merger in mergers.items():
                in_use = None
                if measure_memory:
                    reset_peak_memory(device)
                    in_use = memory_in_use(device)
                if before_merge is not None:
                    before_merge()
                started = time.perf_counter()
                result = merger.step(reader if reader.is_lazy else reader.load(), task=task, last=last)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - started
                peak = peak_memory_bytes(device) if measure_memory else None
                yield TimedStep(index + 1, total, name, reader, result, seconds, peak, in_use)
