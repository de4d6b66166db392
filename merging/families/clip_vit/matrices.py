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


_TYPE_PATTERNS = (
    (re.compile(r"attn\.in_proj_weight\[(?P<part>[qkv])\]$"), None),
    (re.compile(r"attn\.out_proj\.weight$"), "attn.out"),
    (re.compile(r"mlp\.c_fc\.weight$"), "mlp.c_fc"),
    (re.compile(r"mlp\.c_proj\.weight$"), "mlp.c_proj"),
)


def matrix_type(label: str) -> str:
    """The layer type of a matrix label: ``attn.q`` … ``mlp.c_proj``, else the label's tail.

    Per-type summaries (statistics, DOP's losses) group matrices by the role they play:
    attention mixes tokens, the MLP maps features, and task vectors differ by type.
    """
    for pattern, name in _TYPE_PATTERNS:
        match = pattern.search(label)
        if match:
            return name or f"attn.{match['part']}"
    parts = label.split(".")
    return ".".join(parts[-3:-1]) if len(parts) >= 3 else label


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
