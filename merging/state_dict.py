"""Arithmetic on state dicts: the task-vector algebra every method is built from.

In the spirit of Ilharco et al.'s ``task_vectors``: a model is a mapping from parameter
name to tensor, and a task vector is the difference of two such mappings. Functions
here are pure (they never modify their inputs) and work key by key, so that the largest
temporary is one parameter, never a whole flattened model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

StateDict = dict[str, Tensor]


def difference(a: Mapping[str, Tensor], b: Mapping[str, Tensor], keys: Iterable[str] | None = None) -> StateDict:
    """``a - b`` over ``keys`` (default: the keys of ``a``), computed in float32."""
    keys = list(a.keys()) if keys is None else list(keys)
    return {k: a[k].float() - b[k].float() for k in keys}


def squared_distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor], keys: Iterable[str]) -> float:
    """``‖a − b‖²`` over ``keys`` as if all parameters were flattened into one vector.

    Each parameter's norm is taken in float32 (torch sums pairwise, so it is accurate to
    about 1e-7 relative) and the squares are accumulated in Python's float64 across
    parameters, so the result does not degrade with the number of parameters.
    """
    total = 0.0
    for k in keys:
        total += float(torch.linalg.vector_norm(a[k].float() - b[k].float())) ** 2
    return total


def distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor], keys: Iterable[str]) -> float:
    """``‖a − b‖`` over ``keys``: the task-vector norm when ``b`` is the pretrained model."""
    return squared_distance(a, b, keys) ** 0.5


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor], keys: Iterable[str]) -> float:
    """Inner product of two state dicts over ``keys``, accumulated in float64."""
    total = 0.0
    for k in keys:
        total += float(torch.sum(a[k].double() * b[k].double()))
    return total


def first_non_finite(state: Mapping[str, Tensor], keys: Iterable[str] | None = None) -> str | None:
    """Name of the first floating-point parameter holding NaN or Inf, or None if all are finite."""
    for k in state.keys() if keys is None else keys:
        t = state[k]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return k
    return None


def numel(state: Mapping[str, Tensor], keys: Iterable[str] | None = None) -> int:
    """Number of entries over ``keys`` (default: all)."""
    return sum(state[k].numel() for k in (state.keys() if keys is None else keys))
