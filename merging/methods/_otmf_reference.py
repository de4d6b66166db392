"""OTMF's merge step written per parameter, as :mod:`merging.methods.otmf` computed it before
its buffers went flat: the yardstick for the flat implementation.

Every quantity is a dict of tensors, one per parameter: the scaled deltas, the masks, their
Adam optimisers (``torch.optim.Adam``'s default implementation over the list of masks), the
keep-best copies, and θ(M) = θ0 + M_pre ⊙ a + M_post ⊙ b built parameter by parameter with a
mul and an add each. Tests check that the flat implementation merges the same weights to
float32 rounding; ``benchmarks/otmf_step.py`` and ``benchmarks/otmf_mini.py`` time it as the
"before". It is not used by the app.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from merging.methods._ot_loss import ot_loss
from merging.methods.base import Incoming
from merging.methods.otmf import OTMF, mask_summary


class PerParameterOTMF(OTMF):
    """OTMF whose fusion step runs parameter by parameter (same options, data and seeds)."""

    def _fuse(self, incoming: Incoming, task: str) -> dict[str, Any]:
        alpha = self.config["alpha"]
        keys = self.merge_keys
        scaled_pre = {k: (self.merged[k] - self.pretrained[k]).mul_(alpha) for k in keys}
        scaled_post = {k: (incoming[k] - self.pretrained[k]).mul_(1.0 - alpha) for k in keys}
        diagnostics: dict[str, Any] = {"alpha": alpha, "pre_task": self.previous_task, "post_task": task}
        if self.config["masks"] == "on" and self.config["steps"] > 0:
            started = time.perf_counter()
            teachers = self._teachers(incoming, task)
            diagnostics["teacher_seconds"] = time.perf_counter() - started
            started = time.perf_counter()
            masks, optimisation = self._optimise_per_parameter(scaled_pre, scaled_post, teachers)
            diagnostics["optimisation_seconds"] = time.perf_counter() - started
            diagnostics.update(optimisation)
            diagnostics["masks"] = {name: mask_summary(m) for name, m in masks.items()}
        else:
            masks = None
        with torch.no_grad():
            for k in keys:
                if masks is None:
                    self.merged[k].copy_(self.pretrained[k] + scaled_pre[k] + scaled_post[k])
                else:
                    self.merged[k].copy_(
                        self.pretrained[k] + masks["pre"][k] * scaled_pre[k] + masks["post"][k] * scaled_post[k]
                    )
        return diagnostics

    def _optimise_per_parameter(
        self, scaled_pre: dict[str, Tensor], scaled_post: dict[str, Tensor], teachers: dict[str, tuple[Tensor, Tensor]]
    ) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        steps, keys = self.config["steps"], self.merge_keys
        loss_fn = ot_loss(self.config["ot"], self.config["blur"])
        masks = {
            "pre": {k: torch.ones_like(scaled_pre[k], requires_grad=True) for k in keys},
            "post": {k: torch.ones_like(scaled_post[k], requires_grad=True) for k in keys},
        }
        scaled = {"pre": scaled_pre, "post": scaled_post}
        optimisers = {s: torch.optim.Adam(list(masks[s].values()), lr=self.config["lr"]) for s in masks}
        batches = {s: self._batch_order(s, len(teachers[s][0])) for s in masks}
        keep_best = self.config["keep"] == "best"
        best = {s: {k: m.detach().clone() for k, m in masks[s].items()} for s in masks} if keep_best else None
        best_loss = {s: math.inf for s in masks}
        best_step: dict[str, int | None] = {s: None for s in masks}
        curves: dict[str, list[float]] = {"pre": [], "post": []}
        joint = self.config["schedule"] == "joint"
        for step in range(steps):
            trained = ("pre", "post") if joint else (("pre",) if step % 2 == 0 else ("post",))
            parameters = {}
            for k in keys:
                value = self.pretrained[k]
                for s in ("pre", "post"):
                    mask = masks[s][k] if s in trained else masks[s][k].detach()
                    value = value + mask * scaled[s][k]
                parameters[k] = value
            losses = {}
            for s in trained:
                images, targets = teachers[s]
                index = next(batches[s])
                features = self._features(parameters, images[index.to(images.device)]).float()
                losses[s] = loss_fn(features, targets[index])
            total = sum(losses.values())
            for s in trained:
                optimisers[s].zero_grad(set_to_none=True)
            total.backward()  # type: ignore[union-attr] (a tensor: at least one set trains)
            del parameters
            values = {s: float(v.detach()) for s, v in losses.items()}
            for s, v in values.items():
                curves[s].append(v)
            groups = [(("pre", "post"), sum(values.values()))] if joint else [((s,), v) for s, v in values.items()]
            for sets, v in groups:
                if v < best_loss[sets[0]]:
                    for name in sets:
                        best_loss[name], best_step[name] = v, step
                        if best is not None:
                            with torch.no_grad():
                                for k in keys:
                                    best[name][k].copy_(masks[name][k])
            for s in trained:
                optimisers[s].step()
        final = best if best is not None else {s: {k: m.detach() for k, m in masks[s].items()} for s in masks}
        return final, {
            "loss_pre": curves["pre"],
            "loss_post": curves["post"],
            "best_step": best_step,
            "best_loss": {s: (None if math.isinf(v) else v) for s, v in best_loss.items()},
            "schedule": self.config["schedule"],
            "keep": self.config["keep"],
        }
