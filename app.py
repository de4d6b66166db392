"""The Gradio app: a thin page over the ``merging`` library.

Until the live continual-merging lab lands, the page merges local checkpoints with any
registered method, step by step, and explains the methods. Start it with ``python app.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from a lab that runs offline

import gradio as gr

from merging.cli import parse_options
from merging.errors import MergingError
from merging.merge import ContinualMerge
from merging.methods import METHODS


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


def build_app() -> gr.Blocks:
    with gr.Blocks(title="Continual merging lab") as demo:
        gr.Markdown(
            "# Continual merging lab\n"
            "Merge fine-tuned CLIP image encoders one after the other into their pretrained encoder. "
            "Paths are local checkpoint folders or `.safetensors` files (open_clip or Hugging Face layout)."
        )
        with gr.Row():
            with gr.Column():
                merge_methods = [name for name, cls in METHODS.items() if not cls.requires_data]
                method = gr.Dropdown(merge_methods, value="opcm", label="Method")
                pretrained = gr.Textbox(label="Pretrained encoder (path)")
                checkpoints = gr.Textbox(label="Fine-tuned checkpoints, one path per line, in merge order", lines=5)
                options = gr.Textbox(label="Options (KEY=VALUE, comma separated)", placeholder="alpha=0.5")
                device = gr.Radio(["auto", "cpu", "cuda"], value="auto", label="Device")
                out = gr.Textbox(label="Write the merged encoder to (optional path)")
                run = gr.Button("Merge", variant="primary")
            with gr.Column():
                log = gr.Textbox(label="Progress", lines=14, interactive=False)
        with gr.Accordion("Methods", open=False):
            gr.Markdown(methods_markdown())
        run.click(
            merge_checkpoints,
            inputs=[method, pretrained, checkpoints, options, device, out],
            outputs=log,
            concurrency_limit=1,
        )
    return demo


if __name__ == "__main__":
    build_app().queue(max_size=16).launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
