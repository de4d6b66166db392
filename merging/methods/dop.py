"""DOP: dual orthogonal projections, data-free continual merging (NeurIPS 2025).

"Continual Model Merging without Data: Dual Projections for Balancing Stability and
Plasticity"; the rule is FusionBench 0.2.33's ``ContinualDOPForCLIP`` with the defaults of
its ``config/method/dop/dop.yaml`` (ALGORITHMS.md, "DOP"; ``docs/methods/dop.md``). Step 1
takes θ1. At step t every linear weight W is fitted to both the merged weight and the new
one, each in the subspaces its own task vector spans, by 200 Adam steps on a
multiple-gradient-descent (MGDA) weighting of the two losses; every other parameter is the
mean of merged and new.

Speed without changing the result. FusionBench optimises one matrix at a time and builds
each loss with autograd from ``diag(s) Uᵀ D`` and ``D V diag(s)`` (D = W − W_i), twice per
iteration (once for the two gradients, once for the weighted loss). The loss is a
quadratic form, so its gradient has a closed form, 2 (U S² Uᵀ D + D V S² Vᵀ), and the
weighted loss's gradient is the same combination of the two gradients already computed;
the loss itself is half the inner product of D and its gradient. The operators U S² Uᵀ
and V S² Vᵀ are formed once per step (or kept as factors when that is cheaper, for the
tall side of the MLP matrices), matrices of one shape are stacked and optimised together
with batched products, and the min-norm weights and Adam are applied per matrix along the
batch. :mod:`merging.methods._dop_reference` is the plain formulation the tests and
``benchmarks/dop_step.py`` compare against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from merging.errors import MergingError
from merging.methods.base import ContinualMerger, Diagnostic, Option, StepInput

if TYPE_CHECKING:
    from plotly.graph_objects import Figure

    from merging.experiment.results import MethodResults

# How many points of each iteration trace a step reports (the live figure's resolution).
TRACE_POINTS = 20
# Matrices of one shape are optimised together in chunks of about this many bytes of work
# memory (stacked weights, Adam moments, gradients, operators), so memory stays bounded.
CHUNK_BYTES = 512 * 2**20
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


@dataclass(frozen=True)
class DOPSettings:
    """The options that shape one matrix fit (ALGORITHMS.md's names in brackets)."""

    lr: float = 1e-4
    steps: int = 200  # [num_steps]
    mgda: bool = True
    ema: bool = True
    ema_beta: float = 0.999
    alpha: float = 0.8
    svd_epsilon: float = 0.99999
    proj_space: str = "uv"  # [svd_proj_space]
    class_embedding: str = "pretrained"


@dataclass
class MatrixFit:
    """The fitted weights of a stack of matrices and how the optimisation went.

    ``weight_trace`` is the weight on the merged model at the traced iterations (points ×
    matrices); ``loss_trace`` the two losses there (2 × points × matrices), the last point
    being the losses after the final step. ``ranks`` holds the number of singular triplets
    kept for the merged and the new model (matrices × 2).
    """

    weights: Tensor
    trace_iterations: list[int]
    weight_trace: Tensor
    loss_trace: Tensor
    ranks: Tensor


def trace_iterations(steps: int, points: int = TRACE_POINTS) -> list[int]:
    """The iterations whose state is reported: evenly spaced from 0, and ``steps`` (after the last update)."""
    every = max(1, math.ceil(steps / points))
    return sorted({*range(0, steps, every), steps})


class _Projector:
    """Each model's loss ‖diag(s) Uᵀ D‖² + ‖D V diag(s)‖² for a stack of matrices, with its gradient.

    The singular triplets of the model's task vector are cut at ``svd_epsilon`` of the plain
    sum Σs, as FusionBench cuts them (``searchsorted(cumsum(s) / sum(s), ε)``); the cut ones
    get weight zero here instead of being dropped, so matrices of different ranks stack. The
    stack holds both models of every matrix (merged and new interleaved), so one batched
    product serves the two losses. The squared singular values are doubled once here (exact
    in floating point), so the products give the gradient itself.
    """

    def __init__(self, task: Tensor, svd_epsilon: float, proj_space: str):
        u, s, vh = torch.linalg.svd(task, full_matrices=False)
        count, m, n = task.shape
        k = s.shape[-1]
        share = s.cumsum(dim=-1) / s.sum(dim=-1, keepdim=True)
        limit = torch.full((count, 1), min(svd_epsilon, 1.0), dtype=share.dtype, device=share.device)
        rank = torch.searchsorted(share, limit)
        kept = torch.arange(k, device=s.device)[None, :] < rank
        s2 = 2 * torch.where(kept, s, torch.zeros_like(s)) ** 2
        self.ranks = rank[:, 0]
        self.left: tuple[str, Tensor, Tensor | None] | None = None
        self.right: tuple[str, Tensor, Tensor | None] | None = None
        # U S² Uᵀ D costs m·m·n as one dense operator, 2·m·n·k as factors: take the cheaper
        if proj_space in ("uv", "u"):
            self.left = ("dense", (u * s2[:, None, :]) @ u.mT, None) if m <= 2 * k else ("factors", u, s2)
        if proj_space in ("uv", "v"):
            v = vh.mT
            self.right = ("dense", (v * s2[:, None, :]) @ vh, None) if n <= 2 * k else ("factors", v, s2)

    def gradient(self, difference: Tensor, out: Tensor) -> Tensor:
        """The loss's gradient 2 (U S² Uᵀ D + D V S² Vᵀ) at D = W − W_i, written into ``out``.

        The right-hand product accumulates into the left's output, so no temporary of the
        matrices' size is made for the dense operators.
        """
        written = False
        if self.left is not None:
            kind, a, s2 = self.left
            if kind == "dense":
                torch.bmm(a, difference, out=out)
            else:
                torch.bmm(a, s2[:, :, None] * (a.mT @ difference), out=out)
            written = True
        if self.right is not None:
            kind, b, s2 = self.right
            factor, second = (difference, b) if kind == "dense" else ((difference @ b).mul_(s2[:, None, :]), b.mT)
            if written:
                out.baddbmm_(factor, second)
            else:
                torch.bmm(factor, second, out=out)
        return out


def _pair_grams(a: Tensor, b: Tensor) -> Tensor:
    """Per matrix, the 2 × 2 inner products ⟨a_i, b_j⟩ of two stacks shaped count × 2 × m × n.

    One batched product reads each stack once, instead of an elementwise temporary per dot.
    """
    count = a.shape[0]
    return torch.bmm(a.reshape(count, 2, -1), b.reshape(count, 2, -1).mT)


def min_norm_weights(dot_11: Tensor, dot_12: Tensor, dot_22: Tensor) -> Tensor:
    """Per matrix, the two-task min-norm weights (γ, 1 − γ) of Sener and Koltun's solver.

    γ minimises ‖γ g1 + (1 − γ) g2‖² over [0, 1]; the solver puts 0.999 when ⟨g1, g2⟩ ≥ ‖g1‖²
    (checked first) and 0.001 when ⟨g1, g2⟩ ≥ ‖g2‖². For two tasks its Frank–Wolfe search
    returns this initial solution without iterating.
    """
    denominator = dot_11 + dot_22 - 2 * dot_12
    gamma = -(dot_12 - dot_22) / torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    gamma = torch.where(dot_12 >= dot_22, torch.full_like(gamma, 0.001), gamma)
    gamma = torch.where(dot_12 >= dot_11, torch.full_like(gamma, 0.999), gamma)
    return torch.stack((gamma, 1 - gamma), dim=1)


def _adam(parameter: Tensor, lr: float) -> torch.optim.Adam:
    """``torch.optim.Adam`` (FusionBench's optimiser, its defaults) on a stacked tensor.

    Adam is elementwise, so one optimiser over the stack updates every matrix as its own
    optimiser would. The fused kernel does the update in one pass over the weights and both
    moments (seven passes otherwise); torch before 2.4 has none on the CPU, and gets the plain one.
    """
    try:
        return torch.optim.Adam([parameter], lr=lr, betas=_ADAM_BETAS, eps=_ADAM_EPS, fused=True)
    except RuntimeError:
        return torch.optim.Adam([parameter], lr=lr, betas=_ADAM_BETAS, eps=_ADAM_EPS)


def fit_matrices(pretrained: Tensor, merged: Tensor, new: Tensor, settings: DOPSettings) -> MatrixFit:
    """DOP's weight for each matrix of a stack (count × m × n): pure, deterministic.

    Equal, to float32 rounding, to running :func:`merging.methods._dop_reference.reference_dop_weight`
    on each matrix in turn.
    """
    count, m, n = merged.shape
    finetuned = torch.stack((merged, new), dim=1)  # count × 2 × m × n: merged and new of each matrix
    projector = _Projector(
        (finetuned - pretrained[:, None]).view(2 * count, m, n), settings.svd_epsilon, settings.proj_space
    )
    weight = (merged + new) / 2
    adam = _adam(weight, settings.lr)
    difference = torch.empty_like(finetuned)
    gradients = torch.empty_like(finetuned)
    weight.grad = torch.empty_like(weight)  # the combined gradient, rewritten in place each iteration
    fixed = torch.tensor([settings.alpha, 1 - settings.alpha], dtype=torch.float64, device=weight.device)
    ema = fixed.expand(count, 2).clone()
    iterations = trace_iterations(settings.steps)
    weight_trace = torch.empty(len(iterations), count, dtype=torch.float64)
    loss_trace = torch.empty(2, len(iterations), count, dtype=torch.float64)
    point = 0
    for iteration in range(settings.steps + 1):
        torch.sub(weight[:, None], finetuned, out=difference)
        projector.gradient(difference.view(2 * count, m, n), gradients.view(2 * count, m, n))
        # L_i = ½ ⟨D_i, ∇L_i⟩ (a quadratic form); the off-diagonal products are not needed
        losses = torch.diagonal(_pair_grams(difference, gradients), dim1=1, dim2=2).double().mT / 2
        if iteration == settings.steps:  # only the final losses are wanted after the last update
            loss_trace[:, point] = losses.cpu()
            weight_trace[point] = weight_trace[point - 1] if point else fixed[0]
            break
        if settings.mgda:
            # ⟨g_a / L_a, g_b / L_b⟩; a zero loss has a zero gradient, normalised to zero
            inverse = torch.where(losses > 0, 1 / losses, torch.zeros_like(losses))
            grams = _pair_grams(gradients, gradients).double()
            dots = [grams[:, a, b] * inverse[a] * inverse[b] for a, b in ((0, 0), (0, 1), (1, 1))]
            solution = min_norm_weights(*dots)
            if settings.ema:
                ema.mul_(settings.ema_beta).add_(solution, alpha=1 - settings.ema_beta)
                solution = ema
        else:
            solution = fixed.expand(count, 2)
        if iteration == iterations[point]:
            loss_trace[:, point] = losses.cpu()
            weight_trace[point] = solution[:, 0].cpu()
            point += 1
        # γ_m ∇L_m + γ_t ∇L_t; the weights sum to one (the EMA of pairs that do, or alpha's pair)
        torch.lerp(gradients[:, 1], gradients[:, 0], solution[:, :1, None].to(weight.dtype), out=weight.grad)
        adam.step()
    weight.grad = None
    ranks = projector.ranks.view(count, 2).cpu()
    return MatrixFit(weight, iterations, weight_trace, loss_trace, ranks)


def chunk_size(shape: tuple[int, ...]) -> int:
    """How many matrices of ``shape`` are optimised together: CHUNK_BYTES over one matrix's work memory.

    Per matrix about 24 float32 copies of it (the three weights, W, Adam's moments, the two
    gradients and their temporaries) and four operators of at most its longer side squared.
    """
    per_matrix = 24 * math.prod(shape) * 4 + 4 * max(shape) ** 2 * 4
    return max(1, CHUNK_BYTES // per_matrix)


@dataclass
class _Slot:
    """One matrix of the encoder: the parameter holding it and which of its views it is."""

    key: str
    index: int
    label: str


@dataclass
class _StepTraces:
    """Sums over matrices of the traced weights and losses, grouped by layer type."""

    iterations: list[int] = field(default_factory=list)
    weight_sum: Tensor | None = None
    matrices: int = 0
    losses: dict[str, Tensor] = field(default_factory=dict)  # type → (2 × points) summed losses

    def add(self, fit: MatrixFit, types: list[str]) -> None:
        self.iterations = fit.trace_iterations
        total = fit.weight_trace.sum(dim=1)
        self.weight_sum = total if self.weight_sum is None else self.weight_sum + total
        self.matrices += len(types)
        for column, kind in enumerate(types):
            loss = fit.loss_trace[:, :, column]
            self.losses[kind] = self.losses[kind] + loss if kind in self.losses else loss.clone()


class DOP(ContinualMerger):
    """Dual orthogonal projections: fit each linear weight to both models in their task subspaces."""

    name: ClassVar[str] = "dop"
    title: ClassVar[str] = "DOP"
    summary: ClassVar[str] = (
        "Fits every linear weight to both the merged and the new weight, each measured in the "
        "subspaces its own task vector spans, balancing the two losses by MGDA; other "
        "parameters are averaged. Data-free."
    )
    explanation: ClassVar[str] = (
        r"For every linear weight, with $\tau_i = W_i - W_0 = U_i S_i V_i^\top$ for the merged model and the new "
        r"one, minimise $L_i(W) = \lVert S_i U_i^\top (W - W_i)\rVert_F^2 + \lVert (W - W_i) V_i S_i\rVert_F^2$: "
        r"the new weight may differ from $W_i$ only where $\tau_i$ does not act (the *dual* projection on the "
        r"input and output sides). $W$ starts at the mean of the two and takes 200 Adam steps on "
        r"$w_1 L_1 + w_2 L_2$, where $(w_1, w_2)$ are MGDA's min-norm weights of the loss-normalised gradients, "
        r"smoothed by an EMA that starts at $(\alpha, 1 - \alpha) = (0.8, 0.2)$: mostly stability. Biases, norms "
        r"and embeddings are the mean of merged and new; the class token returns to the pretrained one, as in "
        r"FusionBench's code."
    )
    diagnostics: ClassVar[tuple[Diagnostic, ...]] = (
        Diagnostic(
            "merged_weight",
            float,
            "the weight on the merged model (stability) after the last iteration, mean over matrices",
            optional=True,
        ),
        Diagnostic("trace_iterations", list, "the iterations the traces below are taken at", optional=True),
        Diagnostic(
            "weight_trace",
            list,
            "the weight on the merged model at those iterations, mean over matrices",
            optional=True,
        ),
        Diagnostic(
            "losses",
            dict,
            "per layer type, the two losses (merged, new) summed over its matrices at those iterations",
            optional=True,
        ),
        Diagnostic(
            "ranks", dict, "per layer type, the mean number of singular triplets kept (merged, new)", optional=True
        ),
    )
    figure_title: ClassVar[str | None] = "DOP: MGDA weights over the iterations, and the losses per layer type"
    options: ClassVar[tuple[Option, ...]] = (
        Option("lr", 1e-4, "Adam's learning rate", minimum=0.0, maximum=1.0, exclusive_minimum=True),
        Option("steps", 200, "Adam steps per linear weight and merge step (num_steps)", minimum=0, maximum=100_000),
        Option("mgda", True, "weight the two losses by MGDA's min-norm solution (false: alpha and 1 − alpha)"),
        Option("ema", True, "smooth the MGDA weights by an exponential moving average started at (alpha, 1 − alpha)"),
        Option("ema_beta", 0.999, "the EMA's decay", minimum=0.0, maximum=1.0),
        Option(
            "alpha", 0.8, "the weight of the merged model's loss (the EMA's start with mgda)", minimum=0.0, maximum=1.0
        ),
        Option(
            "svd_epsilon",
            0.99999,
            "share of Σs whose leading singular triplets define each model's subspaces",
            minimum=0.0,
            maximum=1.0,
        ),
        Option(
            "proj_space",
            "uv",
            "uv: both sides; u: only the left singular vectors; v: only the right (svd_proj_space)",
            choices=("uv", "u", "v"),
        ),
        Option(
            "class_embedding",
            "pretrained",
            "pretrained: the class token returns to θ0's from step 2 on (FusionBench: it belongs to no leaf "
            "module, which its layer-wise loop skips); mean: averaged like every other parameter",
            choices=("pretrained", "mean"),
        ),
    )

    uses_matrices: ClassVar[bool] = True

    def start(self, pretrained, device="cpu", family=None) -> None:
        super().start(pretrained, device, family)
        if not self.family.matrix_labels(self.pretrained):  # type: ignore[union-attr]
            raise MergingError(f"{self.name} fits linear weights, and the pretrained encoder has none")

    @property
    def settings(self) -> DOPSettings:
        return DOPSettings(**self.config)

    @classmethod
    def step_summary(cls, diagnostics: Mapping[str, Any]) -> list[str]:
        weight = diagnostics.get("merged_weight")
        return [] if weight is None else [f"w_merged={weight:.3f}"]

    def _merge(self, step: StepInput) -> dict[str, Any]:
        incoming = step.checkpoint
        if self.step_count == 1:
            for key in self.merge_keys:
                self.merged[key].copy_(incoming[key])
            return {}
        views = self.family.matrix_views  # type: ignore[union-attr] (start() sets the family)
        by_shape: dict[tuple[int, ...], list[_Slot]] = {}
        for key in self.merge_keys:
            matrices = views(key, self.merged[key])
            if not matrices:
                if key == "class_embedding" and self.config["class_embedding"] == "pretrained":
                    self.merged[key].copy_(self.pretrained[key])
                else:
                    self.merged[key].add_(incoming[key]).div_(2)  # FusionBench's simple_average
            for index, (label, view) in enumerate(matrices):
                by_shape.setdefault(tuple(view.shape), []).append(_Slot(key, index, label))
        traces = _StepTraces()
        ranks: dict[str, list[Tensor]] = {}
        settings = self.settings
        for shape, slots in by_shape.items():
            size = chunk_size(shape)
            for start in range(0, len(slots), size):
                chunk = slots[start : start + size]
                self._fit_chunk(chunk, incoming, settings, traces, ranks)
        return self._diagnostics(traces, ranks)

    def _fit_chunk(self, chunk: list[_Slot], incoming, settings: DOPSettings, traces: _StepTraces, ranks) -> None:
        views = self.family.matrix_views  # type: ignore[union-attr]
        new_params = {slot.key: incoming[slot.key] for slot in chunk}  # each parameter read once per chunk

        def stacked(state: Mapping[str, Tensor]) -> Tensor:
            return torch.stack([views(s.key, state[s.key])[s.index][1] for s in chunk])

        fit = fit_matrices(stacked(self.pretrained), stacked(self.merged), stacked(new_params), settings)
        for slot, weight in zip(chunk, fit.weights, strict=True):
            views(slot.key, self.merged[slot.key])[slot.index][1].copy_(weight)
        types = [self.family.matrix_type(s.label) for s in chunk]  # type: ignore[union-attr]
        traces.add(fit, types)
        for kind, rank_pair in zip(types, fit.ranks, strict=True):
            ranks.setdefault(kind, []).append(rank_pair)

    def _diagnostics(self, traces: _StepTraces, ranks: dict[str, list[Tensor]]) -> dict[str, Any]:
        if not traces.matrices:
            return {}
        weights = (traces.weight_sum / traces.matrices).tolist()
        return {
            "merged_weight": weights[-1],
            "trace_iterations": traces.iterations,
            "weight_trace": weights,
            "losses": {
                kind: {"merged": loss[0].tolist(), "new": loss[1].tolist()} for kind, loss in traces.losses.items()
            },
            "ranks": {
                kind: [float(x) for x in torch.stack(pairs).double().mean(dim=0)] for kind, pairs in ranks.items()
            },
        }

    @classmethod
    def live_figure(cls, results: MethodResults) -> Figure | None:
        """The MGDA weight on the merged model over the iterations of every step, and the latest step's losses."""
        if not results.steps:
            return None
        fitted = [s for s in results.steps if s.diagnostics.get("weight_trace")]
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        from merging.ui.plots import colour, styled

        figure = make_subplots(
            rows=1,
            cols=2,
            subplot_titles=(
                "weight on the merged model (MGDA, EMA)",
                "losses of the latest step, relative to the start",
            ),
        )
        for number, record in enumerate(fitted):
            step = results.steps.index(record) + 1
            figure.add_trace(
                go.Scatter(
                    x=record.diagnostics["trace_iterations"],
                    y=record.diagnostics["weight_trace"],
                    name=f"step {step}",
                    mode="lines",
                    line=dict(color=colour(number)),
                    legendgroup="weights",
                ),
                1,
                1,
            )
        latest = fitted[-1].diagnostics if fitted else {"losses": {}}  # step 1 takes θ1: nothing fitted yet
        for number, (kind, pair) in enumerate(latest["losses"].items()):
            for model, dash in (("merged", "solid"), ("new", "dash")):
                values = pair[model]
                start = values[0] if values and values[0] > 0 else 1.0
                figure.add_trace(
                    go.Scatter(
                        x=latest["trace_iterations"],
                        y=[v / start for v in values],
                        name=f"{kind} ({model})",
                        mode="lines",
                        line=dict(color=colour(number), dash=dash),
                        legendgroup="losses",
                    ),
                    1,
                    2,
                )
        figure.update_xaxes(title_text="iteration")
        return styled(figure, "DOP internals")
