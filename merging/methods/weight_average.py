"""Continual weight averaging: the running mean of the fine-tuned models."""

from __future__ import annotations

from typing import Any, ClassVar

from merging.methods.base import ContinualMerger, StepInput


class WeightAverage(ContinualMerger):
    name: ClassVar[str] = "weight_average"
    title: ClassVar[str] = "Continual Weight Averaging"
    summary: ClassVar[str] = "Keeps the running mean θ^(t) = ((t−1) θ^(t−1) + θ_t) / t of the fine-tuned models."
    published_name: ClassVar[str | None] = "weight_average"
    explanation: ClassVar[str] = r"$\theta^{(t)} = \frac{(t-1)\theta^{(t-1)} + \theta_t}{t}$."

    def _merge(self, step: StepInput) -> dict[str, Any]:
        incoming = step.checkpoint
        t = self.step_count
        for k in self.merge_keys:
            merged = self.merged[k]
            merged.mul_(t - 1).add_(incoming[k]).div_(t)
        return {}
