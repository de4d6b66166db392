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

Speed: a mask update touches every parameter several times (build θ(M), back-propagate to the
mask, Adam, keep-best), and on a GPU one kernel launch per parameter and operation made the
update launch-bound. So θ0, the merged model, both deltas, both masks and everything derived
from them are single flat buffers (:class:`_FlatLayout`, parameter order, views per
parameter): θ(M) is four elementwise kernels over the whole encoder (a mul and an add per
mask, the per-parameter formulation's rounding: ``addcmul`` would round once less and
change the result), its per-parameter views go to ``functional_call``, the masks' gradients
come back through one split, Adam is one step over a flat mask (fused on CUDA), keep-best is
one copy, and small image pools stay on the device. On the CPU the merged weights are those
of the per-parameter formulation bit for bit (``_otmf_reference``; tests/test_otmf.py).
``torch.compile`` could fuse θ(M)'s four kernels into one pass: a pass over the encoder is a
small share of an update (the encoder's forward and backward, the OT solve), and a compiler in
the hot path would have to degrade gracefully everywhere, so it is not used.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
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
_POOL_ON_DEVICE_BYTES = 1 << 30  # image pools up to this size are copied to the GPU once per step
_FUSED_ADAM_DEVICES = ("cuda",)  # device types whose mask updates use torch's fused Adam (see _adam)
_QUANTILE_LIMIT = 1 << 24  # torch.quantile's input limit; larger mask sets are subsampled evenly
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


_SUMMARY_CHUNK = 1 << 22  # entries summed at a time in float64: bounded scratch, few kernels


def mask_summary(masks: dict[str, Tensor] | Tensor) -> dict[str, Any]:
    """Mean, std, quantiles and the shares below 0.5 and above 1.5 of all entries of a mask set.

    ``masks`` is one flat tensor (what OTMF holds) or a mapping of tensors (a mask per
    parameter). Sums run in float64 over chunks, so a mask of the whole encoder needs no
    float64 copy of itself.
    """
    flat = (
        masks.detach().flatten()
        if isinstance(masks, Tensor)
        else torch.cat([m.detach().flatten() for m in masks.values()])
    )
    count = flat.numel()
    chunks = flat.split(_SUMMARY_CHUNK)
    mean = float(sum(c.sum(dtype=torch.float64) for c in chunks)) / count
    squares = float(sum((c.double() - mean).square().sum() for c in chunks))
    below = int(sum((c < 0.5).sum() for c in chunks))
    above = int(sum((c > 1.5).sum() for c in chunks))
    if flat.numel() > _QUANTILE_LIMIT:
        flat = flat[:: math.ceil(flat.numel() / _QUANTILE_LIMIT)]
    values = torch.quantile(flat.float().cpu(), torch.tensor(QUANTILES))
    return {
        "mean": mean,
        "std": math.sqrt(squares / count),
        "quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, values, strict=True)},
        "below_0.5": below / count,
        "above_1.5": above / count,
        "entries": count,
    }


class _FlatLayout:
    """Where each parameter lives in a flat float32 buffer of the encoder (parameter order).

    Everything OTMF touches once per mask update is held flat, so one kernel covers the whole
    encoder; :meth:`views` hands ``functional_call`` the per-parameter views it needs.
    """

    def __init__(self, keys: list[str], shapes: list[torch.Size]):
        self.keys = list(keys)
        self.shapes = list(shapes)
        self.sizes = [math.prod(shape) for shape in shapes]
        self.total = sum(self.sizes)

    @classmethod
    def of(cls, state: Mapping[str, Tensor], keys: list[str] | None = None) -> _FlatLayout:
        keys = list(state) if keys is None else keys
        return cls(keys, [state[k].shape for k in keys])

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """Per-parameter views of ``flat`` (they share its storage, and its autograd graph)."""
        return {
            k: part.view(shape) for k, part, shape in zip(self.keys, flat.split(self.sizes), self.shapes, strict=True)
        }

    def flatten(self, state: Mapping[str, Tensor], device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
        """A new flat float32 copy of ``state``'s parameters, and its per-parameter views."""
        flat = torch.empty(self.total, dtype=torch.float32, device=device)
        views = self.views(flat)
        for k, view in views.items():
            view.copy_(state[k])
        return flat, views


def _adam(mask: Tensor, lr: float) -> torch.optim.Adam:
    """Adam over one flat mask: elementwise, so exactly an optimiser per parameter.

    On the devices in :data:`_FUSED_ADAM_DEVICES` (CUDA) torch's fused kernel updates the mask
    and both moments in one pass instead of seven; elsewhere torch's default (on the CPU the
    plain loop, whose rounding is the per-parameter formulation's bit for bit; its seven passes
    cost little beside the encoder's forward and backward there). Adam divides by √v, so a
    rounding difference in a gradient that is itself mostly rounding can move a mask entry by
    up to the learning rate: keeping the CPU arithmetic identical keeps CPU runs reproducible.
    """
    if mask.device.type in _FUSED_ADAM_DEVICES:
        try:
            return torch.optim.Adam([mask], lr=lr, fused=True)
        except RuntimeError:  # a torch without the fused kernel for this device
            pass
    return torch.optim.Adam([mask], lr=lr)


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
        # θ0 lives in one flat buffer (self.pretrained holds its views), and so does the merged
        # model from step 1 on: the mask updates then read them without a copy
        self._layout = _FlatLayout.of(self.pretrained)
        self._flat_pretrained, self.pretrained = self._layout.flatten(self.pretrained, self.device)
        self._flat_merged: Tensor | None = None

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
            self._flat_merged, self.merged = self._layout.flatten(self.pretrained, self.device)
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

    def _flat(self, flat: Tensor | None, state: dict[str, Tensor], layout: _FlatLayout) -> Tensor:
        """``state`` over the merged parameters as one flat tensor: a view of ``flat`` when the
        merged parameters are all of them (the usual case), else a copy."""
        if flat is not None and layout.keys == self._layout.keys:
            return flat
        return layout.flatten(state, self.device)[0]

    def _fuse(self, incoming: Incoming, task: str) -> dict[str, Any]:
        alpha = self.config["alpha"]
        layout = _FlatLayout.of(self.pretrained, self.merge_keys)
        p0 = self._flat(self._flat_pretrained, self.pretrained, layout)
        # scaled deltas: α Δ_pre and (1 − α) Δ_post, so θ(M) = θ0 + M_pre ⊙ a + M_post ⊙ b
        scaled_pre = torch.sub(self._flat(self._flat_merged, self.merged, layout), p0).mul_(alpha)
        scaled_post = torch.empty_like(p0)
        for k, view in layout.views(scaled_post).items():  # the checkpoint arrives one parameter at a time
            torch.sub(incoming[k], self.pretrained[k], out=view)
        scaled_post.mul_(1.0 - alpha)
        diagnostics: dict[str, Any] = {"alpha": alpha, "pre_task": self.previous_task, "post_task": task}
        if self.config["masks"] == "on" and self.config["steps"] > 0:
            started = time.perf_counter()
            teachers = self._teachers(incoming, task)
            diagnostics["teacher_seconds"] = time.perf_counter() - started
            started = time.perf_counter()
            masks, optimisation = self._optimise(layout, p0, {"pre": scaled_pre, "post": scaled_post}, teachers)
            diagnostics["optimisation_seconds"] = time.perf_counter() - started
            diagnostics.update(optimisation)
            diagnostics["masks"] = {name: mask_summary(m) for name, m in masks.items()}
        else:
            masks = None
        whole = layout.keys == self._layout.keys and self._flat_merged is not None
        # the deltas are copies by now, so the merged buffer itself can take θ(M*)
        merged = self._flat_merged if whole else torch.empty_like(p0)
        with torch.no_grad():
            if masks is None:
                torch.add(p0, scaled_pre, out=merged).add_(scaled_post)
            else:
                torch.mul(masks["pre"], scaled_pre, out=merged).add_(p0).add_(masks["post"] * scaled_post)
            if not whole:
                for k, view in layout.views(merged).items():
                    self.merged[k].copy_(view)
        return diagnostics

    # ------------------------------------------------------------ data and features

    def _pool(self, task: str) -> Tensor:
        assert self.context is not None
        images = self.context.images(task, self.config["ot_split"]).images
        if images.shape[0] == 0:
            raise MergingError(f"otmf: task {task} has no images in its {self.config['ot_split']} split")
        return images

    def _on_device(self, images: Tensor) -> Tensor:
        """The pool on the merger's device when it is small enough, so that a mask update's batch
        is an index into device memory rather than a host-to-device copy; else as it is."""
        if images.device == self.device or images.numel() * images.element_size() > _POOL_ON_DEVICE_BYTES:
            return images
        return images.to(self.device)

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
        pre_images, post_images = self._on_device(self._pool(self.previous_task)), self._on_device(self._pool(task))
        # the pre teacher θ0 + Δ_pre is the current merged model itself; the post teacher is θ_t
        pre_features = self._teacher_features({k: self.merged[k] for k in self.merge_keys}, pre_images)
        post_features = self._teacher_features({k: incoming[k] for k in self.merge_keys}, post_images)
        return {"pre": (pre_images, pre_features), "post": (post_images, post_features)}

    # ------------------------------------------------------------ the optimisation

    def _optimise(
        self,
        layout: _FlatLayout,
        pretrained: Tensor,
        scaled: dict[str, Tensor],
        teachers: dict[str, tuple[Tensor, Tensor]],
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Train both flat masks; return the chosen ones (flat, in ``layout``) and the curves.

        Per update: θ(M) in four elementwise passes, its views through the encoder, the OT loss,
        one backward (the masks' gradients arrive flat), one Adam step per trained set.
        """
        steps = self.config["steps"]
        loss_fn = ot_loss(self.config["ot"], self.config["blur"])
        masks = {s: torch.ones_like(scaled[s], requires_grad=True) for s in ("pre", "post")}
        optimisers = {s: _adam(masks[s], self.config["lr"]) for s in masks}
        batches = {s: self._batch_order(s, len(teachers[s][0]), teachers[s][0].device) for s in masks}
        keep_best = self.config["keep"] == "best"
        best = {s: m.detach().clone() for s, m in masks.items()} if keep_best else None
        best_loss = {s: math.inf for s in masks}
        best_step = {s: None for s in masks}
        curves: dict[str, list[float]] = {"pre": [], "post": []}
        joint = self.config["schedule"] == "joint"
        for step in range(steps):
            trained = ("pre", "post") if joint else (("pre",) if step % 2 == 0 else ("post",))
            pre, post = (masks[s] if s in trained else masks[s].detach() for s in ("pre", "post"))
            # θ0 + M_pre ⊙ a + M_post ⊙ b, rounded as the per-parameter sum was (mul, then add)
            theta = torch.mul(pre, scaled["pre"]).add_(pretrained).add_(torch.mul(post, scaled["post"]))
            parameters = layout.views(theta)
            losses = {}
            for s in trained:
                images, targets = teachers[s]
                index = next(batches[s])
                losses[s] = loss_fn(self._features(parameters, images[index]).float(), targets[index])
            total = sum(losses.values())
            total.backward()
            del parameters, theta, total
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
                                best[name].copy_(masks[name])
            for s in trained:
                optimisers[s].step()
                masks[s].grad = None  # a full-size buffer: free it until the set trains again
        final = best if best is not None else {s: m.detach() for s, m in masks.items()}
        return final, {
            "loss_pre": curves["pre"],
            "loss_post": curves["post"],
            "best_step": best_step,
            "best_loss": {s: (None if math.isinf(v) else v) for s, v in best_loss.items()},
            "schedule": self.config["schedule"],
            "keep": self.config["keep"],
        }

    def _batch_order(self, which: str, size: int, device: torch.device | None = None) -> Iterator[Tensor]:
        """Endless seeded batches of indices into a pool: shuffled epochs, each image once per epoch.

        The shuffle is drawn on the CPU (the seeded generator); with ``device`` each epoch's order
        is copied there once, so a mask update indexes a pool on the GPU without a copy of its own.
        """
        assert self.context is not None
        generator = torch.Generator().manual_seed(
            self.context.seed * 1_000_003 + self.step_count * 2 + (which == "post")
        )
        batch = min(self.config["batch_size"], size)
        while True:
            order = torch.randperm(size, generator=generator)
            if device is not None:
                order = order.to(device)
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
