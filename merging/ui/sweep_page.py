"""The Sweep tab of the lab: its components, its handlers and their wiring (``app.py`` only calls
:func:`build_sweep_tab` inside a ``gr.Tab``).

Every handler is an API endpoint a stranger can call with any value, so each checks its inputs
through :mod:`merging.ui.sweep_tab` (grid syntax and option ranges by the methods themselves,
bounded order seeds, a cap on trials, hosted limits), writes only into the session's own
folder (:class:`~merging.ui.hosting.Workspaces`), and a session runs one sweep at a time. Stop
sets the session's stop event: no new trial starts, those in flight end at their next step, and
the finished ones stay in the summary, the table and the zip.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import gradio as gr

from merging.errors import MergingError
from merging.evaluation.evaluator import DEFAULT_SAMPLES
from merging.experiment.sweep_ray import RAY_MISSING
from merging.methods import METHODS
from merging.ui import lab, sweep_plots, sweep_tab
from merging.ui.hosting import SourcePolicy, Workspaces

LOG = logging.getLogger("merging.app.sweep")
DEFAULT_PRESET = "mini-8"
DEFAULT_BACKBONE = "mini"
IDLE = "Choose checkpoints, methods and a grid (or press an ablation), then Run sweep."


def _error(exc: MergingError) -> gr.Error:
    LOG.info("user error: %s", exc)
    return gr.Error(str(exc), title="Error", print_exception=False)


def _session(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


class SweepHandlers:
    """The tab's event handlers; ``active`` holds each session's running sweep's stop event."""

    def __init__(self, workspaces: Workspaces, hosted: bool):
        self.workspaces = workspaces
        self.hosted = hosted
        self.active: dict[str | None, threading.Event] = {}
        self._lock = threading.Lock()

    def backends(self) -> list[str]:
        """The backends this lab offers: Ray only where it is installed, and never on a hosted lab."""
        return ["local", "ray"] if sweep_tab.ray_available() and not self.hosted else ["local"]

    def _claim(self, session: str | None) -> threading.Event:
        with self._lock:
            if session in self.active:
                raise MergingError("a sweep is already running in this session: stop it or wait for it to finish")
            stop = self.active[session] = threading.Event()
        return stop

    def run(
        self,
        request: gr.Request,
        backbone: Any,
        preset: Any,
        checkpoints: Any,
        methods: Any,
        grid: Any,
        order_seeds: Any,
        samples: Any,
        eval_mode: Any,
        device: Any,
        backend: Any = "local",
    ) -> Iterator[tuple[Any, ...]]:
        """Check, plan and run a sweep; stream (status, log, box plots, sensitivity, table, downloads)."""
        session = _session(request)
        stop: threading.Event | None = None
        try:
            if backend == "ray" and backend not in self.backends():
                raise MergingError("the ray backend is off on a hosted lab: use local" if self.hosted else RAY_MISSING)
            typed = sweep_tab.request_from_values(
                backbone,
                preset,
                checkpoints,
                methods,
                grid,
                order_seeds,
                samples,
                eval_mode,
                device,
                backend,
                self.hosted,
            )
            policy = SourcePolicy(self.hosted, self.workspaces.uploads(session))
            planned = sweep_tab.plan_sweep(typed, policy, self.hosted)
            stop = self._claim(session)
            folder = self.workspaces.new_folder(session, "sweep")
            for update in sweep_tab.stream(planned, folder, stop):
                yield self.view(update)
        except MergingError as exc:
            yield (f"**Error:** {exc}", *(gr.skip() for _ in range(5)))
            raise _error(exc) from None
        finally:
            if stop is not None:
                stop.set()  # a closed stream ends its trials too
                with self._lock:
                    if self.active.get(session) is stop:
                        del self.active[session]

    @staticmethod
    def view(update: sweep_tab.SweepUpdate) -> tuple[Any, ...]:
        """An update as the tab's outputs: status, log, box plots, sensitivity curves, table, downloads."""
        return (
            update.status,
            "\n".join(update.log),
            sweep_plots.box_figure(update.summary),
            sweep_plots.sensitivity_figure(update.summary),
            sweep_plots.table_frame(update.summary, update.references),
            [str(f) for f in update.files] or None,
        )

    def stop(self, request: gr.Request) -> str:
        """Stop this session's sweep: no new trial starts; the finished ones are kept."""
        event = self.active.get(_session(request))
        if event is None:
            return "No sweep is running in this session."
        event.set()
        return "Stopping: trials in flight end at their next step; the finished ones are kept."

    def ablation(self, key: Any) -> tuple[list[str], str, str]:
        """An ablation's setup: no methods checked, its grid, and what it studies."""
        try:
            study = sweep_tab.ablation(key)
        except MergingError as exc:
            raise _error(exc) from None
        return [], "\n".join(study.grid), f"**{study.title}.** {study.about}"

    def preset_list(self, preset: Any, backbone: Any) -> str:
        """A preset's checkpoint list for the chosen backbone."""
        try:
            if not isinstance(preset, str) or not isinstance(backbone, str) or len(preset) + len(backbone) > 700:
                raise MergingError("a preset and a backbone are named by short text")
            return lab.preset_text(preset, backbone) if preset else ""
        except MergingError as exc:
            raise _error(exc) from None

    def end_session(self, request: gr.Request) -> None:
        """The page was closed: its running sweep stops (its folder goes with the session's)."""
        event = self.active.get(_session(request))
        if event is not None:
            event.set()


def build_sweep_tab(demo: gr.Blocks, workspaces: Workspaces, hosted: bool, compute: dict[str, Any]) -> SweepHandlers:
    """The tab's components and events, inside the caller's ``gr.Tab``; ``compute`` is the app's
    concurrency group for heavy work, which a sweep shares with the lab's runs."""
    from merging.evaluation.backbones import backbone_choices
    from merging.evaluation.tasks import registry

    handlers = SweepHandlers(workspaces, hosted)
    limit = sweep_tab.max_trials(hosted)
    gr.Markdown(
        "Run methods over several task orders and option grids, as the papers do (every number a mean over the "
        "orders 42–51), and read the spread, the sensitivity and the table. The same sweep as "
        "`python -m merging sweep`; its summary.json, table and every trial are downloads."
        + (f" At most {limit} trials per sweep here." if hosted else "")
    )
    with gr.Row(equal_height=True):
        run = gr.Button("Run sweep", variant="primary", scale=0, min_width=150, elem_id="sweep-run")
        stop = gr.Button("Stop", variant="stop", scale=0, min_width=90, elem_id="sweep-stop")
        status = gr.Markdown(IDLE, elem_id="sweep-status")
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            backbone = gr.Dropdown(
                backbone_choices(), value=DEFAULT_BACKBONE, label="Backbone", allow_custom_value=True
            )
            preset = gr.Dropdown(list(registry().sets), value=DEFAULT_PRESET, label="Preset")
            checkpoints = gr.Textbox(
                value=lab.preset_text(DEFAULT_PRESET, DEFAULT_BACKBONE),
                label="Checkpoints (SRC=TASK per line; each order shuffles them; delete lines for a quick sweep)",
                lines=6,
            )
            methods = gr.CheckboxGroup(list(METHODS), value=[], label="Methods at their default options")
            grid = gr.Textbox(
                label="Grid: METHOD.KEY=V1,V2,... per line (the cartesian product per method)",
                placeholder="opcm.alpha=0.3,0.5,0.7",
                lines=3,
            )
            with gr.Accordion("Ablations from the papers (one click sets the grid)", open=True):
                ablations = [gr.Button(a.title, size="sm") for a in sweep_tab.ABLATIONS]
                about = gr.Markdown("")
            seeds = gr.Textbox(
                value=sweep_tab.DEFAULT_SEEDS,
                label="Order seeds (ranges and lists: 42-51, 42,45)",
                max_lines=1,
            )
            with gr.Row():
                samples = gr.Slider(
                    *sweep_tab.HOSTED_SAMPLES, value=DEFAULT_SAMPLES, step=16, label="Test images per task"
                )
                eval_mode = gr.Radio(list(sweep_tab.EVAL_MODES), value="seen", label="Evaluate tasks")
            from merging.compute.devices import DEVICE_CHOICES

            with gr.Row():
                device = gr.Radio(list(DEVICE_CHOICES), value="auto", label="Device")
                backend = gr.Radio(handlers.backends(), value="local", label="Backend")
            if "ray" not in handlers.backends():
                gr.Markdown(
                    "The Ray backend is off on a hosted lab."
                    if hosted
                    else f"The Ray backend is not available: {RAY_MISSING.removeprefix('--backend ray needs Ray, ')}"
                )
        with gr.Column(scale=2):
            log = gr.Textbox(label="Trials as they finish", lines=6, max_lines=12, interactive=False)
            boxes = gr.Plot(label="ACC and BWT over the orders", elem_id="sweep-plot-boxes")
            sensitivity = gr.Plot(label="Sensitivity (mean ± std)", elem_id="sweep-plot-sensitivity")
            table = gr.Dataframe(
                headers=sweep_plots.TABLE_HEADERS,
                label="Mean ± std beside the published numbers",
                interactive=False,
                wrap=True,
            )
            files = gr.File(
                label="Downloads: summary.json, table.md, table.csv, sweep.zip (every trial)",
                file_count="multiple",
                interactive=False,
            )
    preset.change(handlers.preset_list, [preset, backbone], checkpoints, api_visibility="private")
    for button, study in zip(ablations, sweep_tab.ABLATIONS, strict=True):
        button.click(
            lambda key=study.key: handlers.ablation(key), None, [methods, grid, about], api_visibility="private"
        )
    run.click(
        handlers.run,
        inputs=[backbone, preset, checkpoints, methods, grid, seeds, samples, eval_mode, device, backend],
        outputs=[status, log, boxes, sensitivity, table, files],
        api_name="sweep",
        show_progress="minimal",
        **compute,
    )
    stop.click(handlers.stop, None, [status], api_name="sweep_stop")
    demo.unload(handlers.end_session)
    return handlers
