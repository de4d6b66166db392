"""Continual task arithmetic: θ^(t) = θ^(t−1) + λ τ_t (Ilharco et al., in its continual form)."""

from __future__ import annotations

from typing import Any, ClassVar

from merging.methods.base import ContinualMerger, Option, StepInput


class TaskArithmetic(ContinualMerger):
    name: ClassVar[str] = "task_arithmetic"
    title: ClassVar[str] = "Continual Task Arithmetic"
    summary: ClassVar[str] = "Adds each new task vector, scaled by λ, to the merged model."
    published_name: ClassVar[str | None] = "continual_task_arithmetic"
    explanation: ClassVar[str] = r"$\theta^{(t)} = \theta^{(t-1)} + \lambda \tau_t$."
    options: ClassVar[tuple[Option, ...]] = (
        Option(
            "scaling",
            0.3,
            "λ (0.3 for 8 tasks, 0.1 for 14 or 20 in the literature)",
            minimum=0.0,
            exclusive_minimum=True,
        ),
    )

    def _merge(self, step: StepInput) -> dict[str, Any]:
        incoming = step.checkpoint
        scaling = self.config["scaling"]
        for k in self.merge_keys:
            self.merged[k].add_(incoming[k] - self.pretrained[k], alpha=scaling)
        return {}
