"""OTMF: optimal-transport masked fusion (arXiv 2511.19561), as ALGORITHMS.md describes it.

Step 1 takes the first fine-tuned encoder as it is. Step t ≥ 2 fuses the current merged
model (Δ_pre = θm − θ0) with the new checkpoint (Δ_post = τ_t) through two real-valued masks
over every float parameter, initialised to 1 and fresh each step:

    θ(M) = θ0 + α · (M_pre ⊙ Δ_pre) + (1 − α) · (M_post ⊙ Δ_post)

The masks are trained with Adam so that θ(M)'s image features match, in the optimal-transport
sense, those of the "pre" teacher (θm, on unlabelled images of the most recently merged task)
and of the "post" teacher (θ_t, on images of the new task). The merged encoder is built with
``torch.func.functional_call`` so the masks get gradients; teacher features are computed once
per step under ``no_grad`` (they do not depend on the masks). With the default alternating
schedule even optimisation steps train M_pre on the pre loss and odd ones M_post on the post
loss; ``keep=best`` keeps, for each mask set, the masks of the step where its own loss was
lowest (under the joint schedule: of the lowest summed loss).

Head tuning (optional): after step t the head of the task merged at step t − 1 is fine-tuned on
the merged encoder with cross-entropy (encoder frozen), and after the last step task T's head
too; every task is then evaluated with the head it has at that time.

Memory is bounded in T: θ0, the merged model, the two deltas, two masks with their gradients,
Adam moments and best copies (about 14–16 times the encoder), never an earlier checkpoint.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from merging.errors import MergingError
from merging.methods._ot_loss import OT_LOSSES, ot_loss
from merging.methods.base import ContinualMerger, Diagnostic, Incoming, Option, StepInput

if TYPE_CHECKING:
    from plotly.graph_objects import Figure

    from merging.experiment.results import MethodResults

_TEACHER_BATCH = 64
_QUANTILE_LIMIT = 1 << 24  # torch.quantile's input limit; larger mask sets are subsampled evenly
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def mask_summary(masks: dict[str, Tensor]) -> dict[str, Any]:
    """Mean, std, quantiles and the shares below 0.5 and above 1.5 of all entries of a mask set."""
    count = sum(m.numel() for m in masks.values())
    total = sum(float(m.detach().double().sum()) for m in masks.values())
    mean = total / count
    squares = sum(float((m.detach().double() - mean).square().sum()) for m in masks.values())
    below = sum(int((m.detach() < 0.5).sum()) for m in masks.values())
    above = sum(int((m.detach() > 1.5).sum()) for m in masks.values())
    flat = torch.cat([m.detach().flatten().float().cpu() for m in masks.values()])
    if flat.numel() > _QUANTILE_LIMIT:
        flat = flat[:: math.ceil(flat.numel() / _QUANTILE_LIMIT)]
    values = torch.quantile(flat, torch.tensor(QUANTILES))
    return {
        "mean": mean,
        "std": math.sqrt(squares / count),
        "quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, values, strict=True)},
        "below_0.5": below / count,
        "above_1.5": above / count,
        "entries": count,
    }


class OTMF(ContinualMerger):
    name: ClassVar[str] = "otmf"
    title: ClassVar[str] = "OTMF (optimal-transport masked fusion)"
    summary: ClassVar[str] = (
        "Fuses the merged model and the new checkpoint through learned masks that match both "
        "teachers' feature distributions in optimal transport."
    )
    requires_data: ClassVar[bool] = True
    explanation: ClassVar[str] = (
        r"Fuse the merged model and the new checkpoint with real-valued masks, $\theta(M) = \theta_0 + \alpha\, "
        r"M_{pre} \odot \Delta_{pre} + (1-\alpha)\, M_{post} \odot \Delta_{post}$, trained with Adam so that "
        r"$\theta(M)$'s features match, in optimal transport, those of the merged model on the previous task's "
        r"images and of the new checkpoint on the new task's."
    )
    diagnostics: ClassVar[tuple[Diagnostic, ...]] = (
        Diagnostic("task", str, "the task of the incoming checkpoint"),
        Diagnostic("head_tuning", list, "per head tuned after this step: task, images, loss curve, seconds"),
        Diagnostic("alpha", float, "α, the merged model's weight", optional=True),
        Diagnostic("pre_task", str, "the previous task (the merged model's teacher data)", optional=True),
        Diagnostic("post_task", str, "the new task (the new checkpoint's teacher data)", optional=True),
        Diagnostic("teacher_seconds", float, "time to compute both teachers' features", optional=True),
        Diagnostic("optimisation_seconds", float, "time to train the masks", optional=True),
        Diagnostic("loss_pre", list, "OT loss of the pre masks per update", optional=True),
        Diagnostic("loss_post", list, "OT loss of the post masks per update", optional=True),
        Diagnostic("best_step", dict, "per mask set, the update of the lowest loss", optional=True),
        Diagnostic("best_loss", dict, "per mask set, the lowest loss", optional=True),
        Diagnostic("schedule", str, "how the two mask sets were trained", optional=True),
        Diagnostic("keep", str, "which masks were kept (best or last)", optional=True),
        Diagnostic("masks", dict, "per mask set: mean, std, quantiles and tail shares of the masks", optional=True),
    )
    figure_title: ClassVar[str | None] = "OTMF: loss curves and mask statistics"
    options: ClassVar[tuple[Option, ...]] = (
        Option(
            "alpha", 0.8, "weight α of the merged model's delta (1 − α goes to the new task)", minimum=0.0, maximum=1.0
        ),
        Option("steps", 100, "optimisation steps per merge (one batch each)", minimum=0),
        Option("lr", 0.01, "Adam learning rate of the masks", minimum=0.0, exclusive_minimum=True),
        Option("batch_size", 16, "unlabelled images per batch", minimum=1),
        Option("ot", "emd", "OT loss: exact OT (emd) or the debiased Sinkhorn divergence", choices=OT_LOSSES),
        Option("blur", 0.05, "Sinkhorn blur (ε = blur²)", minimum=0.0, exclusive_minimum=True),
        Option(
            "schedule",
            "alternate",
            "alternate the two mask sets, or train both on the summed loss",
            choices=("alternate", "joint"),
        ),
        Option("keep", "best", "keep the masks of the lowest loss, or the last iterate", choices=("best", "last")),
        Option("masks", "on", "off: plain α-interpolation without optimisation (the ablation)", choices=("on", "off")),
        Option("head_tuning", "off", "fine-tune each task's head on the merged encoder", choices=("off", "on")),
        Option(
            "head_fraction",
            0.25,
            "share of the labelled train split used to tune a head",
            minimum=0.0,
            maximum=1.0,
            exclusive_minimum=True,
        ),
        Option("head_steps", 100, "head-tuning steps (batch 16)", minimum=0),
        Option("head_lr", 0.01, "Adam learning rate of the heads", minimum=0.0, exclusive_minimum=True),
        Option("ot_split", "train", "split whose images (unlabelled) the OT losses use", choices=("train", "test")),
    )

    def start(self, pretrained, device="cpu", family=None) -> None:
        super().start(pretrained, device, family)
        self.previous_task: str | None = None
        self._heads: dict[str, Tensor] = {}

    def heads(self) -> dict[str, Tensor]:
        return dict(self._heads)

    @property
    def tunes_heads(self) -> bool:
        return self.config["head_tuning"] == "on"

    def data_splits(self) -> tuple[str, ...]:
        """The OT losses' split, and the labelled train split when heads are tuned."""
        splits = {self.config["ot_split"], *(("train",) if self.tunes_heads else ())}
        return tuple(sorted(splits))

    @classmethod
    def live_figure(cls, results: MethodResults) -> Figure | None:
        """The loss curves of both mask sets per merge step, and the masks' statistics per step."""
        if not results.steps:
            return None
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        from merging.ui.plots import colour, styled

        figure = make_subplots(
            rows=1, cols=3, subplot_titles=("pre masks: OT loss", "post masks: OT loss", "masks: mean ± std, tails")
        )
        for index, step in enumerate(results.steps):
            for col, key in ((1, "loss_pre"), (2, "loss_post")):
                if step.diagnostics.get(key):
                    figure.add_trace(
                        go.Scatter(
                            y=step.diagnostics[key],
                            name=f"step {index + 1}",
                            mode="lines",
                            line=dict(color=colour(index)),
                            legendgroup=str(index),
                            showlegend=col == 1,
                        ),
                        row=1,
                        col=col,
                    )
        for offset, which in ((0, "pre"), (1, "post")):
            points = [
                (t + 1, s.diagnostics["masks"][which]) for t, s in enumerate(results.steps) if "masks" in s.diagnostics
            ]
            if not points:
                continue
            x = [t for t, _ in points]
            figure.add_trace(
                go.Scatter(
                    x=x,
                    y=[m["mean"] for _, m in points],
                    error_y=dict(array=[m["std"] for _, m in points]),
                    name=f"{which} mask mean ± std",
                    mode="markers+lines",
                    line=dict(color=colour(6 + offset)),
                ),
                row=1,
                col=3,
            )
            figure.add_trace(
                go.Bar(
                    x=x,
                    y=[m["below_0.5"] + m["above_1.5"] for _, m in points],
                    name=f"{which}: share < 0.5 or > 1.5",
                    marker_color=colour(4 + offset),
                    opacity=0.5,
                ),
                row=1,
                col=3,
            )
        figure.update_xaxes(title_text="update", row=1, col=1)
        figure.update_xaxes(title_text="update", row=1, col=2)
        figure.update_xaxes(title_text="step", dtick=1, row=1, col=3)
        return styled(figure, "OTMF internals")

    # ------------------------------------------------------------ one step

    def _merge(self, step: StepInput) -> dict[str, Any]:
        assert step.context is not None and step.task is not None  # checked by step()
        incoming = step.checkpoint
        diagnostics: dict[str, Any] = {"task": step.task}
        if self.step_count == 1:
            for k in self.merge_keys:
                self.merged[k].copy_(incoming[k])
        else:
            diagnostics.update(self._fuse(incoming, step.task))
        tuned = []
        if self.config["head_tuning"] == "on":
            if self.previous_task is not None:
                tuned.append(self._tune_head(self.previous_task))
            if step.is_last:
                tuned.append(self._tune_head(step.task))
        diagnostics["head_tuning"] = tuned
        self.previous_task = step.task
        return diagnostics

    def _fuse(self, incoming: Incoming, task: str) -> dict[str, Any]:
        alpha = self.config["alpha"]
        keys = self.merge_keys
        # scaled deltas: α Δ_pre and (1 − α) Δ_post, so θ(M) = θ0 + M_pre ⊙ a + M_post ⊙ b
        scaled_pre = {k: (self.merged[k] - self.pretrained[k]).mul_(alpha) for k in keys}
        scaled_post = {k: (incoming[k] - self.pretrained[k]).mul_(1.0 - alpha) for k in keys}
        diagnostics: dict[str, Any] = {"alpha": alpha, "pre_task": self.previous_task, "post_task": task}
        if self.config["masks"] == "on" and self.config["steps"] > 0:
            started = time.perf_counter()
            teachers = self._teachers(incoming, task)
            diagnostics["teacher_seconds"] = time.perf_counter() - started
            started = time.perf_counter()
            masks, optimisation = self._optimise(scaled_pre, scaled_post, teachers)
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

    # ------------------------------------------------------------ data and features

    def _pool(self, task: str) -> Tensor:
        assert self.context is not None
        images = self.context.images(task, self.config["ot_split"]).images
        if images.shape[0] == 0:
            raise MergingError(f"otmf: task {task} has no images in its {self.config['ot_split']} split")
        return images

    def _features(self, parameters: dict[str, Tensor], images: Tensor) -> Tensor:
        assert self.context is not None
        return functional_call(self.context.encoder, parameters, (self.context.prepare(images),))

    @torch.no_grad()
    def _teacher_features(self, parameters: dict[str, Tensor], images: Tensor) -> Tensor:
        return torch.cat(
            [self._features(parameters, images[i : i + _TEACHER_BATCH]) for i in range(0, len(images), _TEACHER_BATCH)]
        ).float()

    def _teachers(self, incoming: Incoming, task: str) -> dict[str, tuple[Tensor, Tensor]]:
        """Pools of images of both tasks and the teachers' features on them (no gradients)."""
        assert self.previous_task is not None
        pre_images, post_images = self._pool(self.previous_task), self._pool(task)
        # the pre teacher θ0 + Δ_pre is the current merged model itself; the post teacher is θ_t
        pre_features = self._teacher_features({k: self.merged[k] for k in self.merge_keys}, pre_images)
        post_features = self._teacher_features({k: incoming[k] for k in self.merge_keys}, post_images)
        return {"pre": (pre_images, pre_features), "post": (post_images, post_features)}

    # ------------------------------------------------------------ the optimisation

    def _optimise(self, scaled_pre, scaled_post, teachers):
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
        best_step = {s: None for s in masks}
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
                losses[s] = loss_fn(self._features(parameters, images[index]).float(), targets[index])
            total = sum(losses.values())
            for s in trained:
                optimisers[s].zero_grad(set_to_none=True)
            total.backward()
            del parameters
            values = {s: float(v.detach()) for s, v in losses.items()}
            for s, v in values.items():
                curves[s].append(v)
            # the loss was measured at the masks before this update: record those if they are the best
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

    def _batch_order(self, which: str, size: int):
        """Endless seeded batches of indices into a pool: shuffled epochs, each image once per epoch."""
        assert self.context is not None
        generator = torch.Generator().manual_seed(
            self.context.seed * 1_000_003 + self.step_count * 2 + (which == "post")
        )
        batch = min(self.config["batch_size"], size)
        while True:
            order = torch.randperm(size, generator=generator)
            for start in range(0, size - batch + 1, batch):
                yield order[start : start + batch]

    # ------------------------------------------------------------ heads

    def _tune_head(self, task: str) -> dict[str, Any]:
        """Fine-tune ``task``'s head with cross-entropy on the merged encoder (frozen)."""
        assert self.context is not None
        started = time.perf_counter()
        data = self.context.images(task, "train")
        size = len(data.labels)
        if size == 0:
            raise MergingError(f"otmf head tuning: task {task} has no labelled train images")
        generator = torch.Generator().manual_seed(self.context.seed * 1_000_003 + self.step_count * 2 + 7)
        chosen = torch.randperm(size, generator=generator)[: max(1, math.ceil(self.config["head_fraction"] * size))]
        features = F.normalize(
            self._teacher_features({k: self.merged[k] for k in self.merge_keys}, data.images[chosen]), dim=-1
        )
        labels = data.labels[chosen].to(self.device)
        head = self.context.head(task).to(self.device, torch.float32).clone().requires_grad_(True)
        optimiser = torch.optim.Adam([head], lr=self.config["head_lr"])
        scale = self.context.logit_scale
        losses = []
        batch = min(16, len(chosen))
        order = torch.randperm(len(chosen), generator=generator)
        position = 0
        for _ in range(self.config["head_steps"]):
            if position + batch > len(chosen):
                order, position = torch.randperm(len(chosen), generator=generator), 0
            index = order[position : position + batch]
            position += batch
            loss = F.cross_entropy(scale * features[index] @ head.T, labels[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        self._heads[task] = head.detach()
        return {
            "task": task,
            "images": len(chosen),
            "loss": losses,
            "seconds": time.perf_counter() - started,
        }
