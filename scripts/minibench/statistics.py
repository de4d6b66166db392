"""Statistics of task vectors that say whether the mini benchmark's fine-tunes resemble real CLIP ones.

The continual methods differ in what they exploit: task arithmetic and weight averaging only
see sums of task vectors, MagMax their per-parameter magnitudes, OPCM the leading singular
subspaces of each task matrix (it projects a new task matrix off the dominant directions of
the merged one). A miniature can only reproduce the papers' ranking of the methods if its task
vectors share the properties those methods react to, so the report measures them per layer
type, from the shipped files, beside the values published for real CLIP checkpoints:

- the size of the fine-tune, ‖τ‖_F / ‖θ0‖_F per matrix (a small perturbation of the pretrained
  weights, or a new network);
- how low-rank a task matrix is, its stable rank ‖τ‖_F² / ‖τ‖_2² (1 for a rank-one update, the
  rank for a flat spectrum);
- how much two tasks share their leading directions, ‖U_iᵀ U_j‖_F² / k over the top-k left
  (and right) singular vectors (1: the same k-dimensional subspace, 0: orthogonal ones,
  k / d on average for random subspaces of R^d);
- the Subspace Alignment Ratio of Marczak et al. (2025), the only subspace statistic with
  published values for the standard 8 tasks: ‖Π_k τ_i‖_F / ‖τ_i‖_F, where Π_k projects onto the
  top-k left singular vectors of another task (or of the task-arithmetic sum) and k is the
  rank that keeps 95 % of the sum's energy;
- the global cosine similarity between whole task vectors (Ilharco et al., 2023).

Everything here is pure: tensors in, numbers out. :func:`task_vector_statistics` reads one
parameter of every model at a time, so lazy checkpoint readers never hold a whole model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from merging.families.clip_vit.matrices import matrix_type as layer_type

DEFAULT_K = 8
SAR_EPSILON = 0.05  # Marczak et al. (2025), Eq. (6): keep the components holding 95 % of the energy
LAYER_TYPES = ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.c_fc", "mlp.c_proj")
ALL_MATRICES = "all matrices"

MatrixViews = Callable[[str, Tensor], list[tuple[str, Tensor]]]


def relative_norm(task_matrix: Tensor, pretrained_matrix: Tensor) -> float:
    """‖τ‖_F / ‖θ0‖_F: how far fine-tuning moved this matrix, relative to its pretrained size.

    Real fine-tunes are small perturbations, which is what makes adding them meaningful;
    NaN when the pretrained matrix is zero (the ratio has no meaning then).
    """
    base = float(torch.linalg.matrix_norm(pretrained_matrix.double()))
    return float(torch.linalg.matrix_norm(task_matrix.double())) / base if base > 0 else math.nan


def stable_rank(matrix: Tensor) -> float:
    """‖A‖_F² / ‖A‖_2²: the number of directions that carry the matrix's energy (0 for a zero matrix).

    Unlike the numerical rank it does not count the long tail of tiny singular values that
    noise gives every trained matrix, so it tells a few dominant directions from a flat spectrum.
    """
    values = torch.linalg.svdvals(matrix.double())
    top = float(values[0]) if values.numel() else 0.0
    return float(values.square().sum()) / top**2 if top > 0 else 0.0


def leading_singular_vectors(matrix: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Orthonormal bases (float64) of the top-k left and right singular subspaces: (d_out × k, d_in × k).

    k is capped at the matrix's smaller side.
    """
    u, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    k = min(k, u.shape[1])
    return u[:, :k], vh[:k].T


def subspace_overlap(a: Tensor, b: Tensor) -> float:
    """‖AᵀB‖_F² / k for orthonormal bases A, B with k columns each: 1 for equal subspaces, 0 for orthogonal.

    It is the mean squared cosine of the principal angles between the two subspaces, so it
    does not depend on the bases chosen (signs, rotations within a subspace).
    """
    if a.shape != b.shape:
        raise ValueError(f"bases of different shapes: {tuple(a.shape)} and {tuple(b.shape)}")
    k = a.shape[1]
    return float((a.double().T @ b.double()).square().sum()) / k if k else math.nan


def mean_pairwise_overlap(bases: Sequence[Tensor]) -> float:
    """:func:`subspace_overlap` averaged over the pairs i < j (it is symmetric, so i ≠ j gives the same)."""
    pairs = [subspace_overlap(a, b) for a, b in itertools.combinations(bases, 2)]
    return sum(pairs) / len(pairs) if pairs else math.nan


def random_overlap(k: int, d: int) -> float:
    """The expected :func:`subspace_overlap` of two independent uniformly random k-subspaces of R^d: k / d.

    The baseline a measured overlap must be compared with: in a 96-dimensional space two random
    8-dimensional subspaces already overlap 0.083.
    """
    return min(k, d) / d


def energy_rank(singular_values: Tensor, epsilon: float = SAR_EPSILON) -> int:
    """The smallest k with Σ_{i>k} σ_i² ≤ ε² Σ σ_i² (Marczak et al., 2025, Eq. 6); 0 for a zero matrix."""
    energy = singular_values.double().square()
    total = float(energy.sum())
    if total <= 0:
        return 0
    tail = total - torch.cumsum(energy, 0)  # tail[k-1] = energy beyond the first k components
    return int(torch.nonzero(tail <= epsilon**2 * total)[0, 0]) + 1


def alignment_ratio(matrix: Tensor, basis: Tensor) -> float:
    """‖Π A‖_F / ‖A‖_F, Π the projection onto the orthonormal columns of ``basis`` (Marczak et al., Eq. 5).

    The share (in norm) of the matrix that lives in the other matrix's leading left subspace; a
    random k-subspace of R^d keeps √(k/d) on average. NaN for a zero matrix.
    """
    a = matrix.double()
    norm = float(torch.linalg.matrix_norm(a))
    return float(torch.linalg.matrix_norm(basis.double().T @ a)) / norm if norm > 0 else math.nan


def off_diagonal(matrix: Sequence[Sequence[float]] | Tensor) -> list[float]:
    """The entries (i, j), i ≠ j, of a square matrix, row by row."""
    rows = matrix.tolist() if isinstance(matrix, Tensor) else [list(r) for r in matrix]
    return [float(v) for i, row in enumerate(rows) for j, v in enumerate(row) if i != j]


def pairwise_cosine_summary(similarity: Sequence[Sequence[float]] | Tensor) -> tuple[float, float]:
    """Mean and max |cosine| over the pairs of a cosine-similarity matrix (the diagonal left out)."""
    values = [abs(v) for v in off_diagonal(similarity)]
    return (sum(values) / len(values), max(values)) if values else (math.nan, math.nan)


@dataclass
class MatrixStatistics:
    """The statistics of one matrix (one layer of one type) over a set of tasks."""

    label: str
    layer_type: str
    shape: tuple[int, int]
    k: int
    relative_norm: list[float]  # per task
    stable_rank: list[float]  # per task
    overlap_left: float  # mean over task pairs of ‖U_iᵀU_j‖²/k
    overlap_right: float
    sar_pairwise: float  # mean over ordered task pairs i ≠ j of SAR(τ_i, τ_j; k_TA)
    sar_merged: list[float]  # per task: SAR(τ_t, Σ τ; k_TA)
    k_merged: int  # k_TA of this matrix


def _left_basis(matrix: Tensor, k: int) -> Tensor:
    """The top-k left singular vectors of ``matrix``, but only those with a nonzero singular value.

    Beyond the numerical rank the SVD completes U with arbitrary null-space directions, which
    are not directions of the matrix and would count as alignment with anything.
    """
    u, s, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    tolerance = float(s[0]) * max(matrix.shape) * torch.finfo(torch.float64).eps if s.numel() else 0.0
    return u[:, : min(k, int((s > tolerance).sum()))]


def matrix_statistics(
    label: str, pretrained: Tensor, task_matrices: Sequence[Tensor], k: int = DEFAULT_K
) -> MatrixStatistics:
    """Every per-matrix statistic for one matrix: norms and stable ranks per task, overlaps per pair.

    ``task_matrices`` are the task vectors τ_t = θ_t − θ0 of this matrix. The pairwise SAR uses
    the rank k_TA of the task-arithmetic sum of these matrices, as Marczak et al. do.
    """
    bases = [leading_singular_vectors(t, k) for t in task_matrices]
    merged = torch.stack([t.double() for t in task_matrices]).sum(0)
    u_merged, s_merged, _ = torch.linalg.svd(merged, full_matrices=False)
    k_merged = energy_rank(s_merged)
    full_left = [_left_basis(t, k_merged) for t in task_matrices]
    sar_pairs = [
        alignment_ratio(task_matrices[i], full_left[j]) for i, j in itertools.permutations(range(len(task_matrices)), 2)
    ]
    return MatrixStatistics(
        label=label,
        layer_type=layer_type(label),
        shape=(int(pretrained.shape[0]), int(pretrained.shape[1])),
        k=min(k, *pretrained.shape),
        relative_norm=[relative_norm(t, pretrained) for t in task_matrices],
        stable_rank=[stable_rank(t) for t in task_matrices],
        overlap_left=mean_pairwise_overlap([b[0] for b in bases]),
        overlap_right=mean_pairwise_overlap([b[1] for b in bases]),
        sar_pairwise=sum(sar_pairs) / len(sar_pairs) if sar_pairs else math.nan,
        sar_merged=[alignment_ratio(t, u_merged[:, :k_merged]) for t in task_matrices],
        k_merged=k_merged,
    )


def _mean(values: Iterable[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


@dataclass
class LayerTypeStatistics:
    """The statistics of every matrix of one layer type, averaged (over tasks, pairs and matrices)."""

    layer_type: str
    matrices: int
    shape: tuple[int, int]  # of the first matrix of the type (all share it in a ViT)
    k: int
    relative_norm: float
    stable_rank: float
    overlap_left: float
    overlap_right: float
    random_left: float  # k / d_out: random subspaces' expected overlap_left
    random_right: float  # k / d_in
    sar_pairwise: float
    sar_merged: float
    k_merged: float  # mean k_TA
    random_sar: float  # mean √(k_TA / d_out): a random k_TA-subspace's expected SAR (roughly)

    @classmethod
    def combine(cls, name: str, items: Sequence[MatrixStatistics]) -> LayerTypeStatistics:
        """Average matrices' statistics; baselines are averaged over the matrices' own dimensions."""
        return cls(
            layer_type=name,
            matrices=len(items),
            shape=items[0].shape,
            k=items[0].k,
            relative_norm=_mean(v for m in items for v in m.relative_norm),
            stable_rank=_mean(v for m in items for v in m.stable_rank),
            overlap_left=_mean(m.overlap_left for m in items),
            overlap_right=_mean(m.overlap_right for m in items),
            random_left=_mean(random_overlap(m.k, m.shape[0]) for m in items),
            random_right=_mean(random_overlap(m.k, m.shape[1]) for m in items),
            sar_pairwise=_mean(m.sar_pairwise for m in items),
            sar_merged=_mean(v for m in items for v in m.sar_merged),
            k_merged=_mean(m.k_merged for m in items),
            random_sar=_mean(math.sqrt(m.k_merged / m.shape[0]) for m in items),
        )


@dataclass
class TaskVectorStatistics:
    """The report's statistics for a set of fine-tuned models of one pretrained model."""

    tasks: list[str]
    k: int
    per_type: dict[str, LayerTypeStatistics]  # LAYER_TYPES order, then others, then ALL_MATRICES
    cosine_mean_abs: float
    cosine_max_abs: float
    matrices: list[MatrixStatistics] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        """Per-type averages and the cosine summary (the per-matrix lists are left out)."""
        return {
            "tasks": list(self.tasks),
            "k": self.k,
            "per_type": {name: asdict(s) for name, s in self.per_type.items()},
            "cosine_mean_abs": self.cosine_mean_abs,
            "cosine_max_abs": self.cosine_max_abs,
        }


def _default_views(keys: Iterable[str]) -> MatrixViews:
    from merging.families import family_of

    return family_of(list(keys)).matrix_views


def task_vector_statistics(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    tasks: Sequence[str] | None = None,
    k: int = DEFAULT_K,
    matrix_views: MatrixViews | None = None,
) -> TaskVectorStatistics:
    """Per-layer-type statistics and the global cosine of the task vectors ``finetuned − pretrained``.

    ``finetuned`` may be lazy readers: each parameter is read from every model once, so at
    most T copies of one parameter are held. ``matrix_views`` splits a parameter into its
    matrices (the model family's, found from the pretrained keys when not given; CLIP's packed
    q/k/v weight gives three). The cosine is :func:`merging.analysis.cosine_similarity_matrix`,
    the same the lab's cosine plot shows.
    """
    from merging.analysis import cosine_similarity_matrix

    if len(finetuned) < 2:
        raise ValueError("task vector statistics need at least two fine-tuned models")
    views = matrix_views or _default_views(pretrained.keys())
    matrices: list[MatrixStatistics] = []
    for key, base in pretrained.items():
        base_views = views(key, base)
        if not base_views:
            continue
        tuned = [model[key] for model in finetuned]
        for index, (label, base_matrix) in enumerate(base_views):
            task_matrices = [views(key, t)[index][1].double() - base_matrix.double() for t in tuned]
            matrices.append(matrix_statistics(label, base_matrix, task_matrices, k))
    if not matrices:
        raise ValueError("no matrix parameters found in the pretrained model")
    order = list(LAYER_TYPES) + sorted({m.layer_type for m in matrices} - set(LAYER_TYPES))
    per_type = {
        name: LayerTypeStatistics.combine(name, [m for m in matrices if m.layer_type == name])
        for name in order
        if any(m.layer_type == name for m in matrices)
    }
    per_type[ALL_MATRICES] = LayerTypeStatistics.combine(ALL_MATRICES, matrices)
    cosine_mean, cosine_max = pairwise_cosine_summary(cosine_similarity_matrix(list(finetuned), pretrained))
    return TaskVectorStatistics(
        tasks=list(tasks) if tasks is not None else [str(i) for i in range(len(finetuned))],
        k=k,
        per_type=per_type,
        cosine_mean_abs=cosine_mean,
        cosine_max_abs=cosine_max,
        matrices=matrices,
    )


# ---------------------------------------------------------------- published values for real CLIP

# Marczak et al. (2025), "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
# Subspaces", ICML 2025, arXiv 2502.04959. CLIP ViT-B/16 (the paper's default encoder; its Figure 9
# says Figure 3a was "conducted on ViT-B/16"), fully fine-tuned checkpoints of Wang et al. (2024,
# Consensus merging), the standard 8 tasks. Rows and columns in this order:
MARCZAK_TASKS = ("MNIST", "SVHN", "GTSRB", "EuroSAT", "RESISC45", "DTD", "Cars", "SUN397")
# Figure 2a: cosine similarities between pairs of (whole) task vectors.
MARCZAK_COSINE = (
    (1.00, 0.19, 0.08, 0.04, 0.04, 0.04, 0.03, 0.03),
    (0.19, 1.00, 0.08, 0.04, 0.03, 0.04, 0.02, 0.02),
    (0.08, 0.08, 1.00, 0.04, 0.04, 0.04, 0.03, 0.03),
    (0.04, 0.04, 0.04, 1.00, 0.07, 0.05, 0.03, 0.03),
    (0.04, 0.03, 0.04, 0.07, 1.00, 0.05, 0.03, 0.04),
    (0.04, 0.04, 0.04, 0.05, 0.05, 1.00, 0.04, 0.04),
    (0.03, 0.02, 0.03, 0.03, 0.03, 0.04, 1.00, 0.03),
    (0.03, 0.02, 0.03, 0.03, 0.04, 0.04, 0.03, 1.00),
)
# Figure 3b: SAR_avg(Δ_i, Δ_j; k_TA) between pairs of task matrices, averaged over all layers.
MARCZAK_SAR = (
    (0.99, 0.75, 0.68, 0.58, 0.57, 0.58, 0.58, 0.56),
    (0.73, 0.99, 0.68, 0.59, 0.57, 0.58, 0.57, 0.56),
    (0.64, 0.66, 0.99, 0.59, 0.58, 0.59, 0.58, 0.58),
    (0.57, 0.58, 0.59, 0.99, 0.67, 0.62, 0.57, 0.62),
    (0.56, 0.57, 0.58, 0.64, 0.97, 0.61, 0.58, 0.63),
    (0.56, 0.57, 0.58, 0.60, 0.61, 0.97, 0.58, 0.60),
    (0.55, 0.55, 0.56, 0.56, 0.57, 0.57, 0.96, 0.58),
    (0.54, 0.55, 0.56, 0.58, 0.60, 0.59, 0.58, 0.95),
)
MARCZAK = "Marczak et al. 2025 (ICML, arXiv 2502.04959)"
TSV = "Gargiulo et al. 2025, Task Singular Vectors (CVPR, arXiv 2412.00081)"


@dataclass(frozen=True)
class PublishedValue:
    """A statistic of real CLIP fine-tunes as a paper reports it (value None: nothing published)."""

    statistic: str  # the key of the measured statistic it stands beside
    value: float | None
    text: str  # the value as the paper gives it, or why there is none
    source: str  # paper, figure or table, model and checkpoints


def _published() -> tuple[PublishedValue, ...]:
    cosine_mean, cosine_max = pairwise_cosine_summary(MARCZAK_COSINE)
    sar = off_diagonal(MARCZAK_SAR)
    return (
        PublishedValue(
            "relative_norm",
            None,
            "not published",
            "no paper found that reports ‖τ‖_F/‖θ0‖_F for the FusionBench (tanganke/clip-vit-base-patch32_*) "
            "or other CLIP ViT-B/32 task vectors",
        ),
        PublishedValue(
            "stable_rank",
            None,
            "not published; related: keeping 3 % of each layer task matrix's singular components lowers the "
            "mean accuracy by only 1.5 % (91.37 % at full rank)",
            f"{TSV}, Sec. 3.2 and Fig. 2: CLIP ViT-B-32, mean over 20 tasks (checkpoints of Wang et al. 2024)",
        ),
        PublishedValue(
            "overlap_left",
            None,
            "not published (nearest: the pairwise SAR below)",
            f"{TSV}, Fig. 3 shows the inter-task singular-vector similarities of the first attention layer of "
            "a ViT-B-32 over the 8 tasks as an image, without a summary value",
        ),
        PublishedValue(
            "sar_pairwise",
            sum(sar) / len(sar),
            f"{sum(sar) / len(sar):.2f} mean over the 56 ordered pairs (range {min(sar):.2f}–{max(sar):.2f}; "
            "highest within {MNIST, SVHN, GTSRB} and {EuroSAT, RESISC45})",
            f"{MARCZAK}, Fig. 3b: SAR_avg(Δ_i, Δ_j; k_TA), CLIP ViT-B/16, 8 tasks, checkpoints of Wang et al. 2024",
        ),
        PublishedValue(
            "sar_merged",
            None,
            "0.75–0.87 per task (no mean given); NAI correlates with it, Pearson ρ = 0.94",
            f"{MARCZAK}, Sec. 3.3 and Fig. 3a: SAR_avg(Δ_t, Δ_TA; k_TA), CLIP ViT-B/16, 8 tasks",
        ),
        PublishedValue(
            "cosine_mean_abs",
            cosine_mean,
            f"{cosine_mean:.3f} mean over the 28 pairs (max {cosine_max:.2f}, MNIST–SVHN)",
            f"{MARCZAK}, Fig. 2a: cosine similarity between pairs of task vectors, CLIP ViT-B/16, 8 tasks, "
            "checkpoints of Wang et al. 2024",
        ),
        PublishedValue(
            "cosine_max_abs",
            cosine_max,
            f"{cosine_max:.2f} (MNIST–SVHN)",
            f"{MARCZAK}, Fig. 2a (as above)",
        ),
        PublishedValue(
            "cosine_fusionbench_vit_b32",
            None,
            "not published in a form read here",
            "the FusionBench ViT-B/32 checkpoints' cosine similarities (OPCM, arXiv 2501.09522, has a figure) "
            "could not be read from the stored sources; no value is quoted",
        ),
    )


PUBLISHED: tuple[PublishedValue, ...] = _published()
