"""MagMax for independent fine-tunes (Marczak et al., 2024), in its continual form.

A running vector v keeps, per entry, whichever of v and the new task vector has the larger
magnitude; ties go to the newer one. θ^(t) = θ0 + λ v. v is kept explicitly (rather than
recovered from θ^(t)) so that magnitudes are compared exactly.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from merging.io.state_dict import StateDict
from merging.methods.base import ContinualMerger, Option, StepInput


class MagMax(ContinualMerger):
    name: ClassVar[str] = "magmax"
    title: ClassVar[str] = "MagMax"
    summary: ClassVar[str] = "Keeps, per parameter entry, the task-vector value of largest magnitude seen so far."
    published_name: ClassVar[str | None] = "magmax"
    explanation: ClassVar[str] = (
        r"Keeps, per entry, the task-vector value of largest magnitude: $\theta^{(t)} = \theta_0 + \lambda v$."
    )
    options: ClassVar[tuple[Option, ...]] = (
        Option("scaling", 0.5, "λ applied to the max-magnitude vector", minimum=0.0, exclusive_minimum=True),
    )

    def start(self, pretrained, device="cpu", family=None) -> None:
        super().start(pretrained, device, family)
        self.running: StateDict = {}

    def _merge(self, step: StepInput) -> dict[str, Any]:
        incoming = step.checkpoint
        scaling = self.config["scaling"]
        for k in self.merge_keys:
            task = incoming[k] - self.pretrained[k]
            if k in self.running:
                running = self.running[k]
                torch.where(task.abs() >= running.abs(), task, running, out=running)
            else:
                self.running[k] = task
            torch.add(self.pretrained[k], self.running[k], alpha=scaling, out=self.merged[k])
        return {}
