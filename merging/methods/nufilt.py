"""NUFILT: null-space filtering for data-free continual merging (Qiu et al., ICLR 2026, arXiv 2509.21413).

Per linear weight, with τ = W_t − W0 the new task vector and Δ = W_merged − W0 the
accumulated update, the new task vector is filtered on its input side through the
complement of Δ's top-k right-singular subspace, ``P = I − V_k V_kᵀ``, and corrected by a
low-rank adapter ``B A`` fitted with Adam, from zero, on the authors' projection surrogate:

    L(A, B) = ‖(τ − M) V_τ‖² + ‖(Δ − M) V_k‖²,   M = Δ + τ (P + B A),

where V_τ holds τ's own top right-singular vectors: the merged update should act like τ on
τ's leading input directions (plasticity) and like Δ on Δ's (stability). The weight becomes
``W ← W + τ (P + B A)``. Nothing else is merged: the authors' code leaves every parameter it
does not filter (biases, norms, embeddings, the second MLP layer) at θ0. No data is used.

docs/methods/nufilt.md gives every constant with its source (the authors' FusionBench fork,
``zihuanqiu/NUFILT``) and the options that choose between readings of the rule.

State kept between steps: none beyond θ0 and the merged encoder (Δ is read off them), so
memory does not grow with the number of tasks. The adapter lives for one matrix's fit.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from merging.compute.parallel import map_on_threads
from merging.errors import CheckpointError
from merging.methods.base import ContinualMerger, Diagnostic, Option, StepInput, _name

if TYPE_CHECKING:
    from plotly.graph_objects import Figure

    from merging.experiment.results import MethodResults

# ResidualProjGate's init in fusion_bench/models/filter_lora.py: A ~ N(0, 0.02²), B = 0.
INIT_STD = 0.02


def top_right_singular(matrix: Tensor, k: int, subspace: str = "svd") -> Tensor:
    """The first ``k`` right-singular vectors of ``matrix`` (in × k'), leading first.

    ``svd`` takes the first k columns of the reduced SVD's V whatever their singular values,
    as the authors' code slices it: where the matrix has fewer than k nonzero singular values
    the rest is LAPACK's completion of its null space (for a zero matrix, the first k input
    coordinates). ``nonzero`` keeps only directions with a singular value above the numerical
    rank tolerance (max(m, n)·ε·σ₁, as ``numpy.linalg.matrix_rank``), so a zero matrix has none.
    k' never exceeds min(m, n).
    """
    _, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(k, s.numel())
    if subspace == "nonzero":
        tolerance = max(matrix.shape) * torch.finfo(matrix.dtype).eps * float(s[0]) if s.numel() else 0.0
        k = min(k, int((s > tolerance).sum())) if s.numel() and float(s[0]) > 0 else 0
    return vh[:k].T.contiguous()


@dataclass
class Filtered:
    """One matrix after NUFILT: the increment to its weight and what the filter and the fit did."""

    update: Tensor  # τ (P + B A), to add to the merged weight
    null_rank: int  # k', the protected directions
    task_sq: float  # ‖τ‖²
    removed_sq: float  # ‖τ V_k V_kᵀ‖², what the projector removed
    adapter_sq: float  # ‖τ B A‖², what the adapter added back
    loss_start: float | None  # the surrogate at B = 0 (None when no adapter was fitted)
    loss_end: float | None  # the surrogate after the fit


def surrogate_terms(task: Tensor, merged_delta: Tensor, v_null: Tensor, v_task: Tensor, null_space: bool):
    """``(basis, R)`` such that the surrogate is ``‖R − τ B (A basis)‖²``.

    basis = [V_τ, V_k]; R = [τ V_τ, Δ V_k] − (Δ + τ P) basis, the residual at B = 0. The
    authors' code computes the two terms apart (FilterLoRA.solve_lora, λ1 = λ2 = 1); their sum
    over the concatenated basis is the same number.
    """
    basis = torch.cat([v_task, v_null], dim=1)
    target = torch.cat([task @ v_task, merged_delta @ v_null], dim=1)
    filtered_basis = task @ basis  # τ P basis, P = I − V_k V_kᵀ (or I)
    if null_space and v_null.shape[1]:
        filtered_basis -= (task @ v_null) @ (v_null.T @ basis)
    return basis, target - merged_delta @ basis - filtered_basis


def fit_adapter(
    task: Tensor, basis: Tensor, residual: Tensor, rank: int, steps: int, lr: float, generator: torch.Generator
) -> tuple[Tensor, Tensor, list[float]]:
    """Adam on ``‖R − τ B A basis‖²`` from A ~ N(0, 0.02²), B = 0; returns B, A and the losses.

    ``losses[0]`` is the surrogate before the first step, ``losses[-1]`` after the last. Adam
    keeps per-entry moments, so fitting each matrix alone gives what the authors' joint fit
    of all layers (one optimiser over a summed loss) gives.
    """
    n = task.shape[1]
    a = (INIT_STD * torch.randn(rank, n, generator=generator, dtype=task.dtype)).to(task.device)
    a.requires_grad_(True)
    b = torch.zeros(n, rank, dtype=task.dtype, device=task.device, requires_grad=True)
    optimizer = torch.optim.Adam([a, b], lr=lr)
    losses: list[float] = []
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = (residual - (task @ b) @ (a @ basis)).pow(2).sum()
            losses.append(float(loss.detach()))
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        losses.append(float((residual - (task @ b) @ (a @ basis)).pow(2).sum()))
    return b.detach(), a.detach(), losses


def nufilt_matrix(
    task: Tensor,
    merged_delta: Tensor,
    *,
    null_rank: int,
    grad_rank: int,
    lora_rank: int,
    steps: int,
    lr: float,
    null_space: bool = True,
    subspace: str = "svd",
    fit: bool = True,
    generator: torch.Generator | None = None,
) -> Filtered:
    """NUFILT's increment for one matrix (out × in): ``τ (P + B A)``.

    ``fit`` False (the first step, as in the authors' code) or ``lora_rank``/``steps`` 0 gives
    the closed form ``τ P``. ``null_space`` False keeps P = I but still fits the adapter
    against the V_k term (the code's ``null_space: false``).
    """
    v_null = top_right_singular(merged_delta, null_rank, subspace)
    removed = (task @ v_null) @ v_null.T
    update = task - removed if null_space else task.clone()
    task_sq = float(task.pow(2).sum())
    removed_sq = float(removed.pow(2).sum()) if null_space else 0.0
    loss_start = loss_end = None
    adapter_sq = 0.0
    if fit and lora_rank > 0 and steps > 0:
        v_task = top_right_singular(task, grad_rank, "svd")
        basis, residual = surrogate_terms(task, merged_delta, v_null, v_task, null_space)
        if basis.shape[1]:
            b, a, losses = fit_adapter(
                task, basis, residual, lora_rank, steps, lr, generator or torch.Generator().manual_seed(0)
            )
            adapter = (task @ b) @ a
            update += adapter
            adapter_sq = float(adapter.pow(2).sum())
            loss_start, loss_end = losses[0], losses[-1]
        else:  # no direction to match: the surrogate is identically zero, Adam never moves B
            loss_start = loss_end = 0.0
    return Filtered(update, v_null.shape[1], task_sq, removed_sq, adapter_sq, loss_start, loss_end)


def filtered_label(label: str, layers: str) -> bool:
    """Whether NUFILT filters a matrix: ``attn_fc1`` as the authors' config (attention q, k, v,
    out and the first MLP layer; the HF names matched by ``lora_layer: [attn, fc1]``), or ``all``."""
    if layers == "all":
        return True
    return "attn" in label or "c_fc" in label or "fc1" in label


class NUFILT(ContinualMerger):
    """Null-space filtering of each new task vector plus a fitted low-rank adapter."""

    name: ClassVar[str] = "nufilt"
    title: ClassVar[str] = "NUFILT"
    summary: ClassVar[str] = (
        "Filters each new task vector through the complement of the merged update's top "
        "right-singular subspace and adds a low-rank adapter fitted, without data, to a projection surrogate."
    )
    published_name: ClassVar[str | None] = "nufilt"
    explanation: ClassVar[str] = (
        r"For every attention weight and first MLP weight, with $\tau_t = W_t - W_0$ and the accumulated update "
        r"$\Delta = W - W_0$, take $\Delta$'s top-$k$ right-singular vectors $V_k$ ($k = 128$) and filter the new "
        r"task vector on its input side: $\tau_t P$ with $P = I - V_k V_k^\top$, so the merged layer answers "
        r"inputs in $\Delta$'s leading directions as before. From the second task on, a low-rank adapter "
        r"$BA$ (rank 64, $A \sim \mathcal N(0, 0.02^2)$, $B = 0$) is fitted with 50 Adam steps (lr $10^{-3}$) to "
        r"$\lVert(\tau_t - M)V_\tau\rVert^2 + \lVert(\Delta - M)V_k\rVert^2$ with $M = \Delta + \tau_t(P + BA)$ and "
        r"$V_\tau$ the top 8 right-singular vectors of $\tau_t$: $M$ should act like $\tau_t$ on its leading "
        r"directions and like $\Delta$ on the protected ones. Then $W \leftarrow W + \tau_t(P + BA)$. "
        r"Other parameters stay at $\theta_0$, as in the authors' code."
    )
    diagnostics: ClassVar[tuple[Diagnostic, ...]] = (
        Diagnostic(
            "filtered_share",
            float,
            "share of ‖τ_t‖² over the filtered matrices that the null-space projector removed (‖τ V_k V_kᵀ‖²/‖τ‖²)",
        ),
        Diagnostic(
            "adapter_share",
            float,
            "‖τ_t B A‖/‖τ_t‖ over the filtered matrices: the size of what the adapter added (0 without a fit)",
        ),
        Diagnostic(
            "fit_loss_start",
            float,
            "the projection surrogate summed over matrices before the adapter's fit (B = 0)",
            optional=True,
        ),
        Diagnostic(
            "fit_loss", float, "the projection surrogate summed over matrices after the adapter's fit", optional=True
        ),
        Diagnostic(
            "matrices",
            dict,
            "per filtered matrix: null_rank (k'), filtered_share, and the fit's loss_start/loss_end",
        ),
    )
    figure_title: ClassVar[str | None] = "NUFILT: share filtered and the adapter's fit"
    options: ClassVar[tuple[Option, ...]] = (
        Option("null_rank", 128, "k: the accumulated update's top right-singular directions protected", minimum=0),
        Option("lora_rank", 64, "rank of the adapter B A (0: no adapter, the closed form τ P)", minimum=0),
        Option("grad_rank", 8, "top right-singular directions of τ_t in the surrogate's plasticity term", minimum=0),
        Option("steps", 50, "Adam steps fitting the adapter (0: no adapter)", minimum=0),
        Option("lr", 1e-3, "Adam's learning rate for the adapter", minimum=0.0, exclusive_minimum=True),
        Option("null_space", True, "filter through P = I − V_k V_kᵀ (false: P = I, the code's ablation switch)"),
        Option(
            "subspace",
            "svd",
            "svd: the first k columns of the SVD's V, null-space completion included (authors' code; at step 1 "
            "the update is zero and the first k input coordinates are filtered); "
            "nonzero: only directions with a nonzero singular value (nothing is filtered at step 1)",
            choices=("svd", "nonzero"),
        ),
        Option(
            "layers",
            "attn_fc1",
            "attn_fc1: attention q, k, v, out and the first MLP layer (authors' config); "
            "all: every linear weight, the second MLP layer too",
            choices=("attn_fc1", "all"),
        ),
        Option("seed", 0, "seed of the adapter's random init (A ~ N(0, 0.02²))", minimum=0),
    )

    uses_matrices: ClassVar[bool] = True

    @classmethod
    def step_summary(cls, diagnostics: Mapping[str, Any]) -> list[str]:
        parts = [f"filtered={100 * diagnostics['filtered_share']:.1f}%"]
        if diagnostics.get("fit_loss") is not None:
            parts.append(f"fit loss {diagnostics['fit_loss_start']:.3g}→{diagnostics['fit_loss']:.3g}")
        return parts

    @classmethod
    def live_figure(cls, results: MethodResults) -> Figure | None:
        """The share of each τ_t the filter removed, and the adapter's surrogate before and after its fit."""
        if not results.steps:
            return None
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        from merging.ui.plots import colour, styled

        x = list(range(1, len(results.steps) + 1))
        figure = make_subplots(
            rows=1, cols=2, subplot_titles=("share of ‖τ_t‖² filtered", "adapter's surrogate loss (log)")
        )
        filtered = [s.diagnostics.get("filtered_share") for s in results.steps]
        figure.add_trace(go.Bar(x=x, y=filtered, name="filtered share", marker_color=colour(0)), 1, 1)
        for index, (key, label) in enumerate((("fit_loss_start", "before fit"), ("fit_loss", "after fit"))):
            y = [s.diagnostics.get(key) for s in results.steps]
            figure.add_trace(
                go.Scatter(x=x, y=y, name=label, mode="lines+markers", line=dict(color=colour(index + 1))), 1, 2
            )
        figure.update_yaxes(type="log", row=1, col=2)
        figure.update_xaxes(title_text="step", dtick=1)
        return styled(figure, "NUFILT internals")

    def start(self, pretrained, device="cpu", family=None) -> None:
        super().start(pretrained, device, family)
        # attn_fc1 names CLIP's layers; a family without attention or MLP layers of those
        # names (a plain stack of nn.Linear) has every linear weight filtered instead.
        labels = self.family.matrix_labels(self.pretrained.keys())  # type: ignore[union-attr]
        clip_like = any(filtered_label(label, "attn_fc1") for label in labels)
        self._layers = self.config["layers"] if clip_like else "all"

    def _selected(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        views = self.family.matrix_views(key, tensor)  # type: ignore[union-attr] (start() sets the family)
        return [(label, view) for label, view in views if filtered_label(label, self._layers)]

    def _check_keys(self, finetuned: Mapping[str, Tensor]) -> list[str]:
        keys = super()._check_keys(finetuned)
        if not any(self._selected(k, self.pretrained[k]) for k in keys):
            which = "linear weights" if self._layers == "all" else "attention or first-MLP linear weights"
            raise CheckpointError(
                f"{_name(finetuned, self.step_count + 1)} has no {which} for NUFILT to filter "
                f"(it holds {len(keys)} parameter(s), e.g. {keys[0] if keys else 'none'})"
            )
        return keys

    def _merge(self, step: StepInput) -> dict[str, Any]:
        incoming = step.checkpoint
        keys = [k for k in self.merge_keys if self._selected(k, self.pretrained[k])]
        updates = map_on_threads(
            lambda k: self._update(k, incoming[k]), keys, self.device, cost=lambda k: self.pretrained[k].numel()
        )
        results = [item for update in updates for item in update]
        task_sq = sum(r.task_sq for _, r in results)
        fitted = [r for _, r in results if r.loss_end is not None]
        return {
            "filtered_share": sum(r.removed_sq for _, r in results) / task_sq if task_sq > 0 else 0.0,
            "adapter_share": (sum(r.adapter_sq for _, r in results) / task_sq) ** 0.5 if task_sq > 0 else 0.0,
            "fit_loss_start": sum(r.loss_start for r in fitted) if fitted else None,  # type: ignore[misc]
            "fit_loss": sum(r.loss_end for r in fitted) if fitted else None,  # type: ignore[misc]
            "matrices": {
                label: {
                    "null_rank": r.null_rank,
                    "filtered_share": r.removed_sq / r.task_sq if r.task_sq > 0 else 0.0,
                    "loss_start": r.loss_start,
                    "loss_end": r.loss_end,
                }
                for label, r in results
            },
        }

    def _update(self, key: str, incoming: Tensor) -> list[tuple[str, Filtered]]:
        """Add τ (P + B A) to every filtered matrix of one parameter; return what each one did."""
        config = self.config
        p0, pm = self.pretrained[key], self.merged[key]
        task_views = dict(self._selected(key, incoming - p0))
        delta_views = dict(self._selected(key, pm - p0))
        results = []
        for label, merged_view in self._selected(key, pm):
            # one seeded generator per matrix and step: the same draws whatever the thread order
            seed = zlib.crc32(f"{config['seed']}:{self.step_count}:{label}".encode())
            result = nufilt_matrix(
                task_views[label],
                delta_views[label],
                null_rank=config["null_rank"],
                grad_rank=config["grad_rank"],
                lora_rank=config["lora_rank"],
                steps=config["steps"],
                lr=config["lr"],
                null_space=config["null_space"],
                subspace=config["subspace"],
                fit=self.step_count > 1,  # the code fits from the second model on (model_idx > 0)
                generator=torch.Generator().manual_seed(seed),
            )
            merged_view.add_(result.update)
            result.update = None  # type: ignore[assignment] (added; not kept past the step)
            results.append((label, result))
        return results
