"""Continual TIES-Merging (Yadav et al., 2023), as in the OPCM reference code.

θ^(1) = θ0 + λ τ_1; for t ≥ 2, with m = θ^(t−1) − θ0, θ^(t) = θ^(t−1) + λ · TIES([m, τ_t]).
TIES trims each of the two vectors to its top-k% entries by magnitude over the whole
flattened encoder, elects a sign per entry (the sign of the sum of the trimmed values; a
zero sum takes the majority sign of all entries), and sums the trimmed values that agree
with the elected sign.

The reference flattens both vectors into one (2, d) tensor. Here the work is done key by
key, in passes over the parameters: two for each trimming threshold (an exact radix
selection), one for the global majority sign, one for the merge. Memory stays that of
one parameter beyond the merger's state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from merging.methods.base import ContinualMerger, Diagnostic, Option, StepInput


def kth_smallest_magnitude(tensors: Callable[[], Iterable[Tensor]], rank: int) -> float:
    """The ``rank``-th smallest magnitude (1-based) over all entries of ``tensors()``, exactly.

    A radix selection on the bits of float32 magnitudes (ordered like the numbers for
    non-negative values): one pass histograms the high 16 bits, a second the low 16 bits
    inside the bucket that holds the rank. ``tensors`` is called once per pass and its
    tensors are read one at a time, so no flattened copy of the model is ever made, where
    ``torch.kthvalue`` on the flattened vector would need several.
    """
    buckets = 1 << 16

    def bits_of(t: Tensor) -> Tensor:
        return t.detach().float().abs().reshape(-1).view(torch.int32)

    high = torch.zeros(buckets, dtype=torch.int64)
    for t in tensors():
        high += torch.bincount(bits_of(t) >> 16, minlength=buckets).cpu()
    cumulative = high.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, torch.tensor(rank)))
    rank -= int(cumulative[bucket - 1]) if bucket > 0 else 0
    low = torch.zeros(buckets, dtype=torch.int64)
    for t in tensors():
        bits = bits_of(t)
        low += torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=buckets).cpu()
    index = int(torch.searchsorted(low.cumsum(0), torch.tensor(rank)))
    return float(torch.tensor([(bucket << 16) | index], dtype=torch.int32).view(torch.float32))


def magnitude_threshold(tensors: Callable[[], Iterable[Tensor]], numel: int, top_k_percent: float) -> float:
    """The magnitude at or above which the top ``top_k_percent``% entries of all tensors lie.

    Matches the reference: with d entries and k = int(d · top_k / 100), the threshold is
    the (d − k)-th smallest magnitude and entries ≥ it are kept: k + 1 entries when the
    magnitudes are distinct (the reference's off-by-one, kept for fidelity; one entry in
    millions), more when several equal the threshold. Keeping every entry (k ≥ d) returns 0.
    """
    k = int(numel * (top_k_percent / 100.0))
    if numel == 0 or k >= numel:
        return 0.0
    return kth_smallest_magnitude(tensors, numel - k)


def elect_and_merge(trimmed: list[Tensor], sign: Tensor) -> Tensor:
    """Disjoint sum: add the entries of each trimmed vector that agree with the elected sign.

    As in the reference, an entry whose elected sign is 0 keeps the negative values.
    """
    total = torch.zeros_like(trimmed[0])
    positive = sign > 0
    for values in trimmed:
        agrees = torch.where(positive, values > 0, values < 0)
        total += values * agrees
    return total


class TIES(ContinualMerger):
    name: ClassVar[str] = "ties"
    title: ClassVar[str] = "Continual TIES-Merging"
    summary: ClassVar[str] = (
        "Trims the merged and the new task vector to their largest entries, elects a sign per "
        "entry and adds the agreeing values, scaled by λ."
    )
    published_name: ClassVar[str | None] = "continual_ties"
    explanation: ClassVar[str] = (
        r"Trims each of $[\theta^{(t-1)}-\theta_0, \tau_t]$ to its top-$k$% entries, elects a sign per entry "
        r"and sums the agreeing ones, scaled by $\lambda$."
    )
    diagnostics: ClassVar[tuple[Diagnostic, ...]] = (
        Diagnostic("kept_threshold_merged", float, "magnitude below which the merged vector's entries were trimmed"),
        Diagnostic("kept_threshold_task", float, "magnitude below which the new task vector's entries were trimmed"),
    )
    options: ClassVar[tuple[Option, ...]] = (
        Option("scaling", 0.3, "λ applied to the TIES-merged vector", minimum=0.0, exclusive_minimum=True),
        Option(
            "top_k",
            20.0,
            "percent of entries (by magnitude) each vector keeps",
            minimum=0.0,
            maximum=100.0,
            exclusive_minimum=True,
        ),
    )

    def _merge(self, step: StepInput) -> dict[str, Any]:
        incoming = step.checkpoint
        scaling, top_k = self.config["scaling"], self.config["top_k"]
        keys, p0, merged = self.merge_keys, self.pretrained, self.merged
        if self.step_count == 1:
            for k in keys:
                merged[k].add_(incoming[k] - p0[k], alpha=scaling)
            return {}

        def merged_delta(k: str) -> Tensor:
            return merged[k] - p0[k]

        def task_delta(k: str) -> Tensor:
            return incoming[k] - p0[k]

        numel = sum(p0[k].numel() for k in keys)
        threshold_m = magnitude_threshold(lambda: (merged_delta(k) for k in keys), numel, top_k)
        threshold_t = magnitude_threshold(lambda: (task_delta(k) for k in keys), numel, top_k)

        def trimmed(k: str) -> list[Tensor]:
            m, t = merged_delta(k), task_delta(k)
            return [m * (m.abs() >= threshold_m), t * (t.abs() >= threshold_t)]

        sign_total = 0.0
        for k in keys:
            m, t = trimmed(k)
            sign_total += float(torch.sign(m + t).sum(dtype=torch.float64))
        majority = float(torch.sign(torch.tensor(sign_total)))

        for k in keys:  # each key's update depends only on its own trimmed values
            m, t = trimmed(k)
            sign = torch.sign(m + t)
            sign[sign == 0] = majority
            merged[k].add_(elect_and_merge([m, t], sign), alpha=scaling)
        return {"kept_threshold_merged": threshold_m, "kept_threshold_task": threshold_t}
