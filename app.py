"""The Gradio app: a live continual-merging lab, a thin page over the ``merging`` library.

``python app.py`` starts it on the embedded mini benchmark (no network needed). The page
only wires components to :mod:`merging.ui.lab` (requests, runs, downloads) and
:mod:`merging.ui.plots` (figures); per-session state holds results as JSON, never weights.
Hosted (``--hosted``, ``MERGING_HOSTED=1`` or on Hugging Face Spaces), visitors read only
the embedded assets, Hub ids and their own uploads; every file the lab writes goes to the
session's private folder (:mod:`merging.ui.hosting`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from a lab that runs offline

from merging.compute.memory import keep_freed_memory
from merging.compute.threads import limit_spinning

# Before anything imports torch: OpenMP threads of other processes must not spin on our cores
# (nor ours on theirs); the user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
limit_spinning()
keep_freed_memory()  # evaluation batches reuse freed memory instead of faulting it in again

from merging.ui import zerogpu

# On a ZeroGPU Space ``spaces`` is imported before torch; elsewhere it is never imported.
zerogpu.setup()

import gradio as gr
from gradio.utils import get_upload_folder

from merging.cli.run import method_options
from merging.compute.devices import DEVICE_CHOICES
from merging.errors import MergingError
from merging.evaluation.backbones import backbone_choices
from merging.evaluation.evaluator import DEFAULT_SAMPLES
from merging.evaluation.tasks import registry
from merging.experiment.merge import ContinualMerge
from merging.experiment.results import RunResults
from merging.io.checkpoints import open_encoder
from merging.io.sources import check_source_text
from merging.methods import DEFAULT_METHOD, METHODS
from merging.ui import history, lab, plots, teaching
from merging.ui.hosting import SourcePolicy, Workspaces, hosted_mode, max_upload_bytes, safe_upload_name

DEFAULT_PRESET = "mini-8"
DEFAULT_BACKBONE = "mini"
OPTION_DEFAULTS = [o.default for cls in METHODS.values() for o in cls.options]  # in lab.option_fields() order

SETTING = r"""
**Setting.** $\theta_0$ is the pretrained image encoder, $\theta_t$ the one fine-tuned on task $t$, and
$\tau_t = \theta_t - \theta_0$ its task vector. Checkpoints arrive one at a time; a continual method keeps only
$\theta_0$, its merged model and a few numbers, never earlier checkpoints.
"""

METRICS = r"""
**Metrics.** $a_{i,t}$ is the accuracy on task $i$ after step $t$. $\mathrm{ACC} = \frac1T \sum_i a_{i,T}$;
$\mathrm{BWT} = \frac{1}{T-1} \sum_{i<T} (a_{i,T} - a_{i,i})$, where $a_{i,i}$ is the merged model right after task
$i$ entered (negative BWT is forgetting).
"""


def explanations() -> str:
    """The setting, each registered method's own explanation, and the metrics (Markdown with $math$)."""
    methods = [f"**{cls.title}.** {cls.explanation}" for cls in METHODS.values() if cls.explanation]
    return "\n\n".join([SETTING.strip(), *methods, METRICS.strip()])


# Gradio re-mounts a plot whenever its figure changes, so plotly's uirevision cannot keep a
# zoom across live updates; this script remembers each lab plot's zoom (from plotly's own
# relayout events) and re-applies it to the re-mounted plot. A double click resets it.
KEEP_ZOOM = r"""
<script>
(() => {
  const saved = {};
  const hook = (el) => {
    if (el.__labHooked || typeof el.on !== "function") return;
    const box = el.closest('[id^="lab-plot-"]');
    if (!box) return;
    el.__labHooked = true;
    el.on("plotly_relayout", (event) => {
      if (el.__labApplying) return;
      const keys = Object.keys(event);
      if (keys.some((k) => k.endsWith("autorange"))) { delete saved[box.id]; return; }
      const ranges = {};
      keys.filter((k) => /axis\d*\.range/.test(k)).forEach((k) => { ranges[k] = event[k]; });
      if (Object.keys(ranges).length) saved[box.id] = Object.assign(saved[box.id] || {}, ranges);
    });
    if (saved[box.id]) {
      el.__labApplying = true;
      setTimeout(() => window.Plotly.relayout(el, saved[box.id]).finally(() => { el.__labApplying = false; }), 0);
    }
  };
  new MutationObserver(() => document.querySelectorAll(".js-plotly-plot").forEach(hook))
    .observe(document.documentElement, { childList: true, subtree: true });
})();
</script>
"""


# The action bar (Run, Stop, the status) sticks to the top of the window while the results stream;
# on a wide window the setup column scrolls on its own beside the results (a setup sidebar), so
# no control is ever a page away from the plots it changes. A long status scrolls inside the bar.
LAYOUT_CSS = """
.gradio-container { overflow: clip !important; }  /* hidden would make it the scroller and undo sticky */
#lab-actions { position: sticky; top: 0; z-index: 50; background: var(--background-fill-primary);
  border-bottom: 1px solid var(--border-color-primary); padding: 6px 4px; flex-wrap: nowrap; align-items: center; }
#lab-status { max-height: 4.6em; overflow-y: auto; min-width: 0; }
#lab-status p { margin: 0; }
.lab-formula { font-size: 0.85em; opacity: 0.85; }
@media (min-width: 1024px) {
  #lab-setup { position: sticky; top: 72px; align-self: flex-start; max-height: calc(100vh - 80px);
    overflow-y: auto; }
}
@media (max-width: 640px) {
  #lab-actions { flex-wrap: wrap; }
  #lab-status { flex-basis: 100%; max-height: 3.2em; font-size: 0.85em; }
  .js-plotly-plot .gtitle { font-size: 12px !important; }  /* plot titles fit a phone-wide plot */
  #lab-plot-matrix .heatmaplayer text { display: none; }  /* 8 numbers do not fit a 300 px row: the hover has them */
}
#lab-checkpoints textarea { white-space: pre; overflow-x: auto; }  /* one path per line, never cut mid-word */
"""


def serve(demo: gr.Blocks, **options: Any):
    """Launch with the lab's page script (zoom that survives live updates) and its layout rules."""
    return demo.launch(head=KEEP_ZOOM, css=LAYOUT_CSS, **options)


# ------------------------------------------------------------------ errors and limits

LOG = logging.getLogger("merging.app")
MAX_CHECKPOINTS = 64  # per run or merge: a bound on what one request can make the server do
HOSTED_SAMPLES = (16, 2000)  # the slider's range; hosted visitors cannot ask for whole Hub test sets
LAYOUTS = ("hf", "open_clip")


def user_error(exc: MergingError) -> gr.Error:
    """A toast titled "Error" naming the culprit; the server log gets one line, not a traceback."""
    LOG.info("user error: %s", exc)
    return gr.Error(str(exc), title="Error", print_exception=False)


def session_of(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def _choice(value: Any, valid: tuple[str, ...] | list[str], what: str) -> str:
    if not isinstance(value, str) or value not in valid:
        raise MergingError(f"{what} must be one of {', '.join(valid)}, not {value!r}")
    return value


def _whole(value: Any, what: str) -> int | None:
    """An optional whole number from a number field (Gradio sends floats), or an error naming the field."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
        raise MergingError(f"{what} must be a whole number, not {value!r}")
    return int(value)


def _text(value: Any, what: str, limit: int = 100_000) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise MergingError(f"{what} must be text of at most {limit} characters")
    return value


def max_concurrent_runs() -> int:
    """How many runs the queue lets compute at once: ``MERGING_CONCURRENT_RUNS``, else one per GPU, or two on a CPU.

    Each run gets its share of the process's threads (merging.compute.threads), so two runs on two
    cores take about as long together as one after the other, and neither waits for the other.
    """
    raw = os.environ.get("MERGING_CONCURRENT_RUNS", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise MergingError(f"MERGING_CONCURRENT_RUNS={raw!r} must be a whole number >= 1")
        return int(raw)
    import torch

    if torch.cuda.is_available():
        return 1
    return max(1, min(2, os.cpu_count() or 1))


# ------------------------------------------------------------------ the handlers


@dataclass
class RunView:
    """What the Run event shows, by name: its outputs are these fields in this order (``build_app``
    wires each field to the component of the same name). A field left as ``gr.skip()`` keeps
    what the page shows."""

    status: Any = field(default_factory=gr.skip)
    heatmap: Any = field(default_factory=gr.skip)
    lines: Any = field(default_factory=gr.skip)
    curves: Any = field(default_factory=gr.skip)
    table: Any = field(default_factory=gr.skip)
    files: Any = field(default_factory=gr.skip)
    results: Any = field(default_factory=gr.skip)  # results.json as JSON, in the session's gr.State
    shown: Any = field(default_factory=gr.skip)
    internals: Any = field(default_factory=gr.skip)
    cosine: Any = field(default_factory=gr.skip)  # the live analysis: cosines after the last step
    spectra: Any = field(default_factory=gr.skip)  # the chosen layer's spectra after the last step
    removed: Any = field(default_factory=gr.skip)  # OPCM's removed share per layer × step
    layer: Any = field(default_factory=gr.skip)  # the layer list, once the run knows its encoder
    account: Any = field(default_factory=gr.skip)  # the last step in plain words (merging.ui.teaching)

    def outputs(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


class LabHandlers:
    """Every event handler of the page. Each is an API endpoint a script can call with any
    value, so each validates its inputs; files go to the session's own folder only."""

    def __init__(self, hosted: bool | None = None, workspaces: Workspaces | None = None):
        self.hosted = hosted_mode() if hosted is None else hosted
        self.workspaces = workspaces or Workspaces()
        # per session, the layer its running stream takes the spectra of (the page changes it mid-run)
        self.live_layers: dict[str | None, lab.LiveLayer] = {}

    def policy(self, request: gr.Request | None) -> SourcePolicy:
        return SourcePolicy(self.hosted, self.workspaces.uploads(session_of(request)))

    # ---------------------------------------------------------------- the checkpoint list

    def preset_list(self, preset: str, backbone: str) -> str:
        """The checkpoint list of a preset for the chosen backbone (an error names what is wrong)."""
        if not preset:
            return ""
        try:
            return lab.preset_text(_text(preset, "preset", 200), _text(backbone, "backbone", 500))
        except MergingError as exc:
            raise user_error(exc) from None

    def shuffle_list(self, text: str, seed: float | None) -> str:
        try:
            whole = _whole(seed, "order seed")
            if whole is None:
                raise MergingError("give an order seed to shuffle with (42–51 follow the papers' protocol)")
            return lab.shuffle_text(_text(text, "checkpoint list"), whole)
        except MergingError as exc:
            raise user_error(exc) from None

    def edit_list(self, text: str, action: str, position: float | None, source: str) -> str:
        """Add a checkpoint, or remove / move up / move down the one at ``position`` (1-based)."""
        try:
            text = _text(text, "checkpoint list")
            action = _choice(action, ("add", "remove", "up", "down"), "action")
            if action == "add":
                return lab.add_line(text, _text(source, "checkpoint", 2000))
            index = (_whole(position, "row") or 0) - 1
            if action == "remove":
                return lab.remove_line(text, index)
            return lab.move_line(text, index, -1 if action == "up" else 1)
        except MergingError as exc:
            raise user_error(exc) from None

    def add_uploads(self, request: gr.Request, files: list[str] | None, text: str, with_task: bool = True) -> str:
        """Keep uploaded .safetensors checkpoints in the session's folder and list them as ``upload:NAME``."""
        try:
            text = _text(text, "checkpoint list")
            lines = [line for line in text.splitlines() if line.strip()]
            for file in files or []:
                name = self._store_upload(request, file)
                if not with_task:
                    lines.append(f"upload:{name}")
                    continue
                try:
                    spec = lab.parse_checkpoint_lines(f"upload:{name}")[0]
                except MergingError:
                    raise MergingError(
                        f"uploaded {name}, but cannot tell its task from the name; add the line upload:{name}=TASK"
                    ) from None
                lines.append(f"upload:{name}={spec.task}")
            return "\n".join(lines)
        except MergingError as exc:
            raise user_error(exc) from None

    def add_merge_uploads(self, request: gr.Request, files: list[str] | None, text: str) -> str:
        """Uploads for the merge page, listed as ``upload:NAME`` (no task needed there)."""
        return self.add_uploads(request, files, text, with_task=False)

    def _store_upload(self, request: gr.Request | None, file: Any) -> str:
        path = Path(file if isinstance(file, str) else getattr(file, "path", "") or "")
        if self.hosted and not path.resolve().is_relative_to(Path(get_upload_folder()).resolve()):
            raise MergingError("only files uploaded through the page can be added")
        if path.suffix != ".safetensors" or not path.is_file():
            raise MergingError(f"{path.name or 'the upload'}: only .safetensors checkpoints can be uploaded")
        size = path.stat().st_size
        if size > max_upload_bytes():
            raise MergingError(
                f"{path.name} is {size / 2**20:.1f} MiB, over the {max_upload_bytes() / 2**20:g} MiB upload limit"
            )
        name = safe_upload_name(path.name)
        target = self.workspaces.uploads(session_of(request)) / name
        shutil.copyfile(path, target)
        try:
            open_encoder(target)
        except MergingError as exc:
            target.unlink(missing_ok=True)
            raise MergingError(f"upload {name}: {exc}") from None
        return name

    # ---------------------------------------------------------------- the continual run

    def lab_request(
        self,
        backbone: Any,
        preset: Any,
        checkpoints: Any,
        methods: Any,
        samples: Any,
        eval_mode: Any,
        device: Any,
        order_seed: Any,
        allow_duplicates: Any,
        option_values: tuple[Any, ...],
    ) -> lab.LabRequest:
        """The setup panel's values, each checked (a script may send anything)."""
        if not isinstance(methods, list | tuple) or not all(isinstance(m, str) for m in methods):
            raise MergingError(f"methods must be a list of method names ({', '.join(METHODS)})")
        count = _whole(samples, "test images per task")
        low, high = HOSTED_SAMPLES
        if self.hosted and (count is None or not low <= count <= high):
            raise MergingError(f"test images per task must be between {low} and {high} here, not {samples!r}")
        if count is not None and count < 0:
            raise MergingError(f"test images per task must be at least 1 (or 0 for all), not {count}")
        text = _text(checkpoints, "checkpoint list")
        if sum(1 for line in text.splitlines() if line.strip() and not line.strip().startswith("#")) > MAX_CHECKPOINTS:
            raise MergingError(f"at most {MAX_CHECKPOINTS} checkpoints per run")
        if len(option_values) != len(lab.option_fields()):
            raise MergingError(f"expected {len(lab.option_fields())} option values, got {len(option_values)}")
        if not isinstance(allow_duplicates, bool | None):
            raise MergingError(f"allow duplicates must be true or false, not {allow_duplicates!r}")
        return lab.LabRequest(
            backbone=_text(backbone, "backbone", 500) or DEFAULT_BACKBONE,
            checkpoints=text,
            methods=list(methods),
            options=lab.options_from_values(list(methods), option_values),
            samples=count or None,
            eval=_choice(eval_mode, ("seen", "all"), "evaluate tasks"),
            device=_choice(device, DEVICE_CHOICES, "device"),
            preset=_text(preset, "preset", 200) or None,
            order_seed=_whole(order_seed, "order seed"),
            allow_duplicates=bool(allow_duplicates),
        )

    def run_lab(
        self,
        request: gr.Request,
        backbone: str,
        preset: str,
        checkpoints: str,
        methods: list[str],
        samples: float,
        eval_mode: str,
        device: str,
        order_seed: float | None = None,
        layout: str = "hf",
        allow_duplicates: bool = False,
        *option_values: Any,
        spectrum_layer: str | None = None,
        **named_options: Any,
    ) -> Iterator[tuple[Any, ...]]:
        """Run continual merging and stream (status, figures, table, files, state, method choice,
        live analysis) per step.

        Method options come by name through the API (``dop_lr``, ``opcm_alpha``: METHOD_OPTION,
        unnamed ones at their defaults), or by position in the registry's order from Python.
        ``spectrum_layer`` is the matrix the live spectra show (a label from the layer list; empty:
        the last block's MLP input weight); :meth:`choose_layer` changes it while the run streams.
        """
        session = session_of(request)
        live: lab.LiveLayer | None = None
        try:
            if named_options:
                if option_values:
                    raise MergingError("give the method options by name or by position, not both")
                option_values = lab.option_values_by_name(named_options)
            config = self.lab_request(
                backbone,
                preset,
                checkpoints,
                methods,
                samples,
                eval_mode,
                device,
                order_seed,
                allow_duplicates,
                option_values,
            ).config(self.policy(request))
            layout = _choice(layout, LAYOUTS, "merged encoder layout")
            live = lab.LiveLayer(_text(spectrum_layer, "layer", 500).strip() or None)
            self.live_layers[session] = live
            folder = self.workspaces.new_folder(session, "run")
            # on a ZeroGPU Space: downloads and decoding here, the compute in the spaces.GPU window
            stream = zerogpu.stream if zerogpu.enabled() else lab.stream
            for update in stream(config, folder, fmt=layout, layer=live):
                names = list(update.results.methods)
                heatmap, lines, curves, table = figures_for(update.results, None)
                cosine, spectra, removed = live_figures(update.results)
                yield RunView(
                    status=update.status,
                    heatmap=heatmap,
                    lines=lines,
                    curves=curves,
                    table=table,
                    files=[str(f) for f in update.files] or None,
                    results=update.results.to_json(),
                    shown=gr.update(choices=names, value=names[0]),
                    internals=internals_update(update.results, names[0]),
                    cosine=cosine,
                    spectra=spectra,
                    removed=removed,
                    layer=gr.update(choices=update.layers, value=update.layer) if update.layers else gr.skip(),
                    account=teaching.step_account(update.results),
                ).outputs()
        except MergingError as exc:
            # The status line keeps the message and every other output what the run (or an
            # earlier run) already showed; then the error toast. The event's progress display
            # sits on a hidden component, so the error marks no output.
            yield RunView(status=f"**Error:** {exc}").outputs()
            raise user_error(exc) from None
        finally:  # finished, failed or stopped: a later layer change is for the final state
            if live is not None and self.live_layers.get(session) is live:
                del self.live_layers[session]

    def choose_layer(self, request: gr.Request, results: dict[str, Any] | None, layer: Any) -> Any:
        """The layer list changed: while a run streams, its next step shows the new layer; after a
        run, the spectra of the final state (the last task vector and the merged deltas) at once.

        ``layer`` must be one of the encoder's matrices (empty: the default); anything else is
        refused with one error naming it, and the running analysis keeps its layer.
        """
        try:
            if layer is not None and not isinstance(layer, str):
                raise MergingError(f"a layer is named by text, not {layer!r}")
            live = self.live_layers.get(session_of(request))
            if live is not None:  # a run is on: its next step shows the new layer
                if live.bound:
                    live.choose(layer)
                else:  # still opening its checkpoints: it checks the layer once it knows its encoder
                    live.requested = layer or None
                return gr.skip()
            typed = results_from_state(results, strict=True)
            if typed is None or not typed.completed_steps:
                return gr.skip()  # nothing to show yet: Run checks the layer against its encoder
            if typed.downloads and not self.workspaces.owns(session_of(request), typed.downloads):
                raise MergingError("this run's files belong to another session")
            return lab.final_spectrum_figure(typed, layer)
        except MergingError as exc:
            raise user_error(exc) from None

    def stopped(self, results: dict[str, Any] | None) -> str:
        return lab.stopped_status(results_from_state(results))

    def classroom(self, key: Any) -> tuple[Any, ...]:
        """A prepared experiment's setup: (preset, checkpoint list, methods, evaluate, order seed, what to
        watch, then every method option: the experiment's values, the others at their defaults)."""
        try:
            chosen = teaching.experiment(key)
            values = dict(zip(lab.option_fields(), OPTION_DEFAULTS, strict=True))
            values.update(chosen.options)
            return (
                chosen.preset,
                lab.preset_text(chosen.preset, DEFAULT_BACKBONE),
                list(chosen.methods),
                chosen.eval,
                None,
                f"**{chosen.title}.** {chosen.what_to_watch}",
                *values.values(),
            )
        except MergingError as exc:
            raise user_error(exc) from None

    # ---------------------------------------------------------------- comparing methods, the run history

    def compare(self, results: dict[str, Any] | None, view: Any, first: Any, second: Any) -> tuple[Any, Any, Any]:
        """The compare view of the run on the page and the two method lists of the difference view
        (each keeps its choice while the run has that method; else the first and the last method)."""
        try:
            view = _choice(view, plots.COMPARE_VIEWS, "compare view")
            typed = results_from_state(results)
            names = list(typed.methods) if typed is not None else []
            a = first if isinstance(first, str) and first in names else (names[0] if names else None)
            others = [n for n in names if n != a]
            b = second if isinstance(second, str) and second in others else (others[-1] if others else a)
            figure = plots.compare_figure(typed, view, a, b) if typed is not None else None
            return figure, gr.update(choices=names, value=a), gr.update(choices=names, value=b)
        except MergingError as exc:
            raise user_error(exc) from None

    def record_run(self, results: dict[str, Any] | None, runs: Any) -> tuple[Any, Any, Any, Any]:
        """Keep the run that just ended (finished, failed part-way or stopped) in the session's history."""
        runs = history.record(runs, results)
        names = history.labels(runs)
        return (
            runs,
            history.styled_table(history.table(runs)),
            gr.update(choices=names, value=names[-2:]),
            history.overlay_figure(runs, names[-2:]),
        )

    def overlay(self, runs: Any, chosen: Any) -> Any:
        """The ACC/BWT curves of the chosen runs of this session (all of them when none is chosen)."""
        if chosen is not None and (not isinstance(chosen, list) or not all(isinstance(c, str) for c in chosen)):
            raise user_error(MergingError("choose runs by their labels"))
        return history.overlay_figure(runs, chosen)

    def download_runs(self, request: gr.Request, runs: Any) -> str:
        """Every run of the session zipped into the session's own folder, offered as a download."""
        try:
            return str(history.write_zip(runs, self.workspaces.new_folder(session_of(request), "history")))
        except MergingError as exc:
            raise user_error(exc) from None

    def show_method(self, results: dict[str, Any] | None, shown: str) -> tuple[Any, Any, Any]:
        """The matrix, per-task curves and internals of the method chosen to be shown."""
        typed = results_from_state(results)
        shown = shown if isinstance(shown, str) else None
        heatmap, _, curves, _ = figures_for(typed, shown)
        method = shown if typed is not None and shown in typed.methods else None
        return heatmap, curves, internals_update(typed, method)

    def analyse(self, request: gr.Request, results: dict[str, Any] | None, layer: str) -> tuple[Any, Any]:
        """Cosine similarities of the task vectors (and merged deltas) and spectra of a layer."""
        try:
            typed = results_from_state(results, strict=True)
            if typed is None or not typed.methods:
                raise MergingError("run something first: the analysis reads the run's checkpoints")
            if typed.downloads and not self.workspaces.owns(session_of(request), typed.downloads):
                raise MergingError("this run's files belong to another session")
            return lab.analysis_figures(typed, _text(layer, "layer", 500).strip() or None)
        except MergingError as exc:
            raise user_error(exc) from None

    def push(self, request: gr.Request, results: dict[str, Any] | None, method: str, repo_id: str, token: str) -> str:
        """Push the shown run's merged encoder (with its results and configuration) to the Hub."""
        try:
            folder = self._session_folder(request, (results or {}).get("downloads"), "run a method first")
            files = [str(p) for p in sorted(folder.iterdir()) if p.is_file()]
            url = lab.push_to_hub(
                files, _text(method, "method", 100), _text(repo_id, "repository", 200), _text(token, "token", 500)
            )
        except MergingError as exc:
            raise user_error(exc) from None
        return f"Pushed the merged encoder of {method} to {url}"

    def _session_folder(self, request: gr.Request | None, folder: Any, missing: str) -> Path:
        if not isinstance(folder, str) or not folder:
            raise MergingError(f"nothing to push yet: {missing}")
        if not self.workspaces.owns(session_of(request), folder) or not Path(folder).is_dir():
            raise MergingError("these files belong to another session or are gone; run again")
        return Path(folder)

    # ---------------------------------------------------------------- merge and download

    def merge_checkpoints(
        self,
        request: gr.Request,
        method: str,
        pretrained: str,
        checkpoints: str,
        options: str,
        device: str,
        layout: str,
        allow_duplicates: bool,
    ) -> Iterator[tuple[str, Any, Any]]:
        """Merge the listed checkpoints in order, yielding (log, downloads, folder) after every step.

        The merged encoder is written to the session's folder and offered as a download (never
        to a path the visitor types). Bad input raises an error naming the culprit; steps
        already logged stay on the page.
        """
        log: list[str] = []
        try:
            method = _choice(method, [n for n, c in METHODS.items() if not c.requires_data], "method")
            layout = _choice(layout, LAYOUTS, "layout")
            policy = self.policy(request)
            lines = [line.strip() for line in _text(checkpoints, "checkpoint list").splitlines() if line.strip()]
            if len(lines) > MAX_CHECKPOINTS:
                raise MergingError(f"at most {MAX_CHECKPOINTS} checkpoints per merge")
            sources = [policy.checkpoint(check_source_text(line)) for line in lines]
            base = policy.checkpoint(check_source_text(_text(pretrained, "pretrained encoder", 2000)))
            pairs = [p.strip() for p in _text(options, "options", 2000).replace("\n", ",").split(",") if p.strip()]
            job = ContinualMerge(
                method,
                base,
                sources,
                method_options([method], pairs)[method],
                _choice(device, DEVICE_CHOICES, "device"),
                allow_duplicates=bool(allow_duplicates),
            )
            job.prepare()  # every checkpoint opened and checked before the first line of the log
            log.append(f"pretrained: {job.base.describe()}")
            log.extend(f"checkpoint: {reader.describe()}" for reader in job.readers)
            yield "\n".join(log), gr.skip(), gr.skip()
            for step in job.steps():
                d = step.diagnostics
                extra = "".join(f", {part}" for part in METHODS[method].step_summary(d))
                log.append(
                    f"step {step.index}/{step.total}: {Path(step.source).name} merged in {step.seconds:.2f} s, "
                    f"‖θ − θ0‖ = {d['merged_norm']:.4g}{extra}"
                )
                yield "\n".join(log), gr.skip(), gr.skip()
            folder = self.workspaces.new_folder(session_of(request), "merge")
            target = folder if layout == "hf" else folder / f"merged-{method}.safetensors"
            written = job.save(target, layout)
            log.append(f"merged encoder ready to download ({layout} layout): " + ", ".join(p.name for p in written))
            yield "\n".join(log), [str(p) for p in written], str(folder)
        except MergingError as exc:
            raise user_error(exc) from None

    def push_merge(self, request: gr.Request, folder: str | None, repo_id: str, token: str) -> str:
        try:
            files = self._session_folder(request, folder, "merge first")
            url = lab.push_files(
                sorted(p for p in files.iterdir() if p.is_file()),
                _text(repo_id, "repository", 200),
                _text(token, "token", 500),
            )
        except MergingError as exc:
            raise user_error(exc) from None
        return f"Pushed the merged encoder to {url}"

    def end_session(self, request: gr.Request) -> None:
        """The page was closed: its files go."""
        self.workspaces.release(session_of(request))


def results_from_state(results: Any, strict: bool = False) -> RunResults | None:
    """The typed results from the session state (JSON). Anything a script sends that is not
    results is None, or with ``strict`` an error that says so."""
    if not results:
        return None
    try:
        return RunResults.from_json(results)
    except MergingError:
        if strict:
            raise
        return None


def internals_update(results: RunResults | None, method: str | None) -> Any:
    """The internals plot for ``method``: its own live figure, under the label it declares."""
    if results is None or method is None or method not in METHODS:
        return gr.update(value=None, label="Method internals")
    cls = METHODS[method]
    return gr.update(value=plots.internals_figure(results, method), label=cls.figure_title or f"{cls.title} internals")


def live_figures(results: RunResults) -> tuple[Any, Any, Any]:
    """The live analysis' figures: cosines and spectra after the last step (None before the first),
    and the per-layer removed share of the first method that reports one (OPCM)."""
    removed = next(
        (f for f in (plots.matrix_share_heatmap(results, m) for m in results.methods) if f is not None), None
    )
    return plots.live_cosine_figure(results), plots.live_spectrum_figure(results), removed


def figures_for(results: RunResults | None, shown: str | None) -> tuple[Any, Any, Any, Any]:
    """The live figures (accuracy matrix and per-task curves of the shown method, ACC/BWT of all)."""
    if results is None or not results.methods:
        return None, None, None, plots.styled_table(plots.results_table(RunResults(config={}, tasks=[], methods={})))
    method = shown if shown in results.methods else next(iter(results.methods))
    has_steps = bool(results.methods[method].steps)
    heatmap = plots.accuracy_heatmap(results, method) if has_steps else None
    curves = plots.per_task_curves(results, method) if has_steps else None
    return heatmap, plots.acc_bwt_figure(results), curves, plots.styled_table(plots.results_table(results))


# ------------------------------------------------------------------ the merge-and-save page


def methods_markdown() -> str:
    """A short reference of every registered method and its options."""
    lines = []
    for name, cls in METHODS.items():
        lines.append(f"**{cls.title}** (`{name}`): {cls.summary}")
        for option in cls.options:
            lines.append(f"- `{option.name}` = `{option.default}` ({option.valid_values()}): {option.help}")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------ the page


def option_component(method: str, option) -> gr.components.Component:
    """An option's input. Ranges are checked by the method, not by Gradio, so that an error
    names the method and the option (Gradio's own range check names neither)."""
    label = f"{option.name}"
    info = f"{option.help} ({option.valid_values()})"
    if option.choices is not None:
        return gr.Dropdown(list(option.choices), value=option.default, label=label, info=info)
    if isinstance(option.default, bool):
        return gr.Checkbox(value=option.default, label=label, info=info)
    precision = 0 if isinstance(option.default, int) else None
    return gr.Number(value=option.default, label=label, info=info, precision=precision)


def formula(text: str) -> gr.Markdown:
    """A plot's formula, set in small type under it (inline $math$)."""
    return gr.Markdown(
        text, latex_delimiters=[{"left": "$", "right": "$", "display": False}], elem_classes="lab-formula"
    )


def build_app(hosted: bool | None = None, workspaces: Workspaces | None = None) -> gr.Blocks:
    """The page; ``hosted`` (default: :func:`merging.ui.hosting.hosted_mode`) restricts what visitors may read."""
    handlers = LabHandlers(hosted, workspaces)
    if zerogpu.enabled():  # the GPU function exists before the Space starts, as ZeroGPU requires
        zerogpu.install()
    presets = list(registry().sets)
    compute = {"concurrency_limit": max_concurrent_runs(), "concurrency_id": "compute"}
    # Gradio's own copies of served files are deleted after an hour too.
    with gr.Blocks(title="Continual merging lab", delete_cache=(1800, 3600)) as demo:
        results_state = gr.State(None)
        merge_state = gr.State(None)
        runs_state = gr.State([])  # this session's run history (merging.ui.history), bounded
        gr.Markdown(
            "# Continual merging lab\n"
            "Merge fine-tuned CLIP image encoders into their pretrained encoder one task at a time and watch "
            "accuracy, forgetting (BWT) and the methods' internals after every step. The embedded mini benchmark "
            "runs offline on a CPU in seconds."
            + (
                "\n\nThis is a hosted lab: checkpoints come from the Hub, the embedded benchmark or your uploads; "
                "your files are private to this session and deleted when you leave."
                if handlers.hosted
                else ""
            )
        )
        upload_limit = f"{max_upload_bytes() / 2**20:.0f} MiB"
        with gr.Tab("Continual lab"):
            # The action bar sticks to the top of the window (ACTIONS_CSS), so Run, Stop and the
            # status stay in reach while the results below stream, on a laptop and on a phone.
            with gr.Row(elem_id="lab-actions", equal_height=True):
                run = gr.Button("Run", variant="primary", scale=0, min_width=90, elem_id="lab-run")
                stop = gr.Button("Stop", variant="stop", scale=0, min_width=90, elem_id="lab-stop")
                status = gr.Markdown("Pick a preset and methods, then Run.", elem_id="lab-status")
            with gr.Row():
                with gr.Column(scale=1, min_width=320, elem_id="lab-setup"):
                    with gr.Accordion("Classroom: prepared experiments", open=False):
                        gr.Markdown("Each button sets the lab up for one question and runs it.")
                        lessons = [gr.Button(e.title, size="sm") for e in teaching.EXPERIMENTS]
                        lesson_note = gr.Markdown("")
                    backbone = gr.Dropdown(
                        backbone_choices(),
                        value=DEFAULT_BACKBONE,
                        label="Backbone",
                        allow_custom_value=True,
                        info="mini, ViT-B-32/B-16/L-14, openai/clip-vit-*, hf-hub:ORG/NAME",
                    )
                    preset = gr.Dropdown(presets, value=DEFAULT_PRESET, label="Preset")
                    checkpoints = gr.Textbox(
                        value=lab.preset_text(DEFAULT_PRESET, DEFAULT_BACKBONE),
                        label="Checkpoints in merge order (SRC=TASK per line; Hub ids, embedded paths or uploads)",
                        lines=8,
                        elem_id="lab-checkpoints",
                    )
                    with gr.Accordion("Edit the list", open=False):
                        with gr.Row():
                            position = gr.Number(value=1, precision=0, label="Row (1-based)", minimum=1)
                            up, down, remove = gr.Button("Up"), gr.Button("Down"), gr.Button("Remove")
                        with gr.Row():
                            new_source = gr.Textbox(label="Add a checkpoint (ORG/NAME or path, [=TASK])", scale=3)
                            add = gr.Button("Add", scale=1)
                        upload = gr.File(
                            label=f"Upload fine-tuned checkpoints (.safetensors, at most {upload_limit} each)",
                            file_types=[".safetensors"],
                            file_count="multiple",
                        )
                        with gr.Row():
                            order_seed = gr.Number(value=None, precision=0, label="Order seed")
                            shuffle = gr.Button("Shuffle")
                        allow_duplicates = gr.Checkbox(
                            value=False, label="Allow duplicates (merge a checkpoint listed twice twice)"
                        )
                    method_choice = gr.CheckboxGroup(
                        list(METHODS), value=[DEFAULT_METHOD], label="Methods (side by side)"
                    )
                    option_inputs = []
                    for name, cls in METHODS.items():
                        with gr.Accordion(f"{cls.title} options", open=False):
                            gr.Markdown(cls.summary)
                            option_inputs += [option_component(name, o) for o in cls.options]
                    with gr.Row():
                        samples = gr.Slider(
                            *HOSTED_SAMPLES, value=DEFAULT_SAMPLES, step=16, label="Test images per task"
                        )
                        eval_mode = gr.Radio(["seen", "all"], value="seen", label="Evaluate tasks")
                    with gr.Row():
                        device = gr.Radio(list(DEVICE_CHOICES), value="auto", label="Device")
                        layout = gr.Radio(list(LAYOUTS), value="hf", label="Merged encoder layout")
                with gr.Column(scale=3):
                    # Where the run's progress and error marks go: nowhere visible, so live plots are
                    # never covered and an error toast leaves every output as it was.
                    progress_anchor = gr.HTML("", visible=False)
                    with gr.Row():
                        shown = gr.Dropdown(
                            [DEFAULT_METHOD],
                            value=DEFAULT_METHOD,
                            label="Method shown in the matrix, curves and internals",
                        )
                    account = gr.Markdown("", elem_id="lab-account")  # the last step in plain words
                    with gr.Row():
                        with gr.Column(min_width=300):
                            heatmap = gr.Plot(label="Accuracy matrix", elem_id="lab-plot-matrix")
                            formula(teaching.FORMULAS["matrix"])
                        with gr.Column(min_width=300):
                            lines = gr.Plot(label="ACC and BWT", elem_id="lab-plot-acc-bwt")
                            formula(teaching.FORMULAS["acc_bwt"])
                    curves = gr.Plot(label="Per-task accuracy", elem_id="lab-plot-per-task")
                    formula(teaching.FORMULAS["curves"])
                    table = gr.Dataframe(headers=plots.TABLE_HEADERS, label="Results", interactive=False)
                    with gr.Accordion("Compare methods", open=False):
                        with gr.Row():
                            compare_view = gr.Radio(
                                [
                                    ("every matrix", "matrices"),
                                    ("difference A − B", "difference"),
                                    ("normalised", "normalised"),
                                ],
                                value="matrices",
                                label="View",
                            )
                            compare_a = gr.Dropdown([DEFAULT_METHOD], value=DEFAULT_METHOD, label="Method A")
                            compare_b = gr.Dropdown([DEFAULT_METHOD], value=DEFAULT_METHOD, label="Method B")
                        compare_plot = gr.Plot(label="Compare methods", elem_id="lab-plot-compare")
                        gr.Markdown(
                            "Normalised: $(a_{i,t} - z_i) / (f_i - z_i)$, with $z_i$ the pretrained (zero-shot) and "
                            "$f_i$ the fine-tuned accuracy on task $i$: 0 is zero-shot, 100 the task's own "
                            "fine-tuned model.",
                            latex_delimiters=[{"left": "$", "right": "$", "display": False}],
                        )
                    with gr.Accordion("Runs of this session", open=False):
                        runs_table = gr.Dataframe(
                            headers=history.HISTORY_HEADERS, label="Runs (newest last)", interactive=False
                        )
                        runs_choice = gr.CheckboxGroup([], label="Runs to overlay")
                        runs_plot = gr.Plot(label="ACC and BWT of the chosen runs", elem_id="lab-plot-runs")
                        runs_zip_button = gr.Button("Download every run (zip)")
                        runs_zip = gr.File(label="Every run: results.json and config.json each", interactive=False)
                    with gr.Accordion("Push a merged encoder to the Hub", open=False):
                        with gr.Row():
                            push_method = gr.Dropdown(list(METHODS), value=DEFAULT_METHOD, label="Method")
                            push_repo = gr.Textbox(label="Repository (ORG/NAME)")
                            push_token = gr.Textbox(label="Token with write access", type="password")
                        push_button = gr.Button("Push")
                        push_status = gr.Markdown()
                    files = gr.File(
                        label="Downloads: results.json, CSVs, config.json (replay with "
                        "python -m merging run --config), merged encoders",
                        file_count="multiple",
                        interactive=False,
                    )
                    with gr.Accordion("Live analysis: task vectors and spectra", open=True):
                        layer = gr.Dropdown(
                            lab.default_layers(DEFAULT_BACKBONE),
                            value="",
                            label="Layer for the spectra",
                            info="the encoder's matrices by block and type; a change shows from the next step, "
                            "or at once after the run",
                            allow_custom_value=True,  # other backbones have other blocks; the handlers check it
                            elem_id="lab-layer",
                        )
                        with gr.Row():
                            with gr.Column(min_width=300):
                                cosine = gr.Plot(label="Cosine similarity", elem_id="lab-plot-cosine")
                                formula(teaching.FORMULAS["cosine"])
                            with gr.Column(min_width=300):
                                spectra = gr.Plot(label="Singular-value spectra", elem_id="lab-plot-spectra")
                                formula(teaching.FORMULAS["spectra"])
                        removed = gr.Plot(label="Share removed per layer", elem_id="lab-plot-removed")
                        formula(teaching.FORMULAS["removed"])
                        analyse_button = gr.Button("Exact analysis of every task vector (reads the checkpoints again)")
                    with gr.Accordion("Method internals (live, of the method shown)", open=False):
                        internals = gr.Plot(label="Method internals", elem_id="lab-plot-internals")
                    with gr.Accordion("How the methods work", open=False):
                        gr.Markdown(explanations(), latex_delimiters=[{"left": "$", "right": "$", "display": False}])
                        gr.Markdown(methods_markdown())
            preset.change(handlers.preset_list, [preset, backbone], checkpoints)
            shuffle.click(handlers.shuffle_list, [checkpoints, order_seed], checkpoints)
            for button, action in ((up, "up"), (down, "down"), (remove, "remove"), (add, "add")):
                button.click(
                    lambda text, pos, src, a=action: handlers.edit_list(text, a, pos, src),
                    [checkpoints, position, new_source],
                    checkpoints,
                )
            upload.upload(handlers.add_uploads, [upload, checkpoints], checkpoints)
            view = {
                "status": status,
                "heatmap": heatmap,
                "lines": lines,
                "curves": curves,
                "table": table,
                "files": files,
                "results": results_state,
                "shown": shown,
                "internals": internals,
                "cosine": cosine,
                "spectra": spectra,
                "removed": removed,
                "layer": layer,
                "account": account,
            }
            run_inputs = [
                backbone,
                preset,
                checkpoints,
                method_choice,
                samples,
                eval_mode,
                device,
                order_seed,
                layout,
                allow_duplicates,
            ]
            # named inputs, so that a script sees dop_lr, opcm_alpha … instead of param_10 …
            run_kwargs = {**dict(zip(lab.option_parameters(), option_inputs, strict=True)), "spectrum_layer": layer}
            lesson_runs: list[Any] = []
            event = run.click(
                handlers.run_lab,
                api_name="run",
                inputs=run_inputs,
                inputs_kwargs=run_kwargs,
                outputs=[view[f.name] for f in fields(RunView)],
                show_progress_on=[progress_anchor],
                **compute,
            )
            lesson_outputs = [preset, checkpoints, method_choice, eval_mode, order_seed, lesson_note, *option_inputs]
            for button, prepared in zip(lessons, teaching.EXPERIMENTS, strict=True):
                lesson = button.click(
                    lambda key=prepared.key: handlers.classroom(key), None, lesson_outputs, api_visibility="private"
                ).then(
                    handlers.run_lab,
                    inputs=run_inputs,
                    inputs_kwargs=run_kwargs,
                    outputs=[view[f.name] for f in fields(RunView)],
                    show_progress_on=[progress_anchor],
                    api_visibility="private",
                    **compute,
                )
                lesson_runs.append(lesson)
            stop_event = stop.click(
                handlers.stopped, [results_state], [status], cancels=[event, *lesson_runs], api_name="stop"
            )
            # every run that ends (finished, failed part-way, stopped) joins the session's history
            recorded = [runs_state, runs_table, runs_choice, runs_plot]
            for ended in (event, *lesson_runs, stop_event):
                ended.then(handlers.record_run, [results_state, runs_state], recorded, api_visibility="private")
            runs_choice.input(handlers.overlay, [runs_state, runs_choice], runs_plot, api_visibility="private")
            runs_zip_button.click(handlers.download_runs, [runs_state], runs_zip, api_visibility="private")
            compare_inputs = [results_state, compare_view, compare_a, compare_b]
            compare_outputs = [compare_plot, compare_a, compare_b]
            results_state.change(
                handlers.compare, compare_inputs, compare_outputs, api_visibility="private", show_progress="hidden"
            )
            for control in (compare_view, compare_a, compare_b):
                control.input(handlers.compare, compare_inputs, compare_outputs, api_visibility="private")
            push_button.click(
                handlers.push,
                [results_state, push_method, push_repo, push_token],
                push_status,
                api_visibility="private",
            )
            shown.change(handlers.show_method, [results_state, shown], [heatmap, curves, internals])
            analyse_button.click(
                handlers.analyse, [results_state, layer], [cosine, spectra], api_name="analyse", **compute
            )
            # .input, not .change: the run's own updates of the list must not count as a choice
            layer.input(
                handlers.choose_layer, [results_state, layer], [spectra], api_name="layer", show_progress="minimal"
            )
            backbone.change(lambda: gr.update(value=""), None, layer, api_visibility="private")
        with gr.Tab("Merge and download"):
            gr.Markdown(
                "Merge checkpoints (Hub ids, embedded ones or your uploads) into their pretrained encoder, then "
                "download the merged encoder or push it to the Hub."
            )
            with gr.Row():
                with gr.Column():
                    merge_methods = [name for name, cls in METHODS.items() if not cls.requires_data]
                    method = gr.Dropdown(merge_methods, value=merge_methods[0], label="Method")
                    pretrained = gr.Textbox(label="Pretrained encoder (Hub id, embedded path or upload:NAME)")
                    merge_list = gr.Textbox(label="Fine-tuned checkpoints, one per line, in merge order", lines=5)
                    merge_upload = gr.File(
                        label=f"Upload checkpoints (.safetensors, at most {upload_limit} each)",
                        file_types=[".safetensors"],
                        file_count="multiple",
                    )
                    example = next((o for o in METHODS[merge_methods[0]].options), None)
                    options = gr.Textbox(
                        label="Options (KEY=VALUE, comma separated)",
                        placeholder=f"{example.name}={example.default}" if example else "",
                    )
                    with gr.Row():
                        merge_device = gr.Radio(list(DEVICE_CHOICES), value="auto", label="Device")
                        merge_layout = gr.Radio(list(LAYOUTS), value="hf", label="Layout of the merged encoder")
                    merge_duplicates = gr.Checkbox(value=False, label="Allow duplicates")
                    merge_button = gr.Button("Merge", variant="primary")
                with gr.Column():
                    log = gr.Textbox(label="Progress", lines=14, interactive=False)
                    merged_files = gr.File(label="The merged encoder", file_count="multiple", interactive=False)
                    with gr.Accordion("Push the merged encoder to the Hub", open=False):
                        with gr.Row():
                            merge_repo = gr.Textbox(label="Repository (ORG/NAME)")
                            merge_token = gr.Textbox(label="Token with write access", type="password")
                        merge_push = gr.Button("Push")
                        merge_push_status = gr.Markdown()
            merge_upload.upload(handlers.add_merge_uploads, [merge_upload, merge_list], merge_list)
            merge_button.click(
                handlers.merge_checkpoints,
                inputs=[method, pretrained, merge_list, options, merge_device, merge_layout, merge_duplicates],
                outputs=[log, merged_files, merge_state],
                api_name="merge",
                **compute,
            )
            merge_push.click(
                handlers.push_merge, [merge_state, merge_repo, merge_token], merge_push_status, api_visibility="private"
            )
        with gr.Tab("Sweep"):  # issue 15: its components and handlers live in merging/ui/sweep_page.py
            from merging.ui.sweep_page import build_sweep_tab

            build_sweep_tab(demo, handlers.workspaces, handlers.hosted, compute)
        demo.unload(handlers.end_session)
    demo.handlers = handlers  # type: ignore[attr-defined]  (tests and scripts reach the session folders)
    return demo


def warm_default_run() -> None:
    """Decode the default benchmark's images and compute its reference rows in the background
    (on a ZeroGPU Space, where this process has no GPU, only what needs none: fetch and decode)."""
    try:
        config = lab.LabRequest(checkpoints=lab.preset_text(DEFAULT_PRESET, DEFAULT_BACKBONE)).config()
        if zerogpu.enabled():
            zerogpu.fetch_and_decode(config)
        else:
            lab.warm_up(config)
    except MergingError as exc:  # a missing benchmark is reported when the user runs it
        LOG.warning("warm-up skipped: %s", exc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The continual merging lab (a Gradio app).")
    parser.add_argument(
        "--hosted",
        action="store_true",
        help="public hosting: visitors may read only the embedded assets, Hub ids and their uploads "
        "(also MERGING_HOSTED=1; on by itself on Hugging Face Spaces)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        demo = build_app(hosted=True if args.hosted else None).queue(max_size=16, default_concurrency_limit=1)
    except MergingError as exc:
        parser.exit(2, f"error: {exc}\n")
    serve(
        demo,
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        prevent_thread_lock=True,
        max_file_size=max_upload_bytes(),
    )
    threading.Thread(target=warm_default_run, name="warm-up", daemon=True).start()
    demo.block_thread()


if __name__ == "__main__":
    main()
