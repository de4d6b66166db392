"""The lab's session logic, without any UI: requests → run configurations → streamed updates.

The Gradio page (``app.py``) only wires components to these functions, so everything the
page does is testable here: parsing the checkpoint list, presets and seeded shuffles, the
method options, and a run that writes its downloadable files after every step (a Stop keeps
them) and yields the results so far. Results are plain JSON-ready dicts, never weights, so
they can sit in a per-session ``gr.State``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merging.errors import MergingError
from merging.evaluation.evaluator import DEFAULT_SAMPLES
from merging.experiment.results import RunResults
from merging.experiment.runner import (
    CheckpointSpec,
    ContinualRun,
    RunConfig,
    parse_checkpoint,
    preset_checkpoints,
    shuffled,
)
from merging.io.sources import locate, portable
from merging.methods import DEFAULT_METHOD, METHODS
from merging.ui.hosting import SourcePolicy


def _located(spec: CheckpointSpec) -> CheckpointSpec:
    """Relative paths made absolute (from the working directory, else from the project), so the
    list's entries mean the same wherever the run is replayed; Hub ids stay as they are."""
    return CheckpointSpec(locate(spec.source), spec.task)


def checkpoint_lines(specs: Sequence[CheckpointSpec]) -> str:
    """The editable list: one ``SRC=TASK`` per line, in merge order."""
    return "\n".join(f"{portable(s.source)}={s.task}" for s in specs)


def parse_checkpoint_lines(text: str) -> list[CheckpointSpec]:
    """``SRC`` or ``SRC=TASK`` per line (blank lines and ``#`` comments ignored)."""
    lines = [line.strip() for line in text.splitlines()]
    return [_located(parse_checkpoint(line)) for line in lines if line and not line.startswith("#")]


def preset_text(preset: str, backbone: str) -> str:
    return checkpoint_lines(preset_checkpoints(preset, backbone=backbone))


def shuffle_text(text: str, seed: int | None) -> str:
    """The papers' protocol (``random.seed(seed)``, ``random.shuffle``) applied to the list."""
    return checkpoint_lines(shuffled(parse_checkpoint_lines(text), seed))


def move_line(text: str, index: int, offset: int) -> str:
    """Move checkpoint ``index`` (0-based) up (offset −1) or down (+1); out-of-range moves do nothing."""
    specs = parse_checkpoint_lines(text)
    target = index + offset
    if 0 <= index < len(specs) and 0 <= target < len(specs):
        specs[index], specs[target] = specs[target], specs[index]
    return checkpoint_lines(specs)


def remove_line(text: str, index: int) -> str:
    specs = parse_checkpoint_lines(text)
    if 0 <= index < len(specs):
        del specs[index]
    return checkpoint_lines(specs)


def add_line(text: str, source: str, task: str | None = None) -> str:
    """Append a checkpoint (path or Hub id); its task from ``task``, else from its name."""
    source = source.strip()
    if not source:
        raise MergingError("give a checkpoint path or Hub repository id to add")
    spec = CheckpointSpec(source, task) if task else parse_checkpoint(source)
    return checkpoint_lines([*parse_checkpoint_lines(text), spec])


def option_fields() -> list[tuple[str, str]]:
    """(method, option) for every option of every method, in a fixed order the UI follows."""
    return [(name, option.name) for name, cls in METHODS.items() for option in cls.options]


def option_parameters() -> list[str]:
    """The API's name for each of :func:`option_fields`, ``METHOD_OPTION`` (``dop_lr``), in the same order."""
    names = [f"{method}_{option}" for method, option in option_fields()]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash is not None:
        raise ValueError(f"two method options share the API name {clash!r}")
    return names


def option_values_by_name(named: Mapping[str, Any]) -> tuple[Any, ...]:
    """Option values given by API name → the values in :func:`option_fields` order (defaults for the rest)."""
    names = option_parameters()
    unknown = sorted(set(named) - set(names))
    if unknown:
        raise MergingError(
            f"unknown option parameter {unknown[0]!r}: method options are named METHOD_OPTION, such as {names[0]}"
        )
    defaults = [o.default for cls in METHODS.values() for o in cls.options]
    return tuple(named.get(name, default) for name, default in zip(names, defaults, strict=True))


def options_from_values(methods: Sequence[str], values: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Per chosen method, its options that differ from the defaults (so configs stay short)."""
    defaults = {(m, o.name): o.default for m, cls in METHODS.items() for o in cls.options}
    chosen: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for (method, option), value in zip(option_fields(), values, strict=True):
        if method in chosen and value is not None and value != defaults[(method, option)]:
            chosen[method][option] = value
    return chosen


@dataclass
class LabRequest:
    """What the setup panel holds."""

    backbone: str = "mini"
    checkpoints: str = ""
    methods: list[str] = field(default_factory=lambda: [DEFAULT_METHOD])
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: int | None = DEFAULT_SAMPLES
    eval: str = "seen"
    device: str = "auto"
    preset: str | None = None
    order_seed: int | None = None
    allow_duplicates: bool = False

    def config(self, policy: SourcePolicy | None = None) -> RunConfig:
        """The run configuration; ``policy`` decides which sources a (hosted) visitor may read."""
        policy = policy or SourcePolicy()
        if not self.methods:
            raise MergingError(f"choose at least one method ({', '.join(METHODS)})")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise MergingError(f"unknown method {unknown[0]!r}; valid methods: {', '.join(METHODS)}")
        specs = parse_checkpoint_lines(self.checkpoints)
        if not specs:
            raise MergingError("the checkpoint list is empty: pick a preset or add checkpoints")
        specs = [CheckpointSpec(policy.checkpoint(s.source), s.task) for s in specs]
        return RunConfig(
            backbone=policy.backbone(self.backbone),
            checkpoints=specs,
            methods={m: dict(self.options.get(m, {})) for m in self.methods},
            samples=self.samples,
            eval=self.eval,  # type: ignore[arg-type]
            device=self.device,
            preset=self.preset,
            order_seed=self.order_seed,
            allow_duplicates=self.allow_duplicates,
        )


@dataclass
class LabUpdate:
    """The state of a run after ``completed`` of ``total`` steps.

    ``layers`` (name, label) lists the encoder's matrices for the spectra (:func:`with_default`),
    grouped by block and type, once the run knows them (on the update after the checkpoints are
    found; empty on the others); ``layer`` is the choice as given ("" for the default).
    """

    results: RunResults
    completed: int
    total: int
    status: str
    files: list[Path]
    layers: list[tuple[str, str]] = field(default_factory=list)
    layer: str | None = None


class LiveLayer:
    """The layer a running stream takes the spectra of, which the page may change mid-run.

    The run binds it to its encoder's matrices (:meth:`bind`); :meth:`choose` checks a new
    choice against them, so a bad value is refused with one error naming it and the running
    analysis never sees it. The next step's spectra are of the new layer.
    """

    def __init__(self, layer: str | None = None):
        self.requested = layer
        self.labels: list[str] = []
        self.default: str | None = None
        self.value: str | None = None

    @property
    def bound(self) -> bool:
        return bool(self.labels)

    def bind(self, labels: Sequence[str], default: str | None) -> str:
        """Fix the valid labels (the run's encoder) and check the requested layer against them."""
        from merging.experiment.live_analysis import check_layer

        value = check_layer(self.requested, list(labels), default)  # refused: stays unbound
        self.labels, self.default, self.value = list(labels), default, value
        return value

    def choose(self, layer: object) -> str:
        """A new choice (None or "": the default), checked against the bound encoder."""
        from merging.experiment.live_analysis import check_layer

        self.value = check_layer(layer, self.labels, self.default)
        return self.value

    def __call__(self) -> str | None:
        return self.value


def with_default(layers: Sequence[tuple[str, str]], default: str | None) -> list[tuple[str, str]]:
    """The page's layer list: first "default (block 11 · mlp.c_fc)" with the value "" (whatever the
    encoder's default is, so it follows a change of backbone), then every matrix."""
    name = next((n for n, label in layers if label == default), None)
    return ([(f"default ({name})", "")] if name else []) + list(layers)


def default_layers(backbone: str) -> list[tuple[str, str]]:
    """The layer list the page opens with (:func:`with_default`): the embedded backbone's matrices,
    read from its file's header, no network. Other backbones' lists come with their first run."""
    from merging.evaluation.backbones import MINI, backbone_directory
    from merging.experiment.live_analysis import layer_choices
    from merging.io.checkpoints import open_encoder

    if backbone != MINI:
        return []
    try:
        reader = open_encoder(backbone_directory(MINI) / "open_clip_model.safetensors")
    except (MergingError, OSError):  # a checkout without the mini benchmark: Run says what is missing
        return []
    keys = list(reader)
    family = reader.family
    layers = layer_choices(family.matrix_labels(keys), family.matrix_type)
    return with_default(layers, family.default_spectrum_label(keys))


def encoder_layers(run: ContinualRun) -> tuple[list[tuple[str, str]], str | None]:
    """The run's matrices as the page lists them (name, label), grouped by block and type, and the default."""
    from merging.experiment.live_analysis import layer_choices

    family = run.experiment.family
    keys = list(run.experiment.base)
    return layer_choices(family.matrix_labels(keys), family.matrix_type), family.default_spectrum_label(keys)


SMALL_ENCODER_BYTES = 64 * 2**20  # below this the merged encoders are saved after every step


def write_downloads(run: ContinualRun, folder: Path, encoders: bool, fmt: str = "hf") -> list[Path]:
    """results.json, a CSV accuracy matrix per method, the replayable config.json and, when
    ``encoders``, each method's current merged encoder as safetensors in layout ``fmt``; a
    method whose merged model is not a plain encoder (MINGLE) also writes that model itself,
    as ``merged-NAME.model.safetensors`` in its own format, beside its encoder view."""

    folder.mkdir(parents=True, exist_ok=True)
    written = run.save(folder / "results.json")
    config = folder / "config.json"
    config.write_text(json.dumps({"config": run.config.to_json()}, indent=1) + "\n")
    written.append(config)
    if encoders:
        for name, merger in run.mergers.items():
            if merger.merged:
                path = folder / f"merged-{name}.safetensors"
                written += run.experiment.family.save(merger.merged, path, fmt, run.backbone.arch)
                written += merger.save_model(folder / f"merged-{name}.model.safetensors")
    return written


def stream(
    config: RunConfig, folder: Path, fmt: str = "hf", layer: LiveLayer | str | None = None
) -> Iterator[LabUpdate]:
    """Run ``config``; yield once the reference rows are known, then after every step.

    After every step the live analysis (:mod:`merging.experiment.live_analysis`) adds the new
    task vector's cosines and the spectra of ``layer`` (a :class:`LiveLayer` the page may change
    mid-run, or a label; None: the family's default) to the results. The downloadable files are
    rewritten after every step, even when the analysis fails, so whatever stops the run (the
    Stop button, an error in a later checkpoint) leaves the completed steps on disk.
    """
    from merging.experiment.live_analysis import LiveAnalysis

    started = time.perf_counter()
    run = ContinualRun(config)
    run.prepare()  # backbone, checkpoints and datasets found and checked before the first update
    live = layer if isinstance(layer, LiveLayer) else LiveLayer(layer)
    layers, default = encoder_layers(run)
    live.bind([label for _, label in layers], default)  # a bad layer is refused before any work
    analysis = LiveAnalysis(layer=live)
    total = len(config.checkpoints)
    yield LabUpdate(
        run.results(references=False).snapshot(),
        0,
        total,
        "Checkpoints found; evaluating the pretrained and fine-tuned models…",
        [],
        with_default(layers, default),
        live.requested or "",
    )
    run.references  # noqa: B018 (before the first step, so the reference lines show at once)
    warning = "".join(f"\n\n⚠ {w}" for w in run.warnings)
    yield LabUpdate(
        run.results().snapshot(),
        0,
        total,
        f"Reference rows ready ({time.perf_counter() - started:.1f} s); merging…{warning}",
        [],
    )
    encoder_bytes = sum(t.numel() * 4 for t in run.backbone.model.visual.state_dict().values())
    for report in run.steps():
        small = encoder_bytes <= SMALL_ENCODER_BYTES
        try:
            analysed = analysis.observe_run(run, report)
        finally:  # the step's results reach the downloads whatever the analysis did
            files = write_downloads(run, folder, encoders=small or report.step == report.total, fmt=fmt)
        results = run.results()
        parts = [
            f"{name} ACC {100 * (results.methods[name].acc or 0.0):.1f}% "
            f"({s.merge_seconds:.2f} s merge + {s.eval_seconds:.2f} s eval)"
            for name, s in report.methods.items()
        ]
        parts.append(f"live analysis {analysed.seconds:.2f} s")
        status = f"Step {report.step}/{report.total} (+{report.task}): " + "; ".join(parts)
        if report.step == report.total:
            status += f". Done in {time.perf_counter() - started:.1f} s."
        status += warning
        yield LabUpdate(results.snapshot(downloads=str(folder)), report.step, report.total, status, files)


def stopped_status(results: RunResults | None) -> str:
    """What the status says after Stop: how far the run got, and that nothing computed is lost."""
    if results is None or not results.methods:
        return "Stopped before the first step; nothing was computed yet."
    done = results.completed_steps
    total = len(results.tasks) or done
    if done == 0:
        return f"Stopped before the first of {total} steps; the reference rows are shown."
    return (
        f"Stopped after step {done} of {total}. The completed steps stay on the page, and their results "
        "and merged encoders stay in the downloads."
    )


def warm_up(config: RunConfig) -> None:
    """Load the backbone, decode and cache the test images, compute the reference rows.

    The app calls this in the background once it is up, so that the first Run on a fresh
    start only merges and evaluates; everything it computes lands in the shared caches.
    """
    ContinualRun(config).references  # noqa: B018


def analysis_figures(results: RunResults, layer: str | None = None):
    """Cosine similarities of the run's task vectors and merged deltas, and spectra of ``layer``, all exact.

    The fallback to the live analysis after a run: every task vector at once, each cosine
    exact. Checkpoints are read lazily, one parameter at a time (T copies of one parameter,
    never T encoders); the merged encoders come from the run's downloads folder."""
    from merging.analysis import cosine_similarity_matrix, singular_values
    from merging.evaluation.backbones import load_backbone
    from merging.experiment.live_analysis import check_layer
    from merging.io.checkpoints import open_encoder
    from merging.ui import plots

    config = results.config
    completed = results.completed_steps
    if completed == 0:
        raise MergingError("no step has completed yet")
    base = load_backbone(config["backbone"]).visual_state()
    models = [open_encoder(locate(c["source"])) for c in config["checkpoints"][:completed]]
    names = [f"τ{t} {task}" for t, task in enumerate(results.tasks[:completed], 1)]
    folder = Path(results.downloads or "")
    for method in results.methods:
        path = folder / f"merged-{method}.safetensors"
        if results.downloads and path.is_file():
            models.append(open_encoder(path))
            names.append(f"merged {method}")
    family = models[0].family
    keys = [k for k in base if k in models[0]]
    layer = check_layer(layer, family.matrix_labels(keys), family.default_spectrum_label(keys))
    similarity = cosine_similarity_matrix(models, base)
    spectra = {name: singular_values(model, layer, base).tolist() for name, model in zip(names, models, strict=True)}
    merged = {method: f"merged {method}" for method in results.methods if f"merged {method}" in spectra}
    levels, cuts = plots.spectra_with_cuts(spectra, merged, plots.spectrum_marks(results))
    colours = plots.spectrum_colours(results, spectra)
    return plots.cosine_heatmap(similarity.tolist(), names), plots.spectrum_figure(
        spectra, layer, levels, cuts, colours=colours
    )


def final_spectrum_figure(results: RunResults, layer: object):
    """The live spectra's figure for another layer after the run: the last analysed step's task
    vector and each method's merged delta, read from the checkpoint and the run's downloads.

    A method whose merged encoder is not in the downloads (a large encoder stopped before its
    last step) is left out. ``layer`` is checked against the encoder's matrices (None or "": the
    default), with one error naming a bad value.
    """
    from merging.analysis import singular_values
    from merging.evaluation.backbones import load_backbone
    from merging.experiment.live_analysis import check_layer, layer_name
    from merging.io.checkpoints import open_encoder
    from merging.ui import plots

    completed = results.completed_steps
    if completed == 0:
        raise MergingError("no step has completed yet")
    step = completed
    task = results.tasks[step - 1]
    checkpoint = open_encoder(locate(results.config["checkpoints"][step - 1]["source"]))
    base = load_backbone(results.config["backbone"]).model.visual.state_dict()  # read only: no copy
    family = checkpoint.family
    keys = [k for k in base if k in checkpoint]
    label = check_layer(layer, family.matrix_labels(keys), family.default_spectrum_label(keys))
    spectra = {f"τ{step} {task}": singular_values(checkpoint, label, base).tolist()}
    names = {}
    folder = Path(results.downloads or "")
    for method in results.methods:
        path = folder / f"merged-{method}.safetensors"
        if results.downloads and path.is_file():
            names[method] = f"merged {method}"
            spectra[names[method]] = singular_values(open_encoder(path), label, base).tolist()
    levels, cuts = plots.spectra_with_cuts(spectra, names, plots.spectrum_marks(results))
    title = f"Spectra of {layer_name(label, family.matrix_type(label))} after step {step} (+{task})"
    return plots.spectrum_figure(
        spectra, label, levels, cuts, title=title, colours=plots.spectrum_colours(results, spectra)
    )


def _hub_repo(repo_id: str, token: str) -> str:
    from merging.io.hub import HubError, parse_hub_id

    try:
        ref = parse_hub_id("hf-hub:" + repo_id.strip()) if repo_id.strip() else None
    except HubError:
        ref = None
    if ref is None or ref.revision:
        raise MergingError(f"give the repository to push to as ORG/NAME, not {repo_id.strip()!r}")
    if not token.strip():
        raise MergingError("pushing to the Hub needs a token with write access")
    return ref.repo_id


def push_files(
    files: Mapping[str, str | Path] | Sequence[str | Path], repo_id: str, token: str, private: bool = True
) -> str:
    """Upload files (name in the repository → local file, or local files under their own names) to a
    Hub model repository with the token the user gives (never stored); returns the repository URL.
    Pushing is the only thing in the lab that writes to the Hub."""
    from huggingface_hub import HfApi

    repo = _hub_repo(repo_id, token)
    named = dict(files) if isinstance(files, Mapping) else {Path(f).name: f for f in files}
    if not named:
        raise MergingError("nothing to push: no files")
    api = HfApi(token=token.strip())
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        for name, path in named.items():
            api.upload_file(path_or_fileobj=str(path), path_in_repo=name, repo_id=repo)
    except Exception as exc:  # one line naming the repository, whatever the Hub answered
        raise MergingError(f"pushing to {repo} failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    return str(url)


def push_to_hub(files: Sequence[str | Path], method: str, repo_id: str, token: str, private: bool = True) -> str:
    """Upload a method's merged encoder (and the run's results and configuration) to a Hub model repository."""
    _hub_repo(repo_id, token)
    paths = {Path(f).name: Path(f) for f in files}
    # a method's own model (MINGLE's gated experts) when it has one, else its merged encoder
    encoder = paths.get(f"merged-{method}.model.safetensors") or paths.get(f"merged-{method}.safetensors")
    if encoder is None:
        raise MergingError(f"no merged encoder of {method} in this run's downloads (run it first)")
    named: dict[str, str | Path] = {"model.safetensors": encoder}
    named.update({name: paths[name] for name in ("results.json", "config.json") if name in paths})
    return push_files(named, repo_id, token, private)
