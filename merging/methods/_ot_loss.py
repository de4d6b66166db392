"""Optimal-transport losses between two batches of features, for OTMF (ALGORITHMS.md).

Both use the squared Euclidean cost ½‖x − y‖² and uniform weights, and are differentiable
in the first batch (the student's features):

- ``emd``: exact OT, ``0.5 · ot.emd2`` on the squared-distance matrix. Its gradient is the
  optimal plan's (a sub-gradient where the plan is not unique).
- ``sinkhorn``: the debiased Sinkhorn divergence S_ε(x, y) = OT_ε(x, y) − ½ OT_ε(x, x) −
  ½ OT_ε(y, y), ε = blur² (geomloss' convention). Gradients come from the envelope theorem
  (POT's ``grad="envelope"``): differentiating through the Sinkhorn iterations at this small
  ε gives wrong gradients, as ALGORITHMS.md warns.

POT's ``sqeuclidean`` metric is ‖x − y‖² without the ½, and entropic OT with cost ½C and
regularisation ε equals ½ · (entropic OT with cost C and regularisation 2ε); both losses
are written that way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

OT_LOSSES = ("emd", "sinkhorn")

# Sinkhorn at ε = 0.0025 on CLIP-scale features needs the log-domain solver and more
# iterations than POT's default to converge; the envelope gradient only needs the plan.
_SINKHORN_MAX_ITER = 2000


def _pot():
    """POT, imported on first use: it takes seconds to import (it pulls in pandas and scipy),
    and only OTMF needs it, so importing the library must not."""
    import ot

    return ot


def exact_ot(x: Tensor, y: Tensor) -> Tensor:
    """Exact OT cost between uniform point clouds ``x`` (n × d) and ``y`` (m × d), cost ½‖x − y‖².

    POT's network simplex runs on the CPU whatever the tensors' device, so the cost matrix is
    handed to it there and the loss is a CPU tensor (its gradient flows back to the device
    through the copy). Reading its value then does not wait for the device: on a GPU, OTMF's
    next launches overlap the backward pass instead of following it. The numbers are the same.
    """
    cost = torch.cdist(x.float(), y.float()).square().cpu()
    a = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=cost.dtype, device=cost.device)
    b = torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=cost.dtype, device=cost.device)
    return 0.5 * _pot().emd2(a, b, cost)


def sinkhorn_divergence(x: Tensor, y: Tensor, blur: float = 0.05) -> Tensor:
    """Debiased Sinkhorn divergence with cost ½‖x − y‖² and ε = blur², envelope gradients."""
    epsilon = blur * blur
    with warnings.catch_warnings():
        # POT warns when the tolerance is not reached; the divergence is then still within
        # far less than a percent of its limit at these sizes (tests compare it with exact OT).
        warnings.simplefilter("ignore", UserWarning)
        result = _pot().solve_sample(
            x.float(),
            y.float(),
            metric="sqeuclidean",
            reg=2.0 * epsilon,
            reg_type="entropy",
            debias=True,
            grad="envelope",
            max_iter=_SINKHORN_MAX_ITER,
        )
    return 0.5 * result.value


def ot_loss(name: str, blur: float = 0.05) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss ``name`` (one of :data:`OT_LOSSES`) as a function of (student, teacher) features."""
    if name == "emd":
        return exact_ot
    if name == "sinkhorn":
        return lambda x, y: sinkhorn_divergence(x, y, blur)
    raise ValueError(f"unknown OT loss {name!r}; valid: {', '.join(OT_LOSSES)}")
