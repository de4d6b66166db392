"""OPCM: orthogonal projection-based continual merging (Tang et al., arXiv 2501.09522).

Each new task vector is projected, matrix by matrix, away from the singular directions of
the current merged task vector, added to it, and the sum is rescaled so that its norm stays
the running mean of the task-vector norms (ALGORITHMS.md, "OPCM").

Speed without changing the result: the reference code forms full singular bases
(``full_matrices=True``; U is 3072 × 3072 for an MLP weight of ViT-B/32) and computes
``U (Uᵀ Δ V) Vᵀ``. Every entry it zeroes lies in the leading min(m, n) × min(m, n) corner
of ``Uᵀ Δ V``, so ``Δ̃ = Δ − U_r Z V_rᵀ`` with the reduced bases and a ``Z`` that holds only
the zeroed entries. The reduced bases come from an eigendecomposition of the smaller Gram
matrix in float64, which is both faster than a float32 SVD and more accurate (the float64
Gram squares the condition number but float64 has room for it); matrices that are
numerically rank-deficient fall back to LAPACK's SVD, whose arbitrary completion of the
null space is then exactly what the reference gets.

Where the decompositions run: on the CPU each matrix is decomposed on its own, two at a time
on threads (:mod:`merging.compute.parallel`); stacking them into one batched ``eigh`` was
measured 3× slower there (LAPACK then runs them one after another, each on both cores, which
its symmetric eigensolver uses poorly). On CUDA (:data:`BATCHED_DEVICE_TYPES`) the float64
Grams of equal width are stacked and decomposed by one batched ``eigh`` per stack
(:func:`eigen_bases`), instead of 72 solver calls each with its workspace and synchronisation
for ViT-B/32, and every norm a step reports stays on the device until one transfer at the
end. Both paths compute the same numbers per matrix (tests/test_opcm.py runs the batched one
on the CPU against the per-matrix one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from merging.analysis import cumulative_share
from merging.compute.parallel import map_on_threads
from merging.methods.base import ContinualMerger, Diagnostic, Option, StepInput

if TYPE_CHECKING:
    from plotly.graph_objects import Figure

    from merging.experiment.results import MethodResults

# Below this ratio to the largest singular value a direction is treated as null space.
_RANK_TOLERANCE = 1e-6
# Device types whose steps stack the eigendecompositions (eigen_bases); elsewhere each matrix
# is decomposed on its own, on threads (see OPCM._merge for why the CPU keeps that).
BATCHED_DEVICE_TYPES = ("cuda",)
# At most this many bytes of float64 Gram matrices per batched eigh, which needs as much again
# for its eigenvectors: ViT-B/32's 72 Grams (340 MB) go in two stacks of 36, so a step's peak
# stays near the per-matrix path's plus two encoders' worth.
EIGH_BATCH_BYTES = 256 << 20


def split_rank(singular_values: Tensor, alpha: float) -> int:
    """Number of leading singular values whose cumulative share of Σs is ≤ α.

    As in the reference code (``argmax`` of ``cumsum / sum > α``), the count is 0 when no
    share exceeds α, which is how α = 1 turns the block projection off. The share is the
    spectra plot's (:func:`merging.analysis.cumulative_share`, ending at exactly 1), so the
    cut drawn there is the one made here; a zero spectrum has a share of zeros, hence 0.
    """
    exceeds = cumulative_share(singular_values) > alpha
    return int(torch.argmax(exceeds.to(torch.int8))) if bool(exceeds.any()) else 0


def reduced_svd(matrix: Tensor, need_u: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """Reduced SVD ``matrix = U diag(s) Vᵀ`` of a tall matrix (m ≥ n): V (n, n), s (n), U (m, n).

    V and s come from a float64 eigendecomposition of the n × n Gram matrix (float64 has
    room for the squared condition number), U = A V / s in the matrix's own precision;
    measured against a float64 SVD this is ten times closer than a float32 SVD. U is
    returned only if ``need_u`` (None otherwise), except when the matrix is numerically
    rank-deficient: U cannot be recovered from A V / s then, and LAPACK's SVD gives all three.
    """
    a64 = matrix.double()
    gram = a64.T @ a64
    del a64  # the float64 copy is twice the matrix: free it before the eigensolver runs
    eigenvalues, v64 = torch.linalg.eigh(gram)
    del gram
    s = eigenvalues.flip(0).clamp_min(0).sqrt().to(matrix.dtype)
    if s.numel() == 0 or float(s[-1]) <= _RANK_TOLERANCE * float(s[0]):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return vh.T, s, u
    v = v64.flip(1).to(matrix.dtype)
    return v, s, (matrix @ v) / s if need_u else None


@dataclass(frozen=True)
class Basis:
    """V (n × n) and s of a tall matrix's reduced SVD as :func:`reduced_svd` computes them, and s
    on the CPU (where splits are counted, so a batch of matrices costs one transfer, not one each)."""

    v: Tensor
    s: Tensor
    s_host: Tensor


def eigen_bases(
    shapes: Sequence[tuple[int, int]], matrix: Callable[[int], Tensor], batch_bytes: int | None = None
) -> list[Basis | None]:
    """:func:`reduced_svd`'s V and s for many tall matrices, the eigendecompositions batched.

    ``matrix(i)`` gives the i-th matrix (m ≥ n, of shape ``shapes[i]``) when its Gram matrix is
    formed, so callers can compute each on demand and never hold them all. The float64 Grams of
    equal width are stacked, up to ``batch_bytes`` (default :data:`EIGH_BATCH_BYTES`) per
    stack, and each stack goes to one ``torch.linalg.eigh``: on CUDA a batched solver instead of
    a launch, a workspace and a synchronisation per matrix. The arithmetic per matrix is
    :func:`reduced_svd`'s, so the results are its own to float64 rounding (bit for bit where the
    batched solver runs the same routine per matrix, as LAPACK does on the CPU). None marks a
    matrix that is numerically rank-deficient: :func:`reduced_svd` falls back to an SVD there.
    """
    batch_bytes = EIGH_BATCH_BYTES if batch_bytes is None else batch_bytes
    results: list[Basis | None] = [None] * len(shapes)
    by_width: dict[int, list[int]] = {}
    for index, (m, n) in enumerate(shapes):
        if m < n:
            raise ValueError(f"eigen_bases takes tall matrices (m >= n), got {m} x {n}")
        by_width.setdefault(n, []).append(index)
    for n, indices in by_width.items():
        if n == 0:
            continue  # an empty spectrum: reduced_svd's SVD path handles it
        most = max(1, batch_bytes // (8 * n * n))
        per_batch = math.ceil(len(indices) / math.ceil(len(indices) / most))  # stacks of even size
        for start in range(0, len(indices), per_batch):
            chunk = indices[start : start + per_batch]
            first = matrix(chunk[0])
            grams = torch.empty(len(chunk), n, n, dtype=torch.float64, device=first.device)
            dtype = first.dtype
            for slot, index in enumerate(chunk):
                a64 = (first if slot == 0 else matrix(index)).double()
                torch.matmul(a64.T, a64, out=grams[slot])
                del a64
            del first
            eigenvalues, vectors = torch.linalg.eigh(grams)
            del grams
            s = eigenvalues.flip(-1).clamp_min(0).sqrt().to(dtype)
            v = vectors.flip(-1).to(dtype)
            del vectors, eigenvalues
            s_host = s.cpu()  # one transfer for the whole stack
            deficient = s_host[:, -1].double() <= _RANK_TOLERANCE * s_host[:, 0].double()
            for slot, index in enumerate(chunk):
                if not bool(deficient[slot]):
                    results[index] = Basis(v[slot], s[slot], s_host[slot])
    return results


def project_task_matrix(
    merged_delta: Tensor,
    task_delta: Tensor,
    alpha: float,
    projection: str = "block",
    zero_diagonal: bool = True,
    out: Tensor | None = None,
    basis: Basis | None = None,
) -> tuple[Tensor, int]:
    """OPCM's projection of one matrix: ``Δ̃ = U P Vᵀ`` with ``P = Uᵀ Δ V`` partly zeroed.

    ``merged_delta`` is ΔM = Wm − W0, ``task_delta`` is Δ = W_t − W0. With ``block`` the
    leading split × split block of P is zeroed; with ``two_sided`` its first split rows and
    columns; with ``zero_diagonal`` also every diagonal entry. Returns Δ̃ and split. With
    ``out`` (which may be ``task_delta`` itself) Δ̃ is written there instead of a new tensor.
    ``basis`` is ΔM's (tall orientation) from :func:`eigen_bases`, when already computed.

    Every zeroed entry but the ``two_sided`` columns lies in the reduced bases, so
    ``Δ̃ = Δ − U_r Z Vᵀ (− Δ V_s V_sᵀ)`` with an n × n ``Z`` holding those entries of P, and
    ``Z Vᵀ`` is cheap to form: its diagonal part is a row scaling of Vᵀ and its leading rows
    come straight from ``C = U_rᵀ Δ``. For a matrix more than twice as tall as wide, U_r is
    never formed: ``U_r = ΔM V / s`` turns ``U_r Z Vᵀ`` into ``ΔM (V S⁻¹ Z Vᵀ)`` and ``C`` into
    ``S⁻¹ Vᵀ (ΔMᵀ Δ)``, two m × n × n products instead of three.
    """
    merged_delta, task_delta, out, transposed = _tall(merged_delta, task_delta, out)
    m, n = merged_delta.shape
    if basis is None:
        v, s, u = reduced_svd(merged_delta, need_u=m < 2 * n)
        split = split_rank(s, alpha)
    else:
        v, s = basis.v, basis.s
        u = (merged_delta @ v) / s if m < 2 * n else None  # as reduced_svd forms it
        split = split_rank(basis.s_host, alpha)
    projected = _project_in_basis(merged_delta, task_delta, v, s, u, split, projection, zero_diagonal, out)
    return (projected.T if transposed else projected), split


def _tall_view(matrix: Tensor) -> Tensor:
    return matrix.T if matrix.shape[0] < matrix.shape[1] else matrix


def _tall(merged_delta: Tensor, task_delta: Tensor, out: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, bool]:
    """The matrices as tall ones (m ≥ n), transposed views when they are wide, and whether they were."""
    if merged_delta.shape[0] >= merged_delta.shape[1]:
        return merged_delta, task_delta, out, False
    return merged_delta.T, task_delta.T, None if out is None else out.T, True


def _project_in_basis(
    merged_delta: Tensor,
    task_delta: Tensor,
    v: Tensor,
    s: Tensor,
    u: Tensor | None,
    split: int,
    projection: str,
    zero_diagonal: bool,
    out: Tensor | None,
) -> Tensor:
    """Δ̃ of a tall matrix from ΔM's reduced SVD (V, s and U, or None to work from ΔM V / s)."""
    # C = U_rᵀ Δ (n × n); without U_r it is S⁻¹ Vᵀ ΔMᵀ Δ
    c = u.T @ task_delta if u is not None else (v.T @ (merged_delta.T @ task_delta)) / s[:, None]
    column_part = task_delta @ v[:, :split] if projection == "two_sided" and split else None
    z_vt = _zeroed_entries_times_vt(c, v, split, projection, zero_diagonal)
    if out is None:
        projected = task_delta.clone()
    else:
        same = out.data_ptr() == task_delta.data_ptr() and out.stride() == task_delta.stride()
        projected = out if same else out.copy_(task_delta)
    if z_vt is not None:
        if u is None:
            projected.addmm_(merged_delta, v @ (z_vt / s[:, None]), alpha=-1)
        else:
            projected.addmm_(u, z_vt, alpha=-1)
    if column_part is not None:
        projected.addmm_(column_part, v[:, :split].T, alpha=-1)  # columns j < split, all of them
    return projected


def _zeroed_entries_times_vt(c: Tensor, v: Tensor, split: int, projection: str, zero_diagonal: bool) -> Tensor | None:
    """``Z Vᵀ``: the entries of ``P = C V`` that the projection removes, mapped back by Vᵀ.

    ``block``: the diagonal and the leading split × split block. ``two_sided``: the first split
    rows whole (their ``Z Vᵀ`` rows are ``C``'s own rows) except the leading block, which the
    caller's column term removes, and the diagonal below them. None when nothing is removed.
    """
    n = v.shape[0]
    vt = v.T
    if zero_diagonal:
        diagonal = (c * vt).sum(dim=1)  # P_ii = u_iᵀ Δ v_i
        z_vt = diagonal[:, None] * vt
    elif split:
        z_vt = torch.zeros(n, n, dtype=c.dtype, device=c.device)
    else:
        return None
    if split:
        v_s = v[:, :split]
        block = c[:split] @ v_s  # P[:split, :split]
        if projection == "block":
            if zero_diagonal:
                block.diagonal().zero_()  # already in the diagonal part
            z_vt[:split].addmm_(block, v_s.T)
        else:
            z_vt[:split] = c[:split]  # rows i < split go whole (diagonal included): P[i, :] Vᵀ = C[i, :]
            z_vt[:split].addmm_(block, v_s.T, alpha=-1)  # but not their first split columns
    return z_vt


class OPCM(ContinualMerger):
    """Orthogonal projection-based continual merging with adaptive rescaling."""

    name: ClassVar[str] = "opcm"
    title: ClassVar[str] = "OPCM"
    summary: ClassVar[str] = (
        "Projects each new task vector away from the merged task vector's leading singular "
        "directions, then rescales so the merged norm is the mean task-vector norm."
    )
    published_name: ClassVar[str | None] = "opcm"
    explanation: ClassVar[str] = (
        r"For every linear weight, take the SVD of the merged task vector $\Delta_M = U \Sigma V^\top$, keep the "
        r"leading directions whose cumulative share of $\sum \sigma$ is at most $\alpha$, and project the new task "
        r"vector away from them (and from the diagonal of the singular basis): $\tilde\tau_t = \tau_t - U_r "
        r"(U_r^\top \tau_t V) V^\top - \dots$. "
        r"Then $\Delta \leftarrow (\lambda_{t-1}\Delta + \tilde\tau_t)/\lambda_t$, "
        r"with $\lambda_t$ chosen so that $\lVert\Delta\rVert$ is the mean of the task-vector norms; "
        r"$\lambda_t \approx \sqrt t$ for orthogonal task vectors."
    )
    diagnostics: ClassVar[tuple[Diagnostic, ...]] = (
        Diagnostic("lambda", float, "λ(t), the rescaling of the merged task vector (≈ √t for orthogonal task vectors)"),
        Diagnostic(
            "mean_task_norm", float, "the running mean of the task-vector norms, the merged delta's target norm"
        ),
        Diagnostic("removed_share", float, "share of ‖τ_t‖ the projection removed"),
        Diagnostic("matrices", dict, "per matrix: the split rank r and the share of its task vector removed"),
    )
    figure_title: ClassVar[str | None] = "OPCM: λ(t) and the share of τ_t removed"
    options: ClassVar[tuple[Option, ...]] = (
        Option("alpha", 0.5, "share of Σs whose leading singular directions are protected", minimum=0.0, maximum=1.0),
        Option(
            "projection",
            "block",
            "block: zero the leading split × split block (reference code); "
            "two_sided: zero the first split rows and columns (the paper's equation)",
            choices=("block", "two_sided"),
        ),
        Option("zero_diagonal", True, "also zero the diagonal of Uᵀ Δ V (false: the January 2025 code)"),
        Option(
            "class_embedding",
            "merged",
            "merged: treat the class embedding like any parameter (paper); "
            "frozen_first: keep the first model's, only rescaled (reference code)",
            choices=("merged", "frozen_first"),
        ),
    )

    uses_matrices: ClassVar[bool] = True

    def start(self, pretrained, device="cpu", family=None) -> None:
        super().start(pretrained, device, family)
        self.lambda_prev = 1.0
        self._norm_sum = 0.0

    @classmethod
    def step_summary(cls, diagnostics: Mapping[str, Any]) -> list[str]:
        return [f"lambda={diagnostics['lambda']:.4g}", f"removed={100 * diagnostics['removed_share']:.1f}%"]

    @classmethod
    def spectrum_marks(cls, options: Mapping[str, Any]) -> dict[str, float]:
        alpha = next(o.default for o in cls.options if o.name == "alpha")
        return {"α": float(options.get("alpha", alpha))}

    @classmethod
    def live_figure(cls, results: MethodResults) -> Figure | None:
        """λ(t) against √t, and the share of each new task vector the projection removed."""
        if not results.steps:
            return None
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        from merging.ui.plots import colour, styled

        x = list(range(1, len(results.steps) + 1))
        figure = make_subplots(rows=1, cols=2, subplot_titles=("λ(t) and √t", "share of τ_t removed by the projection"))
        lam = [s.diagnostics.get("lambda") for s in results.steps]
        figure.add_trace(go.Scatter(x=x, y=lam, name="λ(t)", mode="lines+markers", line=dict(color=colour(0))), 1, 1)
        figure.add_trace(
            go.Scatter(x=x, y=[math.sqrt(t) for t in x], name="√t", mode="lines", line=dict(color="#999", dash="dash")),
            1,
            1,
        )
        removed = [s.diagnostics.get("removed_share") for s in results.steps]
        figure.add_trace(go.Bar(x=x, y=removed, name="removed share", marker_color=colour(1)), 1, 2)
        figure.update_xaxes(title_text="step", dtick=1)
        return styled(figure, "OPCM internals")

    def _merge(self, step: StepInput) -> dict[str, Any]:
        incoming = step.checkpoint
        self._norm_sum += step.task_norm
        mean_norm = self._norm_sum / self.step_count
        if self.step_count == 1:
            for k in self.merge_keys:
                self.merged[k].copy_(incoming[k])
            self.lambda_prev = 1.0
            return {"lambda": 1.0, "mean_task_norm": mean_norm, "removed_share": 0.0, "matrices": {}}

        bases = self._stacked_bases() if self.device.type in BATCHED_DEVICE_TYPES else {}
        updates = map_on_threads(
            lambda k: self._update(k, incoming[k], bases.get(k)),
            self.merge_keys,
            self.device,
            cost=lambda k: self.pretrained[k].numel(),
        )
        # the norms stayed on the device until now: one transfer for the whole step
        norms = torch.stack([n for u in updates for n in (u.kept_sq, u.merged_sq, *u.norms)]).tolist()
        kept_sq = unnormalised_sq = 0.0
        matrices: dict[str, dict[str, float]] = {}
        position = 0
        for u in updates:
            kept_sq += norms[position]
            unnormalised_sq += norms[position + 1]
            position += 2
            for label, split in zip(u.labels, u.splits, strict=True):
                before, after = norms[position], norms[position + 1]
                position += 2
                matrices[label] = {"split": split, "removed_share": 1.0 - after / before if before > 0 else 0.0}
        unnormalised_norm = unnormalised_sq**0.5
        degenerate = unnormalised_norm == 0 or mean_norm == 0  # all task vectors zero: nothing to rescale
        lam = 1.0 if degenerate else unnormalised_norm / mean_norm
        factor = 1.0 if degenerate else mean_norm / unnormalised_norm  # as the reference multiplies
        for k in self.merge_keys:  # p0 + (p − p0)·factor in one pass
            torch.lerp(self.pretrained[k], self.merged[k], factor, out=self.merged[k])
        self.lambda_prev = lam
        return {
            "lambda": lam,
            "mean_task_norm": mean_norm,
            "removed_share": 1.0 - (kept_sq**0.5) / step.task_norm if step.task_norm > 0 else 0.0,
            "matrices": matrices,
        }

    def _frozen(self, key: str) -> bool:
        return self.config["class_embedding"] == "frozen_first" and key == "class_embedding"

    def _stacked_bases(self) -> dict[str, list[Basis | None]]:
        """Per parameter, the bases of its merged-delta matrices from one batched eigendecomposition
        per stack of equal-width Grams (:func:`eigen_bases`); each ΔM matrix is formed when its
        Gram is, so no more than one is held at a time."""
        views = self.family.matrix_views  # type: ignore[union-attr] (start() sets the family)
        entries = [  # (parameter, its merged matrix and θ0's, both tall: transposed when wide)
            (key, _tall_view(merged), _tall_view(pretrained))
            for key in self.merge_keys
            if not self._frozen(key)
            for (_, merged), (_, pretrained) in zip(
                views(key, self.merged[key]), views(key, self.pretrained[key]), strict=True
            )
        ]

        def merged_delta(i: int) -> Tensor:
            return entries[i][1] - entries[i][2]

        found = eigen_bases([(e[1].shape[0], e[1].shape[1]) for e in entries], merged_delta)
        bases: dict[str, list[Basis | None]] = {}
        for (key, _, _), basis in zip(entries, found, strict=True):
            bases.setdefault(key, []).append(basis)
        return bases

    def _update(self, key: str, incoming: Tensor, bases: list[Basis | None] | None = None) -> _KeyUpdate:
        """Unnormalised update of one parameter: W ← W0 + λ_prev·ΔM + Δ̃ (Δ̃ = Δ for non-matrices).

        Norms come back as tensors on the merger's device, so a GPU step synchronises once
        (in :meth:`_merge`) rather than a few times per matrix.
        """
        p0, pm = self.pretrained[key], self.merged[key]
        merged_delta = pm - p0
        if self._frozen(key):
            # the reference never updates it; the rescale still applies
            return _KeyUpdate(_zero(pm), _squared_norm(merged_delta), [], [], [])
        task_delta = incoming - p0
        labels, splits, norms = [], [], []
        views = self.family.matrix_views  # type: ignore[union-attr] (start() sets the family)
        pairs = zip(views(key, merged_delta), views(key, task_delta), strict=True)
        for index, ((label, merged_view), (_, task_view)) in enumerate(pairs):
            before = torch.linalg.vector_norm(task_view).double()
            _, split = project_task_matrix(
                merged_view,
                task_view,
                self.config["alpha"],
                self.config["projection"],
                self.config["zero_diagonal"],
                out=task_view,
                basis=None if bases is None else bases[index],
            )
            labels.append(label)
            splits.append(split)
            norms += [before, torch.linalg.vector_norm(task_view).double()]
        kept_sq = _squared_norm(task_delta)
        new_delta = merged_delta.mul_(self.lambda_prev).add_(task_delta)
        torch.add(p0, new_delta, out=pm)
        return _KeyUpdate(kept_sq, _squared_norm(new_delta), labels, splits, norms)


@dataclass
class _KeyUpdate:
    """One parameter's update; the norms are 0-d float64 tensors on the merger's device."""

    kept_sq: Tensor  # ‖Δ̃‖² of this parameter (the part of the task vector that was added)
    merged_sq: Tensor  # ‖λ_prev·ΔM + Δ̃‖², the unnormalised merged delta
    labels: list[str]  # its matrices
    splits: list[int]
    norms: list[Tensor]  # per matrix: ‖Δ‖ before and after the projection


def _squared_norm(tensor: Tensor) -> Tensor:
    """‖t‖² as float(‖t‖)² computes it (a float32 norm, squared in float64), left on the device."""
    return torch.linalg.vector_norm(tensor).double().square()


def _zero(like: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.float64, device=like.device)
