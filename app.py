"""The Gradio app: a live continual-merging lab, a thin page over the ``merging`` library.

``python app.py`` starts it on the embedded mini benchmark (no network needed). The page
only wires components to :mod:`merging.lab` (requests, runs, downloads) and
:mod:`merging.plots` (figures); per-session state holds results as JSON, never weights.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from a lab that runs offline

import gradio as gr

from merging import lab, plots
from merging.backbones import backbone_choices
from merging.cli import parse_options
from merging.errors import MergingError
from merging.evaluation import DEFAULT_SAMPLES
from merging.merge import ContinualMerge
from merging.methods import METHODS
from merging.tasks import registry

DEFAULT_PRESET = "mini-8"
DEFAULT_BACKBONE = "mini"

EXPLANATIONS = r"""
**Setting.** $\theta_0$ is the pretrained image encoder, $\theta_t$ the one fine-tuned on task $t$, and
$\tau_t = \theta_t - \theta_0$ its task vector. Checkpoints arrive one at a time; a continual method keeps only
$\theta_0$, its merged model and a few numbers, never earlier checkpoints.

**OPCM.** For every linear weight, take the SVD of the merged task vector $\Delta_M = U \Sigma V^\top$, keep the
leading directions whose cumulative share of $\sum \sigma$ is at most $\alpha$, and project the new task vector
away from them (and from the diagonal of the singular basis): $\tilde\tau_t = \tau_t - U_r (U_r^\top \tau_t V) V^\top
- \dots$. Then $\Delta \leftarrow (\lambda_{t-1}\Delta + \tilde\tau_t)/\lambda_t$, with $\lambda_t$ chosen so that
$\lVert\Delta\rVert$ is the mean of the task-vector norms; $\lambda_t \approx \sqrt t$ for orthogonal task vectors.

**OTMF.** Fuse the merged model and the new checkpoint with real-valued masks,
$\theta(M) = \theta_0 + \alpha\, M_{pre} \odot \Delta_{pre} + (1-\alpha)\, M_{post} \odot \Delta_{post}$, trained
with Adam so that $\theta(M)$'s features match, in optimal transport, those of the merged model on the previous
task's images and of the new checkpoint on the new task's.

**Task arithmetic** $\theta^{(t)} = \theta^{(t-1)} + \lambda \tau_t$. **Weight averaging** $\theta^{(t)} =
\frac{(t-1)\theta^{(t-1)} + \theta_t}{t}$. **TIES** trims each of $[\theta^{(t-1)}-\theta_0, \tau_t]$ to its
top-$k$% entries, elects a sign per entry and sums the agreeing ones, scaled by $\lambda$. **MagMax** keeps, per
entry, the task-vector value of largest magnitude: $\theta^{(t)} = \theta_0 + \lambda v$.

**Metrics.** $a_{i,t}$ is the accuracy on task $i$ after step $t$. $\mathrm{ACC} = \frac1T \sum_i a_{i,T}$;
$\mathrm{BWT} = \frac{1}{T-1} \sum_{i<T} (a_{i,T} - a_{i,i})$, where $a_{i,i}$ is the merged model right after task
$i$ entered (negative BWT is forgetting).
"""


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


def serve(demo: gr.Blocks, **options: Any):
    """Launch with the lab's page script (zoom that survives live updates)."""
    return demo.launch(head=KEEP_ZOOM, **options)


# ------------------------------------------------------------------ the lab's handlers


def preset_list(preset: str, backbone: str) -> str:
    """The checkpoint list of a preset for the chosen backbone (an error names what is wrong)."""
    if not preset:
        return ""
    try:
        return lab.preset_text(preset, backbone)
    except MergingError as exc:
        raise gr.Error(str(exc)) from None


def shuffle_list(text: str, seed: float | None) -> str:
    if seed is None:
        raise gr.Error("give an order seed to shuffle with (42–51 follow the papers' protocol)")
    try:
        return lab.shuffle_text(text, int(seed))
    except MergingError as exc:
        raise gr.Error(str(exc)) from None


def edit_list(text: str, action: str, position: float | None, source: str) -> str:
    """Add a checkpoint, or remove / move up / move down the one at ``position`` (1-based)."""
    try:
        if action == "add":
            return lab.add_line(text, source)
        index = int(position or 0) - 1
        if action == "remove":
            return lab.remove_line(text, index)
        return lab.move_line(text, index, -1 if action == "up" else 1)
    except MergingError as exc:
        raise gr.Error(str(exc)) from None


def figures_for(results: dict[str, Any] | None, shown: str | None) -> tuple[Any, Any, Any, Any]:
    """The live figures (accuracy matrix and per-task curves of the shown method, ACC/BWT of all)."""
    if not results or not results.get("methods"):
        return None, None, None, plots.results_table({"methods": {}, "tasks": []})
    method = shown if shown in results["methods"] else next(iter(results["methods"]))
    has_steps = bool(results["methods"][method]["accuracy"])
    heatmap = plots.accuracy_heatmap(results, method) if has_steps else None
    curves = plots.per_task_curves(results, method) if has_steps else None
    return heatmap, plots.acc_bwt_figure(results), curves, plots.results_table(results)


def run_lab(
    backbone: str,
    preset: str,
    checkpoints: str,
    methods: list[str],
    samples: float,
    eval_mode: str,
    device: str,
    order_seed: float | None,
    layout: str,
    *option_values: Any,
) -> Iterator[tuple[Any, ...]]:
    """Run continual merging and stream (status, figures, table, files, state, method choice) per step."""
    try:
        request = lab.LabRequest(
            backbone=backbone,
            checkpoints=checkpoints,
            methods=list(methods or []),
            options=lab.options_from_values(list(methods or []), option_values),
            samples=None if not samples else int(samples),
            eval=eval_mode,
            device=device,
            preset=preset or None,
            order_seed=None if order_seed is None else int(order_seed),
        )
        config = request.config()
        folder = Path(tempfile.mkdtemp(prefix="continual-merging-lab-"))
        for update in lab.stream(config, folder, fmt=layout):
            heatmap, lines, curves, table = figures_for(update.results, None)
            choice = gr.update(choices=list(update.results["methods"]), value=next(iter(update.results["methods"])))
            opcm, otmf = plots.internals(update.results)
            yield (
                update.status,
                heatmap,
                lines,
                curves,
                table,
                [str(f) for f in update.files] or None,
                update.results,
                choice,
                opcm,
                otmf,
            )
    except MergingError as exc:
        # A toast names the culprit; the status line keeps it, and every other output keeps
        # what the run (or an earlier run) already showed.
        gr.Warning(str(exc))
        yield (f"**Error:** {exc}", *(gr.skip() for _ in range(9)))


def push(files: list[str] | None, method: str, repo_id: str, token: str) -> str:
    try:
        url = lab.push_to_hub(files or [], method, repo_id, token)
    except MergingError as exc:
        raise gr.Error(str(exc)) from None
    return f"Pushed the merged encoder of {method} to {url}"


def gpu_duration(*args: Any) -> int:
    """Seconds of GPU time to ask a ZeroGPU Space for: about 20 s per checkpoint and method, at least 60."""
    checkpoints, methods = args[2], args[3]
    count = len(lab.parse_checkpoint_lines(checkpoints)) if isinstance(checkpoints, str) else 8
    return int(min(1500, max(60, 20 * count * max(1, len(methods or [])))))


def on_gpu(function):
    """``spaces.GPU`` around the GPU work on Hugging Face Spaces; the function itself elsewhere."""
    try:
        import spaces
    except ImportError:
        return function
    return spaces.GPU(duration=gpu_duration)(function)


def show_method(results: dict[str, Any] | None, shown: str) -> tuple[Any, Any]:
    heatmap, _, curves, _ = figures_for(results, shown)
    return heatmap, curves


def analyse(results: dict[str, Any] | None, layer: str) -> tuple[Any, Any]:
    """Cosine similarities of the task vectors (and merged deltas) and spectra of a layer."""
    if not results or not results.get("methods"):
        raise gr.Error("run something first: the analysis reads the run's checkpoints and merged encoders")
    try:
        return lab.analysis_figures(results, layer.strip() or None)
    except MergingError as exc:
        raise gr.Error(str(exc)) from None


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


def merge_checkpoints(
    method: str, pretrained: str, checkpoints: str, options: str, device: str, out: str
) -> Iterator[str]:
    """Merge the listed checkpoints in order, yielding the growing log after every step.

    Bad input raises ``gr.Error`` naming the culprit; steps already logged stay on the page.
    """
    sources = [line.strip() for line in checkpoints.splitlines() if line.strip()]
    pairs = [p.strip() for p in options.replace("\n", ",").split(",") if p.strip()]
    log: list[str] = []
    try:
        job = ContinualMerge(method, pretrained.strip(), sources, parse_options(pairs), device)
        log.append(f"pretrained: {job.base.describe()}")
        log.extend(f"checkpoint: {reader.describe()}" for reader in job.readers)
        yield "\n".join(log)
        for step in job.steps():
            d = step.diagnostics
            extra = f", λ = {d['lambda']:.3f}" if "lambda" in d else ""
            log.append(
                f"step {step.index}/{step.total}: {step.source} merged in {step.seconds:.2f} s, "
                f"‖θ − θ0‖ = {d['merged_norm']:.4g}{extra}"
            )
            yield "\n".join(log)
        if out.strip():
            written = job.save(out.strip())
            log.append("wrote " + ", ".join(str(path) for path in written))
            yield "\n".join(log)
    except MergingError as exc:
        raise gr.Error(str(exc)) from None


# ------------------------------------------------------------------ the page


def option_component(method: str, option) -> gr.components.Component:
    label = f"{option.name}"
    info = f"{option.help} ({option.valid_values()})"
    if option.choices is not None:
        return gr.Dropdown(list(option.choices), value=option.default, label=label, info=info)
    if isinstance(option.default, bool):
        return gr.Checkbox(value=option.default, label=label, info=info)
    precision = 0 if isinstance(option.default, int) else None
    return gr.Number(
        value=option.default,
        label=label,
        info=info,
        precision=precision,
        minimum=option.minimum,
        maximum=option.maximum,
    )


def build_app() -> gr.Blocks:
    presets = list(registry().sets)
    with gr.Blocks(title="Continual merging lab") as demo:
        results_state = gr.State(None)
        gr.Markdown(
            "# Continual merging lab\n"
            "Merge fine-tuned CLIP image encoders into their pretrained encoder one task at a time and watch "
            "accuracy, forgetting (BWT) and the methods' internals after every step. The embedded mini benchmark "
            "runs offline on a CPU in seconds."
        )
        with gr.Tab("Continual lab"):
            with gr.Row():
                with gr.Column(scale=1, min_width=320):
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
                        label="Checkpoints in merge order (SRC=TASK per line; paths or Hub ids)",
                        lines=8,
                    )
                    with gr.Accordion("Edit the list", open=False):
                        with gr.Row():
                            position = gr.Number(value=1, precision=0, label="Row (1-based)", minimum=1)
                            up, down, remove = gr.Button("Up"), gr.Button("Down"), gr.Button("Remove")
                        with gr.Row():
                            new_source = gr.Textbox(label="Add a checkpoint (path or ORG/NAME[=TASK])", scale=3)
                            add = gr.Button("Add", scale=1)
                        with gr.Row():
                            order_seed = gr.Number(value=None, precision=0, label="Order seed")
                            shuffle = gr.Button("Shuffle")
                    method_choice = gr.CheckboxGroup(list(METHODS), value=["opcm"], label="Methods (side by side)")
                    option_inputs = []
                    for name, cls in METHODS.items():
                        with gr.Accordion(f"{cls.title} options", open=False):
                            gr.Markdown(cls.summary)
                            option_inputs += [option_component(name, o) for o in cls.options]
                    with gr.Row():
                        samples = gr.Slider(16, 2000, value=DEFAULT_SAMPLES, step=16, label="Test images per task")
                        eval_mode = gr.Radio(["seen", "all"], value="seen", label="Evaluate tasks")
                    with gr.Row():
                        device = gr.Radio(["auto", "cpu", "cuda"], value="auto", label="Device")
                        layout = gr.Radio(["hf", "open_clip"], value="hf", label="Merged encoder layout")
                    with gr.Row():
                        run = gr.Button("Run", variant="primary")
                        stop = gr.Button("Stop", variant="stop")
                with gr.Column(scale=3):
                    status = gr.Markdown("Pick a preset and methods, then Run.")
                    with gr.Row():
                        shown = gr.Dropdown(["opcm"], value="opcm", label="Method shown in the matrix and curves")
                    with gr.Row():
                        heatmap = gr.Plot(label="Accuracy matrix", elem_id="lab-plot-matrix")
                        lines = gr.Plot(label="ACC and BWT", elem_id="lab-plot-acc-bwt")
                    curves = gr.Plot(label="Per-task accuracy", elem_id="lab-plot-per-task")
                    table = gr.Dataframe(headers=plots.TABLE_HEADERS, label="Results", interactive=False)
                    with gr.Accordion("Push a merged encoder to the Hub", open=False):
                        with gr.Row():
                            push_method = gr.Dropdown(list(METHODS), value="opcm", label="Method")
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
                    with gr.Accordion("Method internals (live)", open=False):
                        opcm_internals = gr.Plot(
                            label="OPCM: λ(t) and the share of τ_t removed", elem_id="lab-plot-opcm"
                        )
                        otmf_internals = gr.Plot(label="OTMF: loss curves and mask statistics", elem_id="lab-plot-otmf")
                    with gr.Accordion("Analysis: task vectors and spectra", open=False):
                        layer = gr.Textbox(label="Layer for the spectra (empty: the last block's MLP input weight)")
                        analyse_button = gr.Button("Analyse the run")
                        cosine = gr.Plot(label="Cosine similarity", elem_id="lab-plot-cosine")
                        spectra = gr.Plot(label="Singular-value spectra", elem_id="lab-plot-spectra")
                    with gr.Accordion("How the methods work", open=False):
                        gr.Markdown(EXPLANATIONS, latex_delimiters=[{"left": "$", "right": "$", "display": False}])
                        gr.Markdown(methods_markdown())
            preset.change(preset_list, [preset, backbone], checkpoints)
            shuffle.click(shuffle_list, [checkpoints, order_seed], checkpoints)
            for button, action in ((up, "up"), (down, "down"), (remove, "remove"), (add, "add")):
                button.click(
                    lambda text, pos, src, a=action: edit_list(text, a, pos, src),
                    [checkpoints, position, new_source],
                    checkpoints,
                )
            event = run.click(
                on_gpu(run_lab),
                api_name="run",
                inputs=[
                    backbone,
                    preset,
                    checkpoints,
                    method_choice,
                    samples,
                    eval_mode,
                    device,
                    order_seed,
                    layout,
                    *option_inputs,
                ],
                outputs=[
                    status,
                    heatmap,
                    lines,
                    curves,
                    table,
                    files,
                    results_state,
                    shown,
                    opcm_internals,
                    otmf_internals,
                ],
                concurrency_limit=1,
                concurrency_id="gpu",
                show_progress="minimal",
            )
            stop.click(None, cancels=[event])
            push_button.click(push, [files, push_method, push_repo, push_token], push_status, api_visibility="private")
            shown.change(show_method, [results_state, shown], [heatmap, curves])
            analyse_button.click(
                analyse,
                [results_state, layer],
                [cosine, spectra],
                api_name="analyse",
                concurrency_limit=1,
                concurrency_id="gpu",
            )
        with gr.Tab("Merge and save"):
            gr.Markdown("Merge local or Hub checkpoints into their pretrained encoder and write the result.")
            with gr.Row():
                with gr.Column():
                    merge_methods = [name for name, cls in METHODS.items() if not cls.requires_data]
                    method = gr.Dropdown(merge_methods, value="opcm", label="Method")
                    pretrained = gr.Textbox(label="Pretrained encoder (path or Hub id)")
                    merge_list = gr.Textbox(label="Fine-tuned checkpoints, one per line, in merge order", lines=5)
                    options = gr.Textbox(label="Options (KEY=VALUE, comma separated)", placeholder="alpha=0.5")
                    merge_device = gr.Radio(["auto", "cpu", "cuda"], value="auto", label="Device")
                    out = gr.Textbox(label="Write the merged encoder to (optional path)")
                    merge_button = gr.Button("Merge", variant="primary")
                with gr.Column():
                    log = gr.Textbox(label="Progress", lines=14, interactive=False)
            merge_button.click(
                merge_checkpoints,
                inputs=[method, pretrained, merge_list, options, merge_device, out],
                outputs=log,
                concurrency_limit=1,
                concurrency_id="gpu",
            )
    return demo


def warm_default_run() -> None:
    """Decode the default benchmark's images and compute its reference rows in the background."""
    try:
        config = lab.LabRequest(checkpoints=lab.preset_text(DEFAULT_PRESET, DEFAULT_BACKBONE)).config()
        lab.warm_up(config)
    except MergingError as exc:  # a missing benchmark is reported when the user runs it
        print(f"warm-up skipped: {exc}", file=sys.stderr)


if __name__ == "__main__":
    demo = build_app().queue(max_size=16, default_concurrency_limit=1)
    serve(demo, server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), prevent_thread_lock=True)
    threading.Thread(target=warm_default_run, name="warm-up", daemon=True).start()
    demo.block_thread()
