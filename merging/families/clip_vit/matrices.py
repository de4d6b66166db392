"""Which parameters are "matrices" (ALGORITHMS.md) in the canonical open_clip layout.

A matrix parameter is a weight that is an ``nn.Linear`` in the Hugging Face
CLIPVisionModel: q, k, v, out projections and the two MLP layers of every block. In the
canonical layout (open_clip's VisionTransformer) q, k and v are packed into one
``attn.in_proj_weight`` of shape (3d, d); each of its three d × d slices is a separate
matrix, addressed by a label such as ``transformer.resblocks.0.attn.in_proj_weight[q]``.
Everything else is an "other" parameter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from torch import Tensor

PACKED_QKV = "attn.in_proj_weight"
LINEAR_WEIGHTS = ("attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
QKV_PARTS = ("q", "k", "v")
_BLOCK = re.compile(r"^transformer\.resblocks\.\d+\.")
_LABEL = re.compile(r"^(?P<key>.+)\[(?P<part>[qkv])\]$")


def is_matrix(key: str) -> bool:
    """True when ``key`` holds one or more matrix parameters (an Linear weight or packed q/k/v)."""
    return bool(_BLOCK.match(key)) and (key.endswith(PACKED_QKV) or key.endswith(LINEAR_WEIGHTS))


def matrix_views(key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
    """The matrices inside parameter ``key`` as ``(label, view)`` pairs; empty for others.

    The views share storage with ``tensor``, so writing into them updates the parameter
    in place (the packed q/k/v weight is updated slice by slice).
    """
    if not is_matrix(key):
        return []
    if key.endswith(PACKED_QKV):
        d = tensor.shape[0] // 3
        return [(f"{key}[{part}]", tensor[i * d : (i + 1) * d]) for i, part in enumerate(QKV_PARTS)]
    return [(key, tensor)]


def matrix_labels(keys: Iterable[str]) -> list[str]:
    """Labels of every matrix parameter among ``keys``, in order (q, k, v split out)."""
    labels: list[str] = []
    for key in keys:
        if not is_matrix(key):
            continue
        if key.endswith(PACKED_QKV):
            labels.extend(f"{key}[{part}]" for part in QKV_PARTS)
        else:
            labels.append(key)
    return labels


def get_matrix(state: Mapping[str, Tensor], label: str) -> Tensor:
    """The matrix a label names: a whole parameter, or one q/k/v slice of a packed one.

    Any 2-D parameter can be named by its key, so that spectra of, say, the output
    projection can be inspected too.
    """
    match = _LABEL.match(label)
    if match is None:
        tensor = state[label]
        if tensor.dim() != 2:
            raise KeyError(f"{label} is not a matrix (shape {tuple(tensor.shape)})")
        return tensor
    packed = state[match["key"]]
    d = packed.shape[0] // 3
    i = QKV_PARTS.index(match["part"])
    return packed[i * d : (i + 1) * d]
