"""MINGLE: test-time continual merging with null-space gated low-rank experts (arXiv 2505.11883).

Follows the authors' code, ``zihuanqiu/MINGLE`` at 928ed62 (``fusion_bench/method/mingle/mingle.py``,
``fusion_bench/models/lora_moe.py``, ``config/method/mingle/mingle.yaml``); docs/methods/mingle.md
gives every constant with its line. Step t, for the fine-tuned θ_t of task t:

1. Experts. At every adapted linear layer (q, k, v, attention output, fc1, fc2 of each block)
   τ = W_t − W_0. From t ≥ 2, with Σ = Σ_{e<t} B_e A_e = U S Vᵀ and k_eff = ⌊exp(H(S/ΣS))⌋
   (the entropy effective rank), τ ← τ − U_k U_kᵀ τ V_k V_kᵀ (the top-left k_eff × k_eff block of
   Uᵀ τ V is zeroed). The expert is τ's rank-r truncated SVD: B = U_r, A = S_r V_rᵀ (r = 64).
2. Gate. A new linear gate row per layer, w ~ N(0, 0.01²), b = 0; coefficient g = w · mean_n x_n + b
   (no softmax); old rows are frozen. The layer computes x (W0 + Σ_e g_e B_e A_e)ᵀ + b0.
3. Test-time adaptation. 5 unlabelled images per class of task t's test sample (the labels
   only stratify the draw, as the code's select_seed_subset does), 50 Adam steps (lr 1e-4,
   batch 16) on the new gate rows, loss KD(T = 2) against θ_t's zero-shot logits. Each gate
   weight gradient is projected against the stored input subspace U of its layer with the
   adaptive relaxation: r = mean_rows |g U| / ‖g‖, h ← β h + (1 − β) r (h = 0 at each task's
   start), λ = exp(−γ h), g ← g − (g U diag λ) Uᵀ.
4. Subspace. The input covariance of each adapted layer on the seed images (through the adapted
   model) gives its top-k (k = 3) eigenvectors, appended to U and orthonormalised by QR.

Every other parameter (biases, LayerNorms, embeddings, projection) stays θ0, as in the code.

The merged model is not a plain encoder: :meth:`MINGLE.merged_model` returns a
:class:`MingleEncoder` the runner evaluates; ``StepResult.merged`` (what the analysis tools and
a plain-encoder download see) is θ0 + Σ_e Δ_e, every expert at unit weight: the code's own
``previous_merged_tv`` view. Memory grows by each task's experts, gates and subspace columns
(:meth:`MINGLE.per_task_bytes` bounds it, the ``state_bytes`` diagnostics measure it).
"""

from __future__ import annotations

import time
import zlib
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from merging.errors import CheckpointError, MergingError
from merging.methods._mingle_model import (
    INPUT_OF,
    LAYER_SETS,
    MingleEncoder,
    SiteExperts,
    TowerConfig,
    save,
    site_tensors,
    weight_key,
)
from merging.methods.base import ContinualMerger, Diagnostic, Incoming, Option, StepInput

if TYPE_CHECKING:
    from pathlib import Path

    from plotly.graph_objects import Figure

    from merging.experiment.results import MethodResults

GATE_INIT_STD = 0.01  # lora_moe.py Depth_1_Gate.init_weight: nn.init.normal_(weight, std=0.01)
GATE_INIT_BIAS = 0.0  # mingle.py: LoRAMoE(..., init_lambda=0) / add_expert(..., init_lambda=0)
PROJECTION_EPS = 1e-12  # lora_moe.py project_gradient: grad.norm(dim=1) + 1e-12
_TEACHER_BATCH = 64
_GATE_REPORT_IMAGES = 64  # seed images per task used for the gate-activation diagnostic


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """mingle.py _KD_loss: −Σ softmax(t/T) · log_softmax(s/T), summed over classes, mean over the batch."""
    return -(F.softmax(teacher / temperature, dim=1) * F.log_softmax(student / temperature, dim=1)).sum() / len(student)


def entropy_rank(singular_values: Tensor) -> int:
    """⌊exp(H(s / Σs))⌋, the code's effective rank (zero singular values contribute 0·log 0 = 0)."""
    total = singular_values.sum()
    if total <= 0:
        return 0
    p = singular_values / total
    entropy = -torch.special.xlogy(p, p).sum()
    return int(torch.exp(entropy))


def project_expert(tau: Tensor, previous: Tensor, mode: str) -> tuple[Tensor, int]:
    """τ with the top-k_eff block (in Σ's singular bases) removed, and k_eff (mingle.py construct_lora)."""
    U, S, Vh = torch.linalg.svd(previous, full_matrices=False)
    k = min(entropy_rank(S), S.numel())
    rotated = U.T @ tau @ Vh.T  # (m, m): the first m rows/columns of the code's full rotation
    mask = torch.zeros_like(rotated)
    mask[:k, :k] = 1.0
    if mode == "block_diag":  # what `projected_task_tv.diag().fill_(0)` reads as (it fills a copy)
        mask.diagonal().fill_(1.0)
    return tau - U @ (rotated * mask) @ Vh, k


def project_gradient(grad: Tensor, basis: Tensor, h: Tensor | None, gamma: float, beta: float) -> tuple[Tensor, Tensor]:
    """lora_moe.py project_gradient: the soft projection of a gate gradient (rows × in) against ``basis`` (in × K).

    r = mean over rows of |g U| / (‖g‖ + 1e-12); h ← β h + (1 − β) r (h = 0 before the first
    update of a task); λ = exp(−γ h); g − (g U diag λ) Uᵀ. Returns the projected gradient and h.
    """
    along = grad @ basis
    r = (along.abs() / (grad.norm(dim=1, keepdim=True) + PROJECTION_EPS)).mean(dim=0)
    h = (1 - beta) * r if h is None else beta * h + (1 - beta) * r
    lam = torch.exp(-gamma * h)
    return grad - (along * lam) @ basis.T, h


def low_rank(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """B = U_r, A = diag(S_r) V_rᵀ (mingle.py LoRA.set_delta), and the share of ‖delta‖² kept."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    total = float(S.square().sum())
    kept = float(S[:rank].square().sum()) / total if total > 0 else 1.0
    return U[:, :rank].contiguous(), (S[:rank, None] * Vh[:rank]).contiguous(), kept


class MINGLE(ContinualMerger):
    name: ClassVar[str] = "mingle"
    title: ClassVar[str] = "MINGLE (null-space gated low-rank experts)"
    summary: ClassVar[str] = (
        "Adds a rank-64 expert per task at every attention and MLP layer and a gate trained at test time to "
        "match the fine-tuned model's predictions, with gate updates kept out of earlier tasks' input subspaces. "
        "Data: 5 unlabelled test images per class of each task (drawn from the run's test sample of that task), "
        "when the task is merged; no train images."
    )
    requires_data: ClassVar[bool] = True
    uses_matrices: ClassVar[bool] = True
    explanation: ClassVar[str] = (
        r"Each task adds, at every attention and MLP layer, a low-rank expert $\Delta_t = B_t A_t$ (rank 64) from "
        r"its task vector with the directions of earlier experts removed, and a gate "
        r"$g_t(x) = w_t^\top \bar x + b_t$ on the layer's mean input; the layer computes "
        r"$x\,(W_0 + \sum_e g_e \Delta_e)^\top$. Only the new gate is trained, on 5 unlabelled test images per "
        r"class, to match the fine-tuned model's predictions, with its gradient projected out of the earlier "
        r"tasks' input subspaces (softened by an adaptive relaxation). The merged model is $\theta_0$ plus the "
        r"routed experts, not a plain encoder: its download is `merged-mingle.model.safetensors` (experts, gates, "
        r"subspaces, $\theta_0$ and a config), while the analysis (cosines, spectra) and "
        r"`merged-mingle.safetensors` show the encoder $\theta_0 + \sum_e \Delta_e$ with every expert at unit "
        r"weight, the authors' own accumulated update."
    )
    published_name: ClassVar[str | None] = "mingle"
    diagnostics: ClassVar[tuple[Diagnostic, ...]] = (
        Diagnostic("task", str, "the task of the incoming checkpoint"),
        Diagnostic("data", str, "which images the step used"),
        Diagnostic("seed_images", int, "unlabelled test images the gates were trained on"),
        Diagnostic("experts", int, "experts per adapted layer after the step"),
        Diagnostic("adapted_layers", int, "linear layers carrying experts"),
        Diagnostic("kd_loss", list, "the distillation loss per gate update"),
        Diagnostic("projected_share", float, "share of ‖τ‖² removed by the projection away from earlier experts"),
        Diagnostic("rank_kept_share", float, "share of the projected ‖τ‖² kept by the rank-r truncation"),
        Diagnostic("effective_rank", float, "mean entropy effective rank of earlier experts' sum", optional=True),
        Diagnostic("relaxation", dict, "λ = exp(−γh) at the last update: mean and min over layers", optional=True),
        Diagnostic("subspace_dim", float, "mean columns of the stored input subspaces after the step"),
        Diagnostic(
            "gate_activations",
            dict,
            "per seen task: each expert's mean gate coefficient on that task's seed images (mean over layers)",
        ),
        Diagnostic("state_bytes", int, "bytes of experts, gates and subspaces held after the step"),
        Diagnostic("added_bytes", int, "bytes this step added to them"),
        Diagnostic("seconds", dict, "time of each phase: experts, teacher, gates, subspace, report"),
    )
    figure_title: ClassVar[str | None] = "MINGLE: gate activations per task, distillation loss, memory"
    options: ClassVar[tuple[Option, ...]] = (
        Option(
            "layers",
            "attn_mlp",
            "layers with experts: attention and MLP (config lora_layer [attn, mlp]) or attention and fc1 (MINGLE*)",
            choices=tuple(LAYER_SETS),
        ),
        Option("rank", 64, "rank r of each expert (lora_r)", minimum=1),
        Option("steps", 50, "gate updates per task (max_steps)", minimum=0),
        Option("lr", 1e-4, "Adam learning rate of the gates", minimum=0.0, exclusive_minimum=True),
        Option("batch_size", 16, "seed images per update", minimum=1),
        Option("seed_per_class", 5, "unlabelled test images per class (seed_sample_number)", minimum=1),
        Option("temperature", 2.0, "distillation temperature T", minimum=0.0, exclusive_minimum=True),
        Option("constraint", True, "project gate gradients out of earlier tasks' input subspaces (constraint_gate)"),
        Option("subspace_k", 3, "input directions stored per layer and task", minimum=1),
        Option("gamma", 1.0, "relaxation strength γ in λ = exp(−γh) (0: hard null-space projection)", minimum=0.0),
        Option("beta", 0.99, "EMA rate β of the interference signal h", minimum=0.0, maximum=1.0),
        Option(
            "routing",
            "batch",
            "batch: one coefficient per batch (batch_reduce: true); sample: per image",
            choices=("batch", "sample"),
        ),
        Option("eval_batch", 128, "images per batch whose coefficients are averaged with routing=batch", minimum=1),
        Option(
            "expert_projection",
            "block",
            "block: remove the top k_eff block (the code as it runs); block_diag: also the diagonal "
            "(what its no-op diag().fill_(0) line reads as); none: no projection",
            choices=("block", "block_diag", "none"),
        ),
    )

    # ------------------------------------------------------------ set-up

    def start(self, pretrained, device="cpu", family=None) -> None:
        super().start(pretrained, device, family)
        assert self.family is not None  # uses_matrices: start() found the family or raised
        if self.family.name != "clip_vit":
            raise CheckpointError(
                f"mingle merges CLIP ViT image encoders only; the pretrained encoder is a {self.family.name} model"
            )
        self.experts: dict[str, SiteExperts] = {}
        self.subspaces: dict[str, Tensor] = {}
        self.tasks: list[str] = []
        self.tower: TowerConfig | None = None
        self._model: MingleEncoder | None = None

    def merged_model(self) -> MingleEncoder | None:
        return self._model

    def _sites(self) -> list[tuple[int, str]]:
        layers = 1 + max(int(k.split(".")[2]) for k in self.pretrained if k.startswith("transformer.resblocks."))
        return [(layer, site) for layer in range(layers) for site in LAYER_SETS[self.config["layers"]]]

    def per_task_bytes(self) -> int:
        """Bytes one task adds at most: per adapted layer A, B, a gate row and bias; per input, k subspace columns."""
        total, inputs = 0, set()
        for layer, site in self._sites():
            weight, _ = site_tensors(self.pretrained, layer, site)
            out, width = weight.shape
            rank = min(self.config["rank"], out, width)
            total += rank * (out + width) + width + 1
            if (layer, INPUT_OF[site]) not in inputs:
                inputs.add((layer, INPUT_OF[site]))
                total += width * min(self.config["subspace_k"], width)
        return 4 * total

    def state_bytes(self) -> int:
        tensors = [t for e in self.experts.values() for t in e.tensors()] + list(self.subspaces.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------ one step

    def _merge(self, step: StepInput) -> dict[str, Any]:
        assert step.context is not None and step.task is not None  # checked by step()
        if self.tower is None:
            self.tower = TowerConfig.from_module(step.context.encoder, "the backbone's image tower")
        missing = [
            k for k, _, _ in (weight_key(layer, site) for layer, site in self._sites()) if k not in self.merge_keys
        ]
        if missing:
            raise CheckpointError(f"{step.checkpoint.name} has no {missing[0]}, which MINGLE builds an expert from")
        before = self.state_bytes()
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        diagnostics: dict[str, Any] = {"task": step.task}
        diagnostics.update(self._add_experts(step.checkpoint, step.index))
        if self._model is None:
            self._model = MingleEncoder(
                self.pretrained, self.tower, self.experts, self.config["routing"], self.config["eval_batch"]
            )
        seconds["experts"] = time.perf_counter() - started

        started = time.perf_counter()
        images, per_class = self._seed_images(step.task)
        teacher = self._teacher_logits(step.checkpoint, images, step.task)
        seconds["teacher"] = time.perf_counter() - started

        started = time.perf_counter()
        curve, relaxation = self._train_gates(images, teacher, step.task, step.index)
        seconds["gates"] = time.perf_counter() - started

        started = time.perf_counter()
        self._update_subspaces(images, step.index)
        seconds["subspace"] = time.perf_counter() - started
        self.tasks.append(step.task)

        started = time.perf_counter()
        diagnostics["gate_activations"] = self._gate_activations()
        seconds["report"] = time.perf_counter() - started
        diagnostics.update(
            data=(
                f"{len(images)} unlabelled images of task {step.task}'s test sample ({per_class} per class, "
                "labels used only to stratify the draw), when it was merged; no train images"
            ),
            seed_images=len(images),
            experts=step.index,
            adapted_layers=len(self.experts),
            kd_loss=curve,
            relaxation=relaxation,
            subspace_dim=sum(u.shape[1] for u in self.subspaces.values()) / max(1, len(self.subspaces)),
            state_bytes=self.state_bytes(),
            added_bytes=self.state_bytes() - before,
            seconds=seconds,
        )
        return diagnostics

    # ------------------------------------------------------------ 1. experts

    @torch.no_grad()
    def _add_experts(self, incoming: Incoming, index: int) -> dict[str, Any]:
        removed = total = kept_energy = projected_energy = 0.0
        ranks: list[int] = []
        generator = torch.Generator().manual_seed(self._seed(index, "gates"))
        loaded: dict[str, Tensor] = {}
        for layer, site in self._sites():
            key, bias_key, _ = weight_key(layer, site)
            if key not in loaded:
                loaded = {key: incoming[key], bias_key: self.pretrained[bias_key]}  # one parameter at a time
            fine = site_tensors(loaded, layer, site)[0]
            pre = site_tensors(self.pretrained, layer, site)[0]
            tau = fine - pre
            label = f"{layer}.{site}"
            experts = self.experts.get(label)
            projected = tau
            if experts is not None and self.config["expert_projection"] != "none":
                projected, k = project_expert(tau, experts.delta_sum(), self.config["expert_projection"])
                ranks.append(k)
            total += float(tau.square().sum())
            removed += float((tau - projected).square().sum())
            B, A, kept = low_rank(projected, min(self.config["rank"], *tau.shape))
            energy = float(projected.square().sum())
            projected_energy += energy
            kept_energy += kept * energy
            gate_weight = torch.randn(tau.shape[1], generator=generator).to(self.device) * GATE_INIT_STD
            gate_bias = torch.tensor(GATE_INIT_BIAS, device=self.device)
            if experts is None:
                self.experts[label] = SiteExperts.first(A, B, gate_weight, gate_bias)
            else:
                experts.append(A, B, gate_weight, gate_bias)
            merged = site_tensors(self.merged, layer, site)[0]
            merged += B @ A  # the analysis view θ0 + Σ_e Δ_e
        return {
            "projected_share": removed / total if total > 0 else 0.0,
            "rank_kept_share": kept_energy / projected_energy if projected_energy > 0 else 1.0,
            "effective_rank": sum(ranks) / len(ranks) if ranks else None,
        }

    # ------------------------------------------------------------ 2. data and teacher

    def _seed(self, index: int, purpose: str, task: str = "") -> int:
        assert self.context is not None
        return (self.context.seed * 1_000_003 + index * 101 + zlib.crc32(f"{purpose}|{task}".encode())) % (2**63)

    def _seed_indices(self, task: str) -> tuple[Tensor, int]:
        """seed_per_class random images of each class (all of a class that has fewer), as select_seed_subset."""
        assert self.context is not None
        labels = self.context.images(task, "test").labels
        if len(labels) == 0:
            raise MergingError(f"mingle: task {task} has no images in its test split")
        generator = torch.Generator().manual_seed(self._seed(0, "seed", task))
        n = self.config["seed_per_class"]
        chosen = []
        for label in torch.unique(labels):
            members = torch.nonzero(labels == label).flatten()
            chosen.append(members[torch.randperm(len(members), generator=generator)[:n]])
        return torch.sort(torch.cat(chosen)).values, n

    def _seed_images(self, task: str) -> tuple[Tensor, int]:
        assert self.context is not None
        indices, per_class = self._seed_indices(task)
        images = self.context.images(task, "test").images[indices]
        return self.context.prepare(images).float(), per_class

    @torch.no_grad()
    def _teacher_logits(self, incoming: Incoming, images: Tensor, task: str) -> Tensor:
        """θ_t's zero-shot logits on the seed images (fixed during the step, so computed once)."""
        assert self.context is not None
        parameters = {k: incoming[k] for k in self.merge_keys}
        features = torch.cat(
            [
                functional_call(self.context.encoder, parameters, (images[i : i + _TEACHER_BATCH],))
                for i in range(0, len(images), _TEACHER_BATCH)
            ]
        )
        return self._logits(features.float(), task)

    def _logits(self, features: Tensor, task: str) -> Tensor:
        assert self.context is not None
        head = self.context.head(task).to(features.device, torch.float32)
        return self.context.logit_scale * F.normalize(features, dim=-1) @ head.T

    def _batches(self, size: int, seed: int):
        """Endless shuffled epochs in batches of batch_size, the last one of an epoch smaller (drop_last False)."""
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield from torch.randperm(size, generator=generator).split(self.config["batch_size"])

    # ------------------------------------------------------------ 3. gates

    def _train_gates(self, images: Tensor, teacher: Tensor, task: str, index: int):
        assert self._model is not None
        model = self._model
        trainable = {
            label: (
                e.gate_weight[-1].clone().requires_grad_(True),
                e.gate_bias[-1].clone().requires_grad_(True),
            )
            for label, e in self.experts.items()
        }
        optimiser = torch.optim.Adam([t for pair in trainable.values() for t in pair], lr=self.config["lr"])
        constrain = self.config["constraint"] and bool(self.subspaces)
        h = {label: None for label in trainable}
        gamma, beta = self.config["gamma"], self.config["beta"]
        curve: list[float] = []
        lam_last: dict[str, Tensor] = {}
        batches = self._batches(len(images), self._seed(index, "batches", task))
        model.trainable = trainable
        try:
            for _ in range(self.config["steps"]):
                chosen = next(batches)
                loss = kd_loss(self._logits(model(images[chosen]), task), teacher[chosen], self.config["temperature"])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                if constrain:
                    for label, (weight, _) in trainable.items():
                        basis = self.subspaces.get(self._input_label(label))
                        if basis is None or weight.grad is None:
                            continue
                        projected, h[label] = project_gradient(weight.grad[None], basis, h[label], gamma, beta)
                        weight.grad.copy_(projected[0])  # the code's trainable_fc.weight gradient, (1, in)
                        lam = torch.exp(-gamma * h[label])
                        lam_last[label] = lam
                optimiser.step()
                curve.append(float(loss.detach()))
        finally:
            model.trainable = None
        with torch.no_grad():
            for label, (weight, bias) in trainable.items():
                self.experts[label].gate_weight[-1] = weight.detach()
                self.experts[label].gate_bias[-1] = bias.detach()
        relaxation = None
        if lam_last:
            values = torch.cat([v.flatten() for v in lam_last.values()])
            relaxation = {"mean": float(values.mean()), "min": float(values.min())}
        return curve, relaxation

    @staticmethod
    def _input_label(label: str) -> str:
        layer, site = label.split(".")
        return f"{layer}.{INPUT_OF[site]}"

    # ------------------------------------------------------------ 4. subspaces

    @torch.no_grad()
    def _update_subspaces(self, images: Tensor, index: int) -> None:
        """Top-k eigenvectors of each adapted input's uncentred covariance on the seed images, appended and QR'd."""
        assert self._model is not None
        covariance: dict[str, Tensor] = {}

        def observe(label: str, x: Tensor, coefficients: Tensor) -> None:
            key = self._input_label(label)
            if label.split(".")[1] in ("k", "v"):
                return  # q, k and v read the same input: count it once
            flat = x.reshape(-1, x.shape[-1]).float()
            covariance[key] = covariance.get(key, 0) + flat.T @ flat

        generator = torch.Generator().manual_seed(self._seed(index, "subspace"))
        self._model.observer = observe
        try:  # one shuffled pass in batches, as the code's loader
            for chosen in torch.randperm(len(images), generator=generator).split(self.config["batch_size"]):
                self._model(images[chosen])
        finally:
            self._model.observer = None
        k = self.config["subspace_k"]
        for key, sigma in covariance.items():
            _, vectors = torch.linalg.eigh(sigma)
            top = vectors[:, -k:].flip(1)
            old = self.subspaces.get(key)
            self.subspaces[key] = top.contiguous() if old is None else torch.linalg.qr(torch.cat([old, top], 1))[0]

    # ------------------------------------------------------------ reporting

    @torch.no_grad()
    def _gate_activations(self) -> dict[str, list[float]]:
        """Per seen task: each expert's mean coefficient on (up to 64 of) its seed images, over every adapted layer."""
        assert self._model is not None and self.context is not None
        report = {}
        for task in self.tasks:
            indices, _ = self._seed_indices(task)
            images = self.context.prepare(self.context.images(task, "test").images[indices[:_GATE_REPORT_IMAGES]])
            sums: list[Tensor] = []
            self._model.observer = lambda label, x, coefficients, sums=sums: sums.append(coefficients.mean(dim=0))
            try:
                self._model(images.float())
            finally:
                self._model.observer = None
            report[task] = [float(v) for v in torch.stack(sums).mean(dim=0)]
        return report

    @classmethod
    def live_figure(cls, results: MethodResults) -> Figure | None:
        """Gate coefficients per task and expert (latest step), distillation loss per step, memory per step."""
        if not results.steps:
            return None
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        from merging.ui.plots import colour, styled

        figure = make_subplots(
            rows=1,
            cols=3,
            subplot_titles=(
                "gate coefficient: task (row) × expert (column)",
                "distillation loss per update",
                "experts, gates, subspaces: MiB",
            ),
        )
        latest = next((s.diagnostics for s in reversed(results.steps) if "gate_activations" in s.diagnostics), None)
        if latest is not None:
            activations = latest["gate_activations"]
            tasks = list(activations)
            figure.add_trace(
                go.Heatmap(
                    z=[activations[t] for t in tasks],
                    x=[f"expert {e + 1}" for e in range(max(len(v) for v in activations.values()))],
                    y=tasks,
                    colorscale="RdBu",
                    zmid=0.0,
                    name="gate coefficient",
                    showscale=False,
                ),
                row=1,
                col=1,
            )
        for index, step in enumerate(results.steps):
            if step.diagnostics.get("kd_loss"):
                figure.add_trace(
                    go.Scatter(
                        y=step.diagnostics["kd_loss"],
                        name=f"step {index + 1}",
                        mode="lines",
                        line=dict(color=colour(index)),
                    ),
                    row=1,
                    col=2,
                )
        points = [(t + 1, s.diagnostics) for t, s in enumerate(results.steps) if "state_bytes" in s.diagnostics]
        x = [t for t, _ in points] or [t + 1 for t in range(len(results.steps))]
        figure.add_trace(
            go.Bar(
                x=x,
                y=[d["added_bytes"] / 2**20 for _, d in points] or [0.0] * len(x),
                name="added bytes",
                marker_color=colour(4),
            ),
            row=1,
            col=3,
        )
        figure.add_trace(
            go.Scatter(
                x=x,
                y=[d["state_bytes"] / 2**20 for _, d in points] or [0.0] * len(x),
                name="held bytes",
                mode="markers+lines",
                line=dict(color=colour(6)),
            ),
            row=1,
            col=3,
        )
        figure.update_xaxes(title_text="update", row=1, col=2)
        figure.update_xaxes(title_text="step", dtick=1, row=1, col=3)
        return styled(figure, "MINGLE internals")

    @classmethod
    def step_summary(cls, diagnostics) -> list[str]:
        parts = []
        if diagnostics.get("kd_loss"):
            parts.append(f"KD {diagnostics['kd_loss'][0]:.3f}→{diagnostics['kd_loss'][-1]:.3f}")
        if "state_bytes" in diagnostics:
            parts.append(
                f"experts {diagnostics['state_bytes'] / 2**20:.1f} MiB (+{diagnostics['added_bytes'] / 2**20:.2f})"
            )
        return parts

    # ------------------------------------------------------------ saving

    def data_splits(self) -> tuple[str, ...]:
        return ("test",)  # seed images come from the test sample; no train images

    def save_model(self, path: str | Path) -> list[Path]:
        return [self.save(path)] if self._model is not None else []

    def save(self, path: str | Path, include_base: bool = True, metadata: dict[str, str] | None = None) -> Path:
        """Write the merged model (experts, gates, subspaces, θ0 unless ``include_base`` is false) as safetensors."""
        if self._model is None:
            raise CheckpointError("nothing to save: no checkpoint has been merged yet")
        extra = {"tasks": list(self.tasks), "options": dict(self.config)}
        return save(self._model, path, self.subspaces, include_base, metadata, extra)
