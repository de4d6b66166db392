"""The continual runner: merge step t with every method, evaluate, record, yield.

A run is fully described by a :class:`RunConfig` (backbone, ordered checkpoints with their
tasks, methods with options, evaluation settings), which is saved with the results so that
``python -m merging run --config results.json`` replays it. :meth:`ContinualRun.steps` is a
generator: it yields a :class:`StepReport` after every step, and whatever has been yielded
stays in the run's results if the caller stops iterating, so a Stop button loses nothing.

Several methods share each step's checkpoint (read lazily, one parameter at a time), the
evaluator's cached images and zero-shot heads, and the reference rows.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from merging.compute.devices import resolve_device
from merging.compute.threads import apply_share, run_slot, usable_cores
from merging.errors import MergingError
from merging.evaluation.backbones import Backbone, load_backbone
from merging.evaluation.datasets import ImageCache, cache_root
from merging.evaluation.evaluator import DEFAULT_SAMPLES, Evaluator
from merging.evaluation.image_set import ImageSet
from merging.evaluation.tasks import Task, TaskRegistry, registry
from merging.experiment.driver import Experiment, StateModel, TimedStep
from merging.experiment.prefetch import Prefetcher
from merging.experiment.results import MethodResults, RunResults, StepRecord
from merging.io.checkpoints import EncoderReader
from merging.io.disk_cache import DiskCache
from merging.io.sources import WEIGHT_SUFFIXES, check_source_text, is_task_label, locate, portable
from merging.methods import DEFAULT_METHOD, METHODS, ContinualMerger, MergeContext, create_merger

EvalMode = Literal["seen", "all"]


@dataclass
class CheckpointSpec:
    """One fine-tuned checkpoint and the task it was fine-tuned on."""

    source: str
    task: str


@dataclass
class RunConfig:
    """Everything needed to run (and replay) a continual merging experiment."""

    backbone: str = "mini"
    checkpoints: list[CheckpointSpec] = field(default_factory=list)
    methods: dict[str, dict[str, Any]] = field(default_factory=lambda: {DEFAULT_METHOD: {}})
    samples: int | None = DEFAULT_SAMPLES
    eval: EvalMode = "seen"
    device: str = "auto"
    preset: str | None = None
    order_seed: int | None = None
    allow_duplicates: bool = False

    def to_json(self) -> dict[str, Any]:
        """JSON-ready, with checkpoint paths inside the project relative to it, so it replays anywhere."""
        data = asdict(self)
        data["checkpoints"] = [{"source": portable(c.source), "task": c.task} for c in self.checkpoints]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunConfig:
        """A configuration as saved by :meth:`to_json` (relative checkpoint paths are the project's)."""
        if not isinstance(data, Mapping):
            raise MergingError("a run configuration must be a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MergingError(f"run configuration has unknown field {unknown[0]!r}")
        values = dict(data)
        try:
            values["checkpoints"] = [
                CheckpointSpec(locate(str(c["source"])), str(c["task"])) for c in data.get("checkpoints", [])
            ]
        except (TypeError, KeyError):
            raise MergingError("run configuration: each checkpoint needs a source and a task") from None
        return cls(**values)


FUSIONBENCH_ORG = "tanganke"


def preset_checkpoints(
    preset: str, tasks: TaskRegistry | None = None, backbone: str | None = None
) -> list[CheckpointSpec]:
    """The checkpoints of a preset, in the preset's order.

    Mini presets name their checkpoints in the registry; the standard ones (TA8, TALL14,
    TALL20) are FusionBench's fine-tunes on the Hub, ``tanganke/<family>_<task>``, for the
    backbone's family (``clip-vit-base-patch32`` for ViT-B-32 or openai/clip-vit-base-patch32).
    """
    from merging.evaluation.backbones import checkpoint_family

    tasks = tasks or registry()
    specs = []
    for name in tasks.task_set(preset):
        task = tasks.get(name)
        if task.checkpoint_is_hub_id:
            specs.append(CheckpointSpec(task.checkpoint, name))
            continue
        if task.checkpoint_path is not None:
            specs.append(CheckpointSpec(str(task.checkpoint_path), name))
            continue
        family = checkpoint_family(backbone) if backbone else None
        if family is None:
            raise MergingError(
                f"preset {preset} has Hub checkpoints only for the OpenAI CLIP backbones (ViT-B-32, ViT-B-16, "
                f"ViT-L-14 or openai/clip-vit-*), not for backbone {backbone or '(none given)'}"
            )
        specs.append(CheckpointSpec(f"{FUSIONBENCH_ORG}/{family}_{name}", name))
    return specs


def shuffled(specs: Sequence[CheckpointSpec], seed: int | None) -> list[CheckpointSpec]:
    """The papers' protocol, ``random.seed(seed)`` then ``random.shuffle`` (no shuffle without a seed).

    A private ``random.Random(seed)`` gives exactly that order without touching the global
    generator, which concurrent sessions would otherwise race on.
    """
    specs = list(specs)
    if seed is not None:
        random.Random(seed).shuffle(specs)
    return specs


def infer_task(source: str, tasks: TaskRegistry | None = None) -> str:
    """The task a checkpoint was fine-tuned on, from ``SRC=TASK`` or from its name.

    Names such as ``clip-vit-base-patch32_sun397`` or ``mini-digits`` end with the task; the
    longest registered task name that the last path component ends with wins.
    """
    tasks = tasks or registry()
    name = Path(source.rstrip("/")).name.split("@")[0]
    for suffix in WEIGHT_SUFFIXES:
        name = name.removesuffix(suffix)
    matches = [t for t in tasks.tasks if name == t or name.endswith(("_" + t, "-" + t))]
    if not matches:
        raise MergingError(
            f"cannot tell which task checkpoint {source} was fine-tuned on; write it as {source}=TASK "
            f"(registered tasks: {', '.join(tasks.tasks)})"
        )
    return max(matches, key=len)


def parse_checkpoint(argument: str, tasks: TaskRegistry | None = None) -> CheckpointSpec:
    """``SRC`` or ``SRC=TASK`` → a checkpoint with its task.

    The text after the last ``=`` is a task label unless it contains a path separator (so
    ``/runs/lr=1e-4/ckpt`` is a path); a label must be a registered task.
    """
    tasks = tasks or registry()
    source, sep, task = argument.strip().rpartition("=")
    if sep and is_task_label(task.strip()):
        task = task.strip()
        if task not in tasks.tasks:
            raise MergingError(f"unknown task {task!r}; registered tasks: {', '.join(tasks.tasks)}")
        return CheckpointSpec(check_source_text(source), task)
    if sep and not task.strip():
        raise MergingError(f"{argument.strip()!r}: nothing after '='; write SRC=TASK or just SRC")
    source = check_source_text(argument)
    return CheckpointSpec(source, infer_task(source, tasks))


def label_warnings(checkpoints: Sequence[CheckpointSpec], references: Mapping[str, Mapping[str, float]]) -> list[str]:
    """A warning per checkpoint that scores below the pretrained zero-shot model on its own task.

    Fine-tuning on a task practically always beats zero-shot on it, so this almost always
    means the ``=TASK`` label names the wrong task (and every number of the run is off).
    """
    warnings = []
    for spec in checkpoints:
        finetuned = references.get("finetuned", {}).get(spec.task)
        pretrained = references.get("pretrained", {}).get(spec.task)
        if finetuned is not None and pretrained is not None and finetuned < pretrained:
            warnings.append(
                f"checkpoint {spec.source} scores {100 * finetuned:.1f}% on its task {spec.task}, below the pretrained "
                f"zero-shot {100 * pretrained:.1f}%: its task label is probably wrong"
            )
    return warnings


@dataclass
class StepReport:
    step: int
    total: int
    task: str
    source: str
    methods: dict[str, StepRecord]


class ContinualRun:
    """A continual merging run over one checkpoint order with one or more methods.

    Constructing one checks the configuration and reads nothing; :meth:`prepare` loads the
    backbone, opens and validates every checkpoint and finds every dataset, before any work
    (the reference rows and :meth:`steps` prepare the run if the caller did not).
    """

    # On a ZeroGPU Space the GPU exists only inside the spaces.GPU window, and the images are
    # decoded before it, on the CPU (merging.ui.zerogpu sets this): a run on CUDA then reads the
    # CPU-decoded sets from the image cache instead of decoding on the GPU (a cache entry of its own).
    decode_on_cpu: ClassVar[bool] = False

    def __init__(
        self,
        config: RunConfig,
        evaluator: Evaluator | None = None,
        cache_dir: Path | None = None,
        references: Mapping[str, Mapping[str, float]] | None = None,
        backbone: Backbone | None = None,
        prefetch: bool | None = None,
    ):
        if not config.checkpoints:
            raise MergingError("no fine-tuned checkpoints: give a preset or at least one checkpoint")
        if not config.methods:
            raise MergingError(f"no method given; valid methods: {', '.join(METHODS)}")
        if config.eval not in ("seen", "all"):
            raise MergingError(f"eval must be seen or all, not {config.eval!r}")
        if config.samples is not None and (isinstance(config.samples, bool) or not isinstance(config.samples, int)):
            raise MergingError(f"samples must be a whole number of test images per task, not {config.samples!r}")
        if config.samples is not None and config.samples < 1:
            raise MergingError(f"samples must be at least 1 test image per task (or all), not {config.samples}")
        self.config = config
        self.mergers: dict[str, ContinualMerger] = {
            name: create_merger(name, options) for name, options in config.methods.items()
        }
        self.experiment = Experiment(
            self._open_backbone, [c.source for c in config.checkpoints], allow_duplicates=config.allow_duplicates
        )
        self._evaluator = evaluator
        self._cache_dir = cache_dir
        self._prepared: _Prepared | None = None
        self.reports: list[StepReport] = []
        task_names = [c.task for c in config.checkpoints]
        self.record = RunResults(
            config=config.to_json(),
            tasks=task_names,
            methods={name: MethodResults(name, merger.config, task_names) for name, merger in self.mergers.items()},
        )
        self._references: dict[str, dict[str, float]] | None = None
        self.warnings: list[str] = []
        # A sweep runs the same checkpoints in many orders: it measures the reference rows and
        # loads the backbone once, and hands them to every trial instead of each trial redoing it.
        self._given_backbone = backbone
        # Reading the next checkpoint and decoding the next task's images overlap the current
        # step's compute (merging.experiment.prefetch); False does everything in order, None
        # decides by the hardware (_works_ahead).
        self.prefetch = prefetch
        if references is not None:
            self._references = {row: dict(values) for row, values in references.items()}
            self.warnings = label_warnings(config.checkpoints, self._references)

    def prepare(self) -> None:
        """Everything that can fail before any work: tasks, device, backbone, checkpoints, datasets.

        Idempotent; the command line and the app call it to fail early, with one message
        naming the culprit.
        """
        if self._prepared is not None:
            return
        tasks_registry = registry()
        tasks = [tasks_registry.get(c.task) for c in self.config.checkpoints]
        device = resolve_device(self.config.device)
        self.experiment.open()  # loads the backbone (_open_backbone), then opens and checks every checkpoint
        backbone = self._backbone
        cache_dir = self._cache_dir or cache_root()
        evaluator = self._evaluator or Evaluator(backbone, device, self.config.samples, cache_dir)
        if self._evaluator is None and self.decode_on_cpu and evaluator.images.on_gpu:
            evaluator.images = ImageCache(cache_dir, "cpu")
        self._prepared = _Prepared(tasks_registry, tasks, device, backbone, cache_dir, evaluator)
        for spec, task in zip(self.config.checkpoints, tasks, strict=True):
            self._check_dataset(task, spec)
            if any("train" in m.data_splits() for m in self.mergers.values()):
                self._check_train_split(task, spec)

    def _open_backbone(self) -> StateModel:
        """The backbone's image tower as the experiment's pretrained model (loaded once per process)."""
        self._backbone = self._given_backbone or load_backbone(self.config.backbone)
        visual = self._backbone.model.visual.state_dict()
        return StateModel(f"backbone {self._backbone.name}", visual, self._backbone.arch, self._backbone.config)

    @property
    def prepared(self) -> _Prepared:
        self.prepare()
        assert self._prepared is not None
        return self._prepared

    @property
    def backbone(self) -> Backbone:
        return self.prepared.backbone

    @property
    def evaluator(self) -> Evaluator:
        return self.prepared.evaluator

    @property
    def device(self) -> torch.device:
        return self.prepared.device

    @property
    def tasks(self) -> list[Task]:
        return self.prepared.tasks

    @property
    def tasks_registry(self) -> TaskRegistry:
        return self.prepared.tasks_registry

    @property
    def cache_dir(self) -> Path:
        return self.prepared.cache_dir

    @property
    def readers(self) -> list[EncoderReader]:
        return self.experiment.readers

    def _check_dataset(self, task: Task, spec: CheckpointSpec) -> None:
        """Find (and, from the Hub, fetch) the test split before any step runs."""
        from merging.evaluation.datasets import parquet_files

        try:
            parquet_files(task, task.dataset.split)
        except MergingError as exc:
            raise MergingError(f"{exc} (needed for checkpoint {spec.source})") from None

    def _check_train_split(self, task: Task, spec: CheckpointSpec) -> None:
        from merging.evaluation.datasets import parquet_files

        needs = [n for n, m in self.mergers.items() if "train" in m.data_splits()]
        if task.dataset.train_split is None:
            raise MergingError(
                f"{', '.join(needs)} needs labelled train images of task {task.name} (checkpoint {spec.source}), "
                "but its registry entry names no train split"
            )
        parquet_files(task, task.dataset.train_split)

    def _merge_context(self) -> MergeContext:
        """Images, heads and an image tower for data-driven methods, sharing the evaluator's caches."""
        import copy

        encoder = copy.deepcopy(self.backbone.model.visual).to(self.device).eval()
        for parameter in encoder.parameters():
            parameter.requires_grad_(False)

        def images(name: str, split: str) -> ImageSet:
            task = self.tasks_registry.get(name)
            split_name = task.dataset.split if split == "test" else task.dataset.train_split
            if split_name is None:
                raise MergingError(f"task {name} has no {split} split registered")
            return self.evaluator.task_images(task, split_name)

        return MergeContext(
            encoder=encoder,
            images=images,
            prepare=self.evaluator.prepare,
            head=lambda name: self.evaluator.head(self.tasks_registry.get(name)),
            logit_scale=self.backbone.logit_scale,
        )

    # ------------------------------------------------------------ references

    @property
    def references(self) -> dict[str, dict[str, float]]:
        """Zero-shot accuracy of the pretrained model, and each checkpoint's on its own task."""
        if self._references is None:
            self.prepare()
            self._references = self._load_or_compute_references()
            self.warnings = label_warnings(self.config.checkpoints, self._references)
        return self._references

    def _reference_key(self) -> str:
        parts = [self.backbone.fingerprint, str(self.config.samples)]
        for spec, reader in zip(self.config.checkpoints, self.readers, strict=True):
            stamp = ";".join(
                f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in reader.files.resolved.weight_files
            )
            parts.append(f"{spec.task}|{stamp}")
        return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:20]

    def _load_or_compute_references(self) -> dict[str, dict[str, float]]:
        """From the bounded disk cache (shared with concurrent runs), else evaluated and stored."""
        disk = DiskCache(self.cache_dir, "references")
        name = f"{self._reference_key()}.json"
        cached = disk.read(name, lambda path: json.loads(path.read_text()))  # None: missing or damaged
        if cached is not None:
            return cached
        prefetcher = Prefetcher(self._works_ahead())
        try:
            for task in self.tasks:  # decoded in order in the background while earlier tasks are evaluated
                prefetcher.warm(("images", task.name), lambda task=task: self.evaluator.test_set(task))
            pretrained = self.evaluator.evaluate(None, self.tasks)
            finetuned = {}
            readers = self.readers
            for index, (task, reader) in enumerate(zip(self.tasks, readers, strict=True)):
                state = prefetcher.result(("load", index), reader.load)
                if index + 1 < len(readers):  # the next checkpoint is read while this one is evaluated
                    prefetcher.ahead(("load", index + 1), readers[index + 1].load)
                finetuned[task.name] = self.evaluator.evaluate(state, [task])[task.name]
                del state
        finally:
            prefetcher.close()
        result = {"pretrained": pretrained, "finetuned": finetuned}
        disk.write(name, lambda path: path.write_text(json.dumps(result)))
        return result

    # ------------------------------------------------------------ the run

    def steps(self) -> Iterator[StepReport]:
        """Merge and evaluate step after step; each yielded report is already recorded.

        The run holds a slot of the process's thread budget while it runs, and its thread takes
        its fair share of the cores before each merge and each evaluation (the share changes as
        other runs start and end; see :mod:`merging.compute.threads`). The slot is released however the
        run ends: finished, failed, or closed early by a caller that stops iterating.
        """
        with run_slot():
            apply_share()
            yield from self._steps()

    def _steps(self) -> Iterator[StepReport]:
        self.references  # noqa: B018 (computed first, so the first step shows the reference lines)
        context = self._merge_context() if any(m.requires_data for m in self.mergers.values()) else None
        self.experiment.start(self.mergers, self.device, context)
        merges = self.experiment.merge_steps(
            self.mergers, self.device, [t.name for t in self.tasks], measure_memory=True, before_merge=apply_share
        )
        prefetcher = Prefetcher(self._works_ahead())
        try:
            yield from self._record_steps(merges, prefetcher)
        finally:
            prefetcher.close()

    def _works_ahead(self) -> bool:
        """Whether this run reads and decodes ahead: as asked, else on CUDA or with four cores or more.

        Work ahead pays where the compute leaves the CPU idle (a GPU runs the network) or cores
        to spare; on two cores the background thread only competes with the run's own threads
        (the default run in the app measured 5.7 s to its first step with it, 5.3 s without).
        """
        if self.prefetch is not None:
            return self.prefetch
        return self.device.type == "cuda" or usable_cores() >= 4

    def _work_ahead(self, prefetcher: Prefetcher, index: int) -> None:
        """While step ``index`` (from 0) computes: read checkpoint index + 1 and decode what its step needs."""
        if index + 1 >= len(self.readers):
            return
        reader, task = self.readers[index + 1], self.tasks[index + 1]
        prefetcher.warm(("checkpoint", index + 1), reader.read_ahead)
        splits = {"test"} | {s for m in self.mergers.values() if m.requires_data for s in m.data_splits()}
        for split in sorted(splits):
            name = task.dataset.split if split == "test" else task.dataset.train_split
            if name is not None:
                prefetcher.warm(("images", task.name, name), lambda name=name: self.evaluator.task_images(task, name))

    def _record_steps(self, merges: Iterator[TimedStep], prefetcher: Prefetcher) -> Iterator[StepReport]:
        """Evaluate and record each merge as it comes; yield a report once every method has merged a checkpoint."""
        names = list(self.mergers)
        methods: dict[str, StepRecord] = {}
        self._work_ahead(prefetcher, -1)
        for timed in merges:
            if timed.method == names[0]:
                self._work_ahead(prefetcher, timed.index - 1)
            merged_at = time.perf_counter()
            merger = self.mergers[timed.method]
            evaluated = self.tasks if self.config.eval == "all" else self.tasks[: timed.index]
            heads = merger.heads()
            apply_share()
            if timed.result.model is None:
                accuracy = self.evaluator.evaluate(timed.result.merged, evaluated, heads)
            else:  # a merged model that is not a plain encoder (MINGLE's gated experts) runs itself
                accuracy = self.evaluator.evaluate(timed.result.merged, evaluated, heads, model=timed.result.model)
            zeroshot_head = None
            if merger.tunes_heads:
                zeroshot_head = {t.name: self.evaluator.accuracy(t) for t in evaluated}
            finished = time.perf_counter()
            record = StepRecord(
                accuracy=accuracy,
                merge_seconds=timed.seconds,
                eval_seconds=finished - merged_at,
                peak_memory_bytes=timed.peak_memory_bytes,
                memory_increase_bytes=timed.memory_increase_bytes,
                diagnostics=timed.result.diagnostics,
                accuracy_zeroshot_head=zeroshot_head,
            )
            self.record.methods[timed.method].steps.append(record)
            methods[timed.method] = record
            if timed.method == names[-1]:  # every method has merged this checkpoint
                task = self.tasks[timed.index - 1].name
                report = StepReport(timed.index, timed.total, task, timed.reader.source, methods)
                methods = {}
                self.reports.append(report)
                yield report

    def run(self) -> dict[str, Any]:
        for _ in self.steps():
            pass
        return self.results()

    # ------------------------------------------------------------ results

    def results(self, references: bool = True) -> RunResults:
        """The run's results so far: config, tasks in order, reference rows, and what each step gave.

        ``references=False`` leaves the reference rows out unless they are already known
        (they cost an evaluation of every checkpoint the first time).
        """
        self.record.reference = self.references if references or self._references is not None else {}
        self.record.warnings = list(self.warnings)
        return self.record

    def save(self, path: str | Path) -> list[Path]:
        """Write results.json and, beside it, one CSV accuracy matrix per method."""
        return save_results(self.results(), path)


def save_results(results: RunResults, path: str | Path) -> list[Path]:
    """results.json and, beside it, one CSV accuracy matrix per method (tasks × steps)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results.to_json(), indent=1) + "\n")
    written = [path]
    for method, data in results.methods.items():
        csv_path = path.with_name(f"{path.stem}.{method}.csv")
        with csv_path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["task"] + [f"step {i + 1}" for i in range(len(data.steps))])
            for name in results.tasks:
                writer.writerow(
                    [name] + ["" if name not in s.accuracy else f"{s.accuracy[name]:.4f}" for s in data.steps]
                )
        written.append(csv_path)
    return written


@dataclass
class _Prepared:
    """What :meth:`ContinualRun.prepare` found: the tasks, device, backbone, caches and evaluator."""

    tasks_registry: TaskRegistry
    tasks: list[Task]
    device: torch.device
    backbone: Backbone
    cache_dir: Path
    evaluator: Evaluator
