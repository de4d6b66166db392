"""Live analysis of a continual run: after every step, the new task vector's cosines and a layer's spectra.

After step t the lab shows (1) the cosine similarity of the new task vector τ_t with every
earlier task vector τ_i and with each method's merged delta Δ_m = θ_m − θ0, (2) the singular
values of one chosen layer of τ_t and of every Δ_m. The run keeps θ0 and each method's merged
model anyway, so everything that involves only τ_t and the Δ_m is **exact** (sums over every
parameter, float64 across chunks of 4096). Earlier task vectors are **not kept**: a continual
run must not hold T encoders. For ⟨τ_t, τ_i⟩ (and ⟨Δ_m, τ_i⟩, i < t) each task vector leaves a
count sketch behind.

**The sketch.** Every coordinate j of the flattened encoder (d entries, 88 M for ViT-B/32) gets
a bucket h(j) ∈ {0 … k−1} and a sign s(j) = ±1 from a generator seeded by the parameter's
name and a run-wide seed, so every vector of the run is hashed alike: S(x)_b = Σ_{h(j)=b} s(j) x_j.
⟨S(a), S(b)⟩ is an unbiased estimate of ⟨a, b⟩ whose variance is at most
(‖a‖²‖b‖² + ⟨a, b⟩²)/k (Charikar et al. 2002; Weinberger et al. 2009). Norms are exact, so the
cosine's error ``S(a)·S(b)/(‖a‖‖b‖) − cos(a, b)`` has mean 0 and a standard deviation of at most
√((1 + cos²)/k) ≤ √(2/k), whatever d and whatever the vectors look like.

With k = 2¹⁹ (:data:`SKETCH_DIMENSION`) that standard deviation is at most 0.00195, so an error
of 0.01 is 5.1 standard deviations: under the normal approximation (the estimate is a sum over
hundreds of thousands of buckets) the chance is below 3·10⁻⁷ per pair, and even by Chebyshev's
inequality alone (no assumption on the distribution) below 0.04. ``tests/test_analysis.py``
checks |error| ≤ 0.01 over every pair of realistic task vectors with a fixed seed, and that
a sketch of 2¹² buckets misses it. A sketch costs 2 MiB per task (float32), against 335 MiB
for a ViT-B/32 task vector; an encoder with at most k entries is kept whole instead, which is
both smaller than the sketch and exact (the mini benchmark's first 96-wide tower, 468 k entries,
was; its 192-wide tower, 931 k, is sketched like a real one).

Memory in T: the k floats per earlier task, its norm and a few numbers per step. The hash is
generated again for each parameter at each step (one parameter at a time), not stored.
Per step the work is O(d (M + 1)) for M methods plus one SVD of the chosen layer per vector;
``benchmarks/live_analysis.py`` measures it at ViT-B/32 scale: about 1.6 s per step on one
CPU thread with one method (16× task arithmetic's in-memory merge step, a pass over the
encoder), 2.5–3 s with two (a sixth of OPCM's 17 s merge step measured beside it).
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from merging.compute.parallel import map_on_threads
from merging.errors import MergingError
from merging.experiment.results import AnalysisStep

if TYPE_CHECKING:
    from merging.experiment.runner import ContinualRun, StepReport
    from merging.families.base import ModelFamily

SKETCH_DIMENSION = 2**19  # buckets k: cosine error ≤ √(2/k) ≈ 0.00195 standard deviation (module docstring)
SKETCH_SEED = 0

# How the layer list orders a block's matrices: attention (q, k, v, out), then the MLP.
TYPE_ORDER = ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.c_fc", "mlp.c_proj")
_NUMBER = re.compile(r"(?:^|\.)(\d+)(?=\.)")


def cosine_error_bound(dimension: int = SKETCH_DIMENSION) -> float:
    """The largest standard deviation of a sketched cosine's error, √(2/k) (module docstring)."""
    return (2.0 / dimension) ** 0.5


# ------------------------------------------------------------------ layers


def layer_name(label: str, kind: str) -> str:
    """How the page names a matrix: ``block 3 · mlp.c_fc`` (``kind`` is the family's matrix type)."""
    match = _NUMBER.search(label)
    return f"block {match.group(1)} · {kind}" if match else kind


def layer_choices(labels: Iterable[str], kind: Callable[[str], str]) -> list[tuple[str, str]]:
    """(name, label) for every matrix, grouped by block and, within a block, by type (attention first).

    ``kind`` is the family's :meth:`~merging.families.base.ModelFamily.matrix_type`. The names
    are what the page's layer list shows; the labels are what the analysis and the API take.
    """

    def order(label: str) -> tuple[int, int, str]:
        match = _NUMBER.search(label)
        block = int(match.group(1)) if match else -1
        type_name = kind(label)
        rank = TYPE_ORDER.index(type_name) if type_name in TYPE_ORDER else len(TYPE_ORDER)
        return block, rank, label

    return [(layer_name(label, kind(label)), label) for label in sorted(labels, key=order)]


def check_layer(layer: object, labels: Sequence[str], default: str | None) -> str:
    """The chosen layer (``None`` or ``""``: the family's default), or one error naming the bad value."""
    if layer is None or layer == "":
        if default is None:
            raise MergingError("this encoder has no matrices whose spectra could be shown")
        return default
    if not isinstance(layer, str) or layer not in labels:
        shown = repr(layer) if not isinstance(layer, str) else repr(layer[:200])
        example = f" such as {labels[-1]!r}" if labels else ""
        raise MergingError(f"no matrix {shown} in this encoder: choose one of its {len(labels)} matrices{example}")
    return layer


# ------------------------------------------------------------------ the sketch


class CountSketch:
    """A seeded count sketch of vectors that arrive one parameter at a time.

    ``sizes`` (parameter name → number of entries, in a fixed order) fixes the vector; with at
    most ``dimension`` entries in all the "sketch" is the vector itself (exact, and smaller).
    Every vector sketched with the same sizes, dimension, seed and device is hashed alike, so
    inner products of sketches estimate inner products of the vectors (module docstring).
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        dimension: int = SKETCH_DIMENSION,
        seed: int = SKETCH_SEED,
        device: torch.device | str = "cpu",
    ):
        if dimension < 1 or dimension & (dimension - 1) or dimension > 2**30:
            raise ValueError(f"a sketch's number of buckets is a power of two up to 2^30, not {dimension}")
        self.sizes = dict(sizes)
        self.total = sum(self.sizes.values())
        self.exact = self.total <= dimension
        self.dimension = self.total if self.exact else dimension
        self.seed = seed
        self.device = torch.device(device)
        self._offsets: dict[str, int] = {}
        offset = 0
        for key, size in self.sizes.items():
            self._offsets[key] = offset
            offset += size

    def empty(self) -> Tensor:
        """A zero sketch to accumulate into (float32, on the sketch's device)."""
        return torch.zeros(self.dimension, dtype=torch.float32, device=self.device)

    def hashes(self, key: str) -> tuple[Tensor, Tensor] | None:
        """The buckets (int32) and signs (±1.0) of parameter ``key``'s entries, from one draw
        r ∈ [0, 2k) per entry: bucket r mod k, sign − when r ≥ k (k is a power of two).

        Drawn again on each call from a generator seeded by (seed, name), so nothing of size d
        is kept between parameters; None for an exact sketch.
        """
        if self.exact:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed * 0x9E3779B1 + zlib.crc32(key.encode()))
        draw = torch.randint(
            0, 2 * self.dimension, (self.sizes[key],), generator=generator, device=self.device, dtype=torch.int32
        )
        shift = self.dimension.bit_length() - 1
        signs = (draw >> shift).mul_(-2).add_(1).to(torch.float32)
        return draw.bitwise_and_(self.dimension - 1), signs

    def add(self, sketch: Tensor, key: str, values: Tensor, hashes: tuple[Tensor, Tensor] | None = None) -> None:
        """Add parameter ``key`` of a vector (``values``, any shape) into ``sketch`` in place.

        ``hashes`` from :meth:`hashes` lets several vectors share one draw per parameter.
        """
        flat = values.reshape(-1).to(self.device, torch.float32)
        if flat.numel() != self.sizes[key]:
            raise ValueError(f"{key} has {flat.numel()} entries, not {self.sizes[key]}")
        if self.exact:
            start = self._offsets[key]
            sketch[start : start + flat.numel()] += flat
            return
        buckets, signs = self.hashes(key) if hashes is None else hashes  # type: ignore[misc]
        sketch.index_add_(0, buckets, flat * signs)

    def sketch(self, vector: Mapping[str, Tensor]) -> Tensor:
        """The sketch of a whole vector given as parameters (every key of ``sizes``)."""
        out = self.empty()
        for key in self.sizes:
            self.add(out, key, vector[key])
        return out


def sketched_cosine(a: Tensor, b: Tensor, norm_a: float, norm_b: float) -> float:
    """cos(a, b) from two sketches and the exact norms (0 when either vector is zero), clipped to [−1, 1]."""
    if norm_a <= 0 or norm_b <= 0:
        return 0.0
    value = float(torch.dot(a.double(), b.double())) / (norm_a * norm_b)
    return max(-1.0, min(1.0, value))


# ------------------------------------------------------------------ the live analysis


class LiveAnalysis:
    """What the live analysis keeps between steps, and one step's analysis.

    Between steps it holds, per earlier task, a sketch of k floats and the exact norm, and
    nothing else that grows with T (:meth:`held_tensors`). :meth:`observe` reads the new
    checkpoint one parameter at a time.
    """

    def __init__(
        self,
        layer: Callable[[], str | None] | str | None = None,
        dimension: int = SKETCH_DIMENSION,
        seed: int = SKETCH_SEED,
    ):
        self._layer = layer if callable(layer) else (lambda: layer)
        self.dimension = dimension
        self.seed = seed
        self.sketcher: CountSketch | None = None
        self.task_sketches: list[Tensor] = []
        self.task_norms: list[float] = []

    def held_tensors(self) -> list[Tensor]:
        """Every tensor kept between steps: one sketch per earlier task (the only thing that grows with T)."""
        return list(self.task_sketches)

    def observe(
        self,
        step: int,
        task: str,
        checkpoint: Mapping[str, Tensor],
        pretrained: Mapping[str, Tensor],
        merged: Mapping[str, Mapping[str, Tensor]],
        keys: Sequence[str],
        family: ModelFamily,
    ) -> AnalysisStep:
        """Analyse step ``step`` (1-based): τ_t = checkpoint − pretrained against the earlier task
        vectors and each method's merged delta ``merged[m] − pretrained``, and the chosen layer's spectra.

        ``keys`` are the parameters the methods merge; ``family`` (a
        :class:`~merging.families.base.ModelFamily`) names the matrices. Reads one parameter of
        the checkpoint at a time; keeps τ_t's sketch and norm for later steps.
        """
        started = time.perf_counter()
        if step != len(self.task_norms) + 1:
            raise ValueError(f"step {step} analysed after {len(self.task_norms)} steps")
        labels = family.matrix_labels(keys)
        layer = check_layer(self._layer(), labels, family.default_spectrum_label(keys))
        device = next(iter(pretrained.values())).device if pretrained else torch.device("cpu")
        if self.sketcher is None:
            self.sketcher = CountSketch(
                {k: pretrained[k].numel() for k in keys}, self.dimension, self.seed, device=device
            )
        sketcher = self.sketcher
        methods = list(merged)

        def accumulate(group: Sequence[str]) -> _Sums:
            """Sketches, inner products and the layer's matrices over one group of parameters."""
            sums = _Sums(sketcher, methods)
            for key in group:
                base = pretrained[key]
                tau = checkpoint[key].to(base.device, torch.float32) - base
                deltas = {m: merged[m][key] - base for m in methods}
                draw = sketcher.hashes(key)
                sketcher.add(sums.task_sketch, key, tau, draw)
                sums.task_sq += inner(tau, tau)
                for m, delta in deltas.items():
                    sketcher.add(sums.merged_sketches[m], key, delta, draw)
                    sums.merged_sq[m] += inner(delta, delta)
                    sums.task_dot[m] += inner(tau, delta)
                for a, b in sums.pair_dot:
                    sums.pair_dot[(a, b)] += inner(deltas[a], deltas[b])
                if any(label == layer for label, _ in family.matrix_views(key, base)):
                    sums.task_layer = family.get_matrix({key: tau}, layer).clone()
                    sums.merged_layer = {m: family.get_matrix({key: d}, layer).clone() for m, d in deltas.items()}
                del tau, deltas, draw
            return sums

        # one group of parameters per thread of the run's share (in order on one thread or a GPU)
        groups = _balanced_groups(keys, sketcher.sizes, max(1, min(4, torch.get_num_threads())))
        sums = _Sums.total(map_on_threads(accumulate, groups, device), sketcher, methods)
        task_sketch, merged_sketches = sums.task_sketch, sums.merged_sketches
        task_sq, merged_sq, task_dot, pair_dot = sums.task_sq, sums.merged_sq, sums.task_dot, sums.pair_dot
        task_layer, merged_layer = sums.task_layer, sums.merged_layer
        # the sketches are compared on the CPU, where the earlier ones are kept (2 MiB each)
        task_sketch = task_sketch.cpu()
        merged_sketches = {m: v.cpu() for m, v in merged_sketches.items()}
        task_norm = task_sq**0.5
        merged_norms = {m: merged_sq[m] ** 0.5 for m in methods}
        task_cosines = [
            sketched_cosine(task_sketch, s, task_norm, n)
            for s, n in zip(self.task_sketches, self.task_norms, strict=True)
        ]
        merged_cosines = {}
        for m in methods:
            earlier = [
                sketched_cosine(merged_sketches[m], s, merged_norms[m], n)
                for s, n in zip(self.task_sketches, self.task_norms, strict=True)
            ]
            merged_cosines[m] = [*earlier, _cosine(task_dot[m], merged_norms[m], task_norm)]
        merged_pairs = {
            a: {b: _cosine(pair_dot[(a, b)], merged_norms[a], merged_norms[b]) for (x, b) in pair_dot if x == a}
            for a in methods
        }
        spectra_of = {m: _singular_values(v) for m, v in merged_layer.items()}
        task_spectrum = _singular_values(task_layer) if task_layer is not None else []
        self.task_sketches.append(task_sketch)
        self.task_norms.append(task_norm)
        return AnalysisStep(
            step=step,
            task=task,
            layer=layer,
            layer_name=layer_name(layer, family.matrix_type(layer)),
            task_norm=task_norm,
            task_cosines=task_cosines,
            merged_norms=merged_norms,
            merged_cosines=merged_cosines,
            merged_pairs={a: row for a, row in merged_pairs.items() if row},
            task_spectrum=task_spectrum,
            merged_spectra=spectra_of,
            exact=sketcher.exact,
            sketch_dimension=sketcher.dimension,
            seconds=time.perf_counter() - started,
        )

    def observe_run(self, run: ContinualRun, report: StepReport) -> AnalysisStep:
        """Analyse the step a :class:`~merging.experiment.runner.ContinualRun` just reported (every
        method has merged its checkpoint) and record it in the run's results."""
        mergers = [m for m in run.mergers.values() if m.merged]
        if not mergers:
            raise MergingError("no method has a merged model to analyse")
        first = mergers[0]
        merged = {name: m.merged for name, m in run.mergers.items() if m.merged}
        analysed = self.observe(
            report.step,
            report.task,
            run.readers[report.step - 1],
            first.pretrained,
            merged,
            list(first.merge_keys),
            run.experiment.family,
        )
        run.record.analysis.append(analysed)
        return analysed


class _Sums:
    """What :meth:`LiveAnalysis.observe` accumulates over a group of parameters; groups add up."""

    def __init__(self, sketcher: CountSketch, methods: Sequence[str]):
        self.task_sketch = sketcher.empty()
        self.merged_sketches = {m: sketcher.empty() for m in methods}
        self.task_sq = 0.0
        self.merged_sq = dict.fromkeys(methods, 0.0)
        self.task_dot = dict.fromkeys(methods, 0.0)  # ⟨τ_t, Δ_m⟩, exact
        self.pair_dot = {(a, b): 0.0 for i, a in enumerate(methods) for b in methods[i + 1 :]}  # ⟨Δ_a, Δ_b⟩
        self.task_layer: Tensor | None = None
        self.merged_layer: dict[str, Tensor] = {}

    @classmethod
    def total(cls, parts: Sequence[_Sums], sketcher: CountSketch, methods: Sequence[str]) -> _Sums:
        if len(parts) == 1:
            return parts[0]
        out = cls(sketcher, methods)
        for part in parts:
            out.task_sketch += part.task_sketch
            out.task_sq += part.task_sq
            for m in methods:
                out.merged_sketches[m] += part.merged_sketches[m]
                out.merged_sq[m] += part.merged_sq[m]
                out.task_dot[m] += part.task_dot[m]
            for pair in out.pair_dot:
                out.pair_dot[pair] += part.pair_dot[pair]
            if part.task_layer is not None:
                out.task_layer, out.merged_layer = part.task_layer, part.merged_layer
        return out


def _balanced_groups(keys: Sequence[str], sizes: Mapping[str, int], count: int) -> list[list[str]]:
    """``keys`` in ``count`` groups of about equal total size (largest first onto the lightest group)."""
    groups: list[list[str]] = [[] for _ in range(max(1, min(count, len(keys))))]
    totals = [0] * len(groups)
    for key in sorted(keys, key=lambda k: -sizes[k]):
        lightest = totals.index(min(totals))
        groups[lightest].append(key)
        totals[lightest] += sizes[key]
    return [g for g in groups if g]


INNER_CHUNK = 4096


def inner(a: Tensor, b: Tensor) -> float:
    """⟨a, b⟩ of two float32 tensors, in float32 over chunks of 4096 entries and float64 across them.

    As accurate as a float64 product for cosines (relative error about 10⁻⁸ on task vectors)
    at a fifth of its cost: converting every parameter to float64 was most of a step's time.
    """
    x, y = a.reshape(-1), b.reshape(-1)
    whole = x.numel() - x.numel() % INNER_CHUNK
    total = float((x[:whole].view(-1, INNER_CHUNK) * y[:whole].view(-1, INNER_CHUNK)).sum(1).double().sum())
    return total + float(x[whole:].double() @ y[whole:].double())


def _cosine(dot: float, norm_a: float, norm_b: float) -> float:
    if norm_a <= 0 or norm_b <= 0:
        return 0.0
    return max(-1.0, min(1.0, dot / (norm_a * norm_b)))


def _singular_values(matrix: Tensor) -> list[float]:
    return torch.linalg.svdvals(matrix.double()).cpu().tolist()


@dataclass
class CosineTable:
    """The square cosine matrix the heatmap shows after a step: task vectors, then merged deltas."""

    names: list[str]
    values: list[list[float]]
    sketched: bool  # whether some τ_i entries (i < t) come from the sketch


def cosine_table(steps: Sequence[AnalysisStep]) -> CosineTable:
    """The cosine matrix after the last of ``steps``: τ_1 … τ_t (each row as it was computed when
    its task entered), then each method's current merged delta against all of them and each other."""
    if not steps:
        return CosineTable([], [], False)
    last = steps[-1]
    t = len(steps)
    methods = list(last.merged_norms)
    names = [f"τ{s.step} {s.task}" for s in steps] + [f"merged {m}" for m in methods]
    size = t + len(methods)
    values = [[0.0] * size for _ in range(size)]
    for i in range(size):
        values[i][i] = 1.0
    for i, s in enumerate(steps):
        for j, value in enumerate(s.task_cosines[:i]):
            values[i][j] = values[j][i] = value
    for a, m in enumerate(methods):
        row = t + a
        for j, value in enumerate(last.merged_cosines.get(m, [])[:t]):
            values[row][j] = values[j][row] = value
        for b, value in last.merged_pairs.get(m, {}).items():
            if b in methods:
                col = t + methods.index(b)
                values[row][col] = values[col][row] = value
    sketched = not all(s.exact for s in steps) and t > 1
    return CosineTable(names, values, sketched)
