"""The lab as a teacher: a plain-language account of each step, generated from the run's numbers,
the classroom's prepared experiments, and the formulas shown beside the plots.

Every sentence of an account comes from the results (accuracies, reference rows, the methods'
diagnostics), never from a template that could contradict them: a method with no diagnostic the
account knows is described by its own ``step_summary``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from merging.experiment.results import MethodResults, RunResults


def _points(value: float) -> str:
    return f"{100 * value:.1f}"


def _did(name: str, diagnostics: Mapping[str, Any]) -> str:
    """What a method did to the new task vector, in words, from its diagnostics."""
    from merging.methods import METHODS

    if "removed_share" in diagnostics and "lambda" in diagnostics:
        return (
            f"projected away {_points(diagnostics['removed_share'])}% of the new task vector (the part along "
            f"directions earlier tasks use), then rescaled the merged task vector by λ = {diagnostics['lambda']:.2f}"
        )
    masks = diagnostics.get("masks")
    if isinstance(masks, Mapping) and masks:
        parts = []
        for which, summary in masks.items():
            if isinstance(summary, Mapping) and "mean" in summary:
                tails = summary.get("below_0.5", 0.0) + summary.get("above_1.5", 0.0)
                parts.append(
                    f"the {which} masks average {summary['mean']:.2f} (± {summary.get('std', 0.0):.2f}), "
                    f"{_points(tails)}% of entries below 0.5 or above 1.5"
                )
        if parts:
            return "learned masks over every parameter: " + "; ".join(parts)
    summary: list[str] = []
    if name in METHODS:
        try:  # the method's own words; a step without the diagnostics it reads has none
            summary = METHODS[name].step_summary(diagnostics)
        except (KeyError, TypeError, ValueError):
            summary = []
    return ("merged it, reporting " + ", ".join(summary)) if summary else "merged it by its rule"


def _losses(method: MethodResults, step: int) -> tuple[float, str | None, float]:
    """Mean change of the earlier tasks' accuracy from step − 1 to step, the task that lost most, and its change."""
    accuracy = [s.accuracy for s in method.steps]
    if step < 2 or len(accuracy) < step:
        return 0.0, None, 0.0
    now, before = accuracy[step - 1], accuracy[step - 2]
    changes = {t: now[t] - before[t] for t in before if t in now}
    if not changes:
        return 0.0, None, 0.0
    worst = min(changes, key=lambda t: changes[t])
    return sum(changes.values()) / len(changes), worst, changes[worst]


def step_account(results: RunResults) -> str:
    """What the last completed step did, in a few plain sentences (Markdown); "" before the first step."""
    step = results.completed_steps
    if step == 0:
        return ""
    task = results.tasks[step - 1]
    pretrained = results.reference.get("pretrained", {})
    finetuned = results.reference.get("finetuned", {})
    lines = [f"**Step {step}: {task} entered.**"]
    if task in pretrained and task in finetuned:
        lines[0] += (
            f" Its fine-tuned model scores {_points(finetuned[task])}% on it, the pretrained one "
            f"{_points(pretrained[task])}%."
        )
    for name, method in results.methods.items():
        if len(method.steps) < step:
            continue
        sentence = f"**{name}** {_did(name, method.steps[step - 1].diagnostics)}."
        now = method.steps[step - 1].accuracy
        if task in now:
            sentence += f" The merged model scores {_points(now[task])}% on {task}"
            if task in finetuned and finetuned[task] > 0:
                sentence += f" ({100 * now[task] / finetuned[task]:.1f}% of its fine-tuned accuracy)"
            sentence += "."
        mean, worst, change = _losses(method, step)
        if worst is not None:
            if abs(100 * mean) < 0.05:
                sentence += " The earlier tasks held their accuracy on average"
            else:
                verb = "lost" if mean < 0 else "gained"
                sentence += f" The earlier tasks {verb} {abs(100 * mean):.1f} points on average"
            if change < 0:
                sentence += f"; {worst} lost most ({100 * change:+.1f})"
            sentence += "."
        if method.bwt_per_step and len(method.bwt_per_step) >= step and method.bwt_per_step[step - 1] is not None:
            sentence += f" BWT so far {100 * method.bwt_per_step[step - 1]:+.1f}."
        lines.append(sentence)
    return "\n\n".join(lines)


# ------------------------------------------------------------------ the classroom


@dataclass(frozen=True)
class Experiment:
    """A prepared experiment: the setup it puts on the page, and what to watch while it runs."""

    key: str
    title: str
    preset: str
    methods: tuple[str, ...]
    what_to_watch: str
    options: dict[tuple[str, str], Any] = field(default_factory=dict)  # (method, option) → value
    eval: str = "seen"


EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment(
        key="scaling",
        title="Why scaling matters",
        preset="mini-8",
        methods=("task_arithmetic", "weight_average", "opcm"),
        options={("task_arithmetic", "scaling"): 1.0},
        what_to_watch=(
            "Task arithmetic adds every task vector at full size (λ = 1), weight averaging shrinks the t-th "
            "to 1/t of it, and OPCM rescales the merged task vector to the mean task-vector norm. Watch ACC "
            "in the ACC/BWT plot: summed task vectors grow with t and push the model away from every task (on "
            "mini-8 with 500 images per task, task arithmetic at λ = 1 ends at ACC 37.3, below the pretrained "
            "model's 61.3; weight averaging 72.3, OPCM 77.4); compare the matrices under Compare methods."
        ),
    ),
    Experiment(
        key="projection",
        title="What the projection removes",
        preset="mini-8",
        methods=("opcm",),
        what_to_watch=(
            "OPCM removes, from each new task vector, its part along the leading singular directions of the "
            "merged task vector (up to α = 0.5 of its cumulative spectrum). Watch the step account (the share "
            "removed and λ), the share removed per layer under Live analysis, and the dotted α cut in the "
            "spectra."
        ),
    ),
    Experiment(
        key="forgetting",
        title="Forgetting over 12 tasks",
        preset="mini-12",
        methods=("opcm", "task_arithmetic"),
        eval="all",
        what_to_watch=(
            "The embedded benchmark has 12 tasks (mini-12), not the 20 of TALL20: the longest sequence that "
            "runs offline. Every task is evaluated after every step, so the per-task curves show each task "
            "before it enters (zero-shot level), when it enters, and how much of it later tasks wear away."
        ),
    ),
)


def experiment(key: Any) -> Experiment:
    """The prepared experiment named ``key`` (an error listing them for anything else)."""
    from merging.errors import MergingError

    for prepared in EXPERIMENTS:
        if prepared.key == key:
            return prepared
    raise MergingError(f"experiment must be one of {', '.join(e.key for e in EXPERIMENTS)}, not {key!r}")


# ------------------------------------------------------------------ formulas beside the plots

FORMULAS = {
    "matrix": r"$a_{i,t}$: accuracy on task $i$ after step $t$ (blank before task $i$ is seen, unless every task is "
    r"evaluated).",
    "acc_bwt": r"$\mathrm{ACC}_t = \frac1t \sum_{i \le t} a_{i,t}$; $\mathrm{BWT}_t = \frac{1}{t-1} \sum_{i<t} "
    r"(a_{i,t} - a_{i,i})$, negative when earlier tasks are forgotten.",
    "curves": r"Each line is a row of the matrix, $t \mapsto a_{i,t}$: a falling line is forgetting.",
    "cosine": r"$\cos(\tau_i, \tau_j) = \langle \tau_i, \tau_j \rangle / (\lVert\tau_i\rVert \lVert\tau_j\rVert)$ "
    r"over every parameter; near 0: the tasks use different directions.",
    "spectra": r"$\sigma_1 \ge \sigma_2 \ge \dots$ of the layer's matrix; cumulative share $c_r = \sum_{k \le r} "
    r"\sigma_k / \sum_k \sigma_k$. OPCM keeps the directions with $c_r \le \alpha$ out of the next task vector.",
    "removed": r"$1 - \lVert P(\tau_t) \rVert / \lVert \tau_t \rVert$ per matrix, where $P(\tau_t)$ is what the "
    r"projection kept: the share of the new task vector it removed.",
}
