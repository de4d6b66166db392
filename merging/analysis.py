"""Analysis of task vectors for the plots: cosine similarities and singular-value spectra.

Models are passed as mappings from canonical key to tensor; lazy readers
(:class:`merging.io.checkpoints.EncoderReader`) load one tensor at a time, so a similarity
matrix over T checkpoints holds T copies of one parameter, never T encoders.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from merging.families.clip_vit.matrices import get_matrix


def cosine_similarity_matrix(
    models: Sequence[Mapping[str, Tensor]],
    pretrained: Mapping[str, Tensor],
    keys: Iterable[str] | None = None,
) -> Tensor:
    """Cosine similarities between the task vectors ``model − pretrained`` of ``models``.

    ``keys`` restricts the comparison to some parameters (one layer, say); by default
    every parameter all models share with ``pretrained``. The Gram matrix is accumulated
    key by key in float64. A zero task vector has similarity 0 with everything (1 with itself).
    """
    if not models:
        return torch.zeros(0, 0, dtype=torch.float64)
    if keys is None:
        keys = [k for k in pretrained if all(k in m for m in models)]
    n = len(models)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for key in keys:
        base = pretrained[key].double()
        rows = torch.stack([(m[key].double() - base).reshape(-1) for m in models])
        gram += rows @ rows.T
    norms = gram.diagonal().sqrt()
    denominator = torch.outer(norms, norms)
    similarity = torch.where(denominator > 0, gram / denominator.clamp_min(1e-300), torch.zeros_like(gram))
    similarity.fill_diagonal_(1.0)
    return similarity


def singular_values(model: Mapping[str, Tensor], label: str, pretrained: Mapping[str, Tensor] | None = None) -> Tensor:
    """Singular values (descending, float64) of matrix ``label`` of ``model − pretrained``.

    ``label`` is a key of a 2-D parameter or a q/k/v slice label such as
    ``transformer.resblocks.0.attn.in_proj_weight[q]``. Without ``pretrained``, the
    spectrum of the weight itself.
    """
    matrix = get_matrix(model, label).double()
    if pretrained is not None:
        matrix = matrix - get_matrix(pretrained, label).double()
    return torch.linalg.svdvals(matrix)


def cumulative_share(singular_values: Tensor) -> Tensor:
    """Normalised cumulative spectrum Σ_{j≤i} s_j / Σ s (the quantity OPCM's α cuts).

    The one definition of this share: OPCM's split (:func:`merging.methods.opcm.split_rank`)
    and the spectra plot (:func:`merging.ui.plots.spectrum_figure`) both call it, so the curve
    the page draws is exactly the one the merge cut. Sums run in float64 and the last entry
    is divided by itself, so the share ends at exactly 1; an empty, all-zero (or NaN) spectrum
    has a share of zeros.
    """
    cumulative = torch.cumsum(singular_values.double(), 0)
    total = cumulative[-1] if cumulative.numel() else torch.tensor(0.0, dtype=torch.float64)
    return cumulative / total if float(total) > 0 else torch.zeros_like(cumulative)
