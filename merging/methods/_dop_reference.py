"""DOP's rule for one weight matrix, written plainly as FusionBench 0.2.33 computes it.

This is the yardstick for :mod:`merging.methods.dop`: one matrix at a time, the losses
built with autograd exactly as ``ContinualDOPForCLIP.cal_loss_i`` builds them
(``diag(s) Uᵀ (W − W_i)`` and ``(W − W_i) V diag(s)`` from a full SVD), gradients by two
backward passes, the gradients normalised by their losses, the two-task min-norm weights
of Sener and Koltun's Frank–Wolfe solver, their EMA, and one ``torch.optim.Adam`` step on
the weighted loss per iteration. The tests check the batched implementation against it,
and it against FusionBench itself where FusionBench is importable; the DOP step benchmark
times it as the baseline. It is not used by the app.
"""

from __future__ import annotations

import torch
from torch import Tensor


def leading_triplets(task_matrix: Tensor, svd_epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """U, s, V of ``task_matrix`` cut where the plain-sum share of Σs reaches ``svd_epsilon``.

    As FusionBench's ``svd(..., full_matrices=True)`` then ``searchsorted(cumsum(s)/sum(s), ε)``:
    the rank kept is the number of leading shares strictly below ε.
    """
    u, s, vh = torch.linalg.svd(task_matrix, full_matrices=True)
    share = s.cumsum(dim=0) / s.sum()
    rank = int(torch.searchsorted(share, min(svd_epsilon, 1.0)).item())
    return u[:, :rank], s[:rank], vh.T[:, :rank]


def projected_loss(difference: Tensor, s: Tensor, u: Tensor, v: Tensor, proj_space: str) -> Tensor:
    """‖diag(s) Uᵀ D‖²_F + ‖D V diag(s)‖²_F (``u`` or ``v`` keeps one term)."""
    left = torch.linalg.matrix_norm(torch.diag(s) @ u.T @ difference, ord="fro") ** 2
    right = torch.linalg.matrix_norm(difference @ v @ torch.diag(s), ord="fro") ** 2
    return {"uv": left + right, "u": left, "v": right}[proj_space]


def min_norm_weights(dot_11: float, dot_12: float, dot_22: float) -> tuple[float, float]:
    """argmin over γ ∈ [0, 1] of ‖γ g1 + (1 − γ) g2‖², clipped to [0.001, 0.999] at the ends.

    Sener and Koltun's ``_min_norm_element_from2``, which for two tasks is the whole
    Frank–Wolfe solver (``find_min_norm_element`` returns it without iterating).
    """
    if dot_12 >= dot_11:
        gamma = 0.999
    elif dot_12 >= dot_22:
        gamma = 0.001
    else:
        gamma = -1.0 * ((dot_12 - dot_22) / (dot_11 + dot_22 - 2 * dot_12))
    return float(gamma), float(1 - gamma)


def reference_dop_weight(
    pretrained: Tensor,
    merged: Tensor,
    new: Tensor,
    *,
    lr: float = 1e-4,
    steps: int = 200,
    mgda: bool = True,
    ema: bool = True,
    ema_beta: float = 0.999,
    alpha: float = 0.8,
    svd_epsilon: float = 0.99999,
    proj_space: str = "uv",
) -> Tensor:
    """The merged weight DOP's per-layer optimisation returns, as FusionBench computes it."""
    finetuned = [merged.detach(), new.detach()]
    weight = torch.nn.Parameter((finetuned[0] + finetuned[1]) / 2)
    bases = [leading_triplets(w - pretrained, svd_epsilon) for w in finetuned]
    optimizer = torch.optim.Adam([weight], lr=lr)
    ema_weights = [alpha, 1 - alpha]

    def loss_of(i: int) -> Tensor:
        u, s, v = bases[i]
        return projected_loss(weight - finetuned[i], s, u, v, proj_space)

    for _ in range(steps):
        if mgda:
            losses, grads = [], []
            for i in range(2):
                loss = loss_of(i)
                losses.append(float(loss.data))
                optimizer.zero_grad()
                loss.backward()
                grads.append(weight.grad.detach().clone())
            grads = [g / losses[i] for i, g in enumerate(grads)]
            dots = [float((grads[a] * grads[b]).sum()) for a, b in ((0, 0), (0, 1), (1, 1))]
            solution = min_norm_weights(*dots)
            if ema:
                ema_weights = [ema_beta * ema_weights[i] + (1 - ema_beta) * solution[i] for i in range(2)]
                solution = tuple(ema_weights)
            total = solution[0] * loss_of(0) + solution[1] * loss_of(1)
        else:
            total = alpha * loss_of(0) + (1 - alpha) * loss_of(1)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return weight.detach()
