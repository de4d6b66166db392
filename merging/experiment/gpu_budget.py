"""How much GPU memory one sweep trial needs, and how many trials fit on each GPU under a budget.

A sweep on CUDA runs several trials on one GPU when they fit. Whether they fit is decided
before any trial starts, from what a trial really holds on its device, as a formula of the
encoder's size and the trial's method, options, task count and images (:func:`estimate_trial`).
With E the encoder's parameters in float32 bytes (4 × its parameter count):

    peak ≈ c(method, options) × E + W(method) + g(method) × T        the merger
         + tower                                                    the evaluator's tower copy
         + B × a_eval                                               one evaluation batch
         + [tower + b × a_train + pools]                            data-driven methods only
         + [CUDA context]                                           a trial in its own process (Ray)

- c counts the encoder-sized float32 copies the method holds at its step's peak, read from its
  module (:data:`COPIES`): θ0 and the merged encoder for every method, plus one for θ_t as it
  arrives (a parameter at a time for the element-wise methods, and the per-parameter
  temporaries; whole for the teachers of OTMF and MINGLE), plus the method's own state:
  MagMax's running vector (4); OTMF's two scaled deltas, two masks, their gradient (one under
  the alternating schedule, two under joint), Adam's two moments per mask, the best masks
  (keep=best) and θ(M) (14 at its defaults); OPCM's bases are counted exactly in W.
- W is working memory that is not a whole copy, from the method's own constants and the
  encoder's matrix shapes: OPCM's bases of the merged delta (V and s per matrix, Σ (n² + n) × 4
  over its tall m × n matrices) and, on CUDA, a stack of float64 Gram matrices
  (:data:`merging.methods.opcm.EIGH_BATCH_BYTES` at most) with its eigenvectors; DOP's chunk of
  stacked matrices (:func:`merging.methods.dop.chunk_size`: 24 float32 copies of a matrix and
  four operators of its longer side squared, per matrix of the chunk).
- g is what one more task adds (:meth:`ContinualMerger.per_task_bytes`: MINGLE's experts, gates
  and subspace columns; 0 for the others), T the trial's number of checkpoints.
- tower is the image tower's parameter bytes: the evaluator's own copy, and for data-driven
  methods (OTMF, MINGLE) the merge context's too.
- B × a_eval: one evaluation batch (B = min(1024, the largest image set), the evaluator's CUDA
  batch) of S × S images with N = (S / patch)² + 1 tokens of width D, MLP width M and H heads,
  per image 7 × 3S² bytes (the uint8 batch, its float32 normalisation and the bfloat16 copy
  autocast makes) plus 4 × (4ND + 2NM + 2HN²) bytes for the largest layer's live activations
  (counted at 4 bytes although autocast stores most in bfloat16).
- b × a_train: data-driven methods back-propagate through the tower: b images (OTMF's
  batch_size, MINGLE's) with every layer's saved activations, L × 4 × (10ND + 3NM + 3HN²) bytes
  per image; pools: OTMF's two image pools on the device (uint8, at most
  ``_POOL_ON_DEVICE_BYTES`` each) or MINGLE's seed images (float32).
- A Ray trial runs in a worker process of its own, which holds a CUDA context
  (:data:`CUDA_CONTEXT_BYTES`, an allowance: 300–600 MiB depending on the GPU and CUDA version);
  the local pool's threads share the process's one context, which is already there.

The terms are added, so the estimate bounds the peak from above: the merge's working memory
and the evaluation batch are not held at the same time, and element-wise methods hold θ_t one
parameter at a time. The estimate is in :class:`Estimate` with each term, for messages.

The budget (``--gpu-memory-budget``) is per GPU: a fraction of the memory free on it when the
sweep starts (default :data:`DEFAULT_FRACTION`; memory this process's allocator holds unused
counts as free), or an amount in GiB. The local pool keeps, per GPU, the estimates of the
trials running there within its budget (:class:`GpuSlots`: a trial waits for room instead of
oversubscribing); the Ray backend asks for ``1/k`` of a GPU per trial, where k trials fit in
the budget (:func:`ray_gpu_fraction`), so Ray packs them the same way.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from merging.errors import MergingError
from merging.evaluation.evaluator import CUDA_BATCH  # the evaluator's batch on CUDA

if TYPE_CHECKING:
    from merging.evaluation.backbones import Backbone
    from merging.experiment.sweep import Trial
    from merging.experiment.sweep_runner import SharedInputs

GIB = 1 << 30
MIB = 1 << 20
DEFAULT_FRACTION = 0.9
# A CUDA context in a process of its own (a Ray worker): an allowance, not measured here.
CUDA_CONTEXT_BYTES = 512 * MIB
# Copies counted for a method this module has no count for (OTMF's order, the largest known).
UNKNOWN_METHOD_COPIES = 16
# Ray accepts fractional resources to four decimals.
RAY_FRACTION_STEP = 10_000


# ---------------------------------------------------------------- the budget


@dataclass(frozen=True)
class Budget:
    """A per-GPU memory budget: a ``fraction`` of the free memory, or an ``amount`` in bytes."""

    fraction: float | None = DEFAULT_FRACTION
    amount: int | None = None

    def describe(self) -> str:
        if self.amount is not None:
            return f"--gpu-memory-budget {gib(self.amount)}"
        return f"{self.fraction:g} of the free memory"

    def of(self, free: int) -> int:
        """The budget on a GPU with ``free`` bytes free."""
        if self.amount is not None:
            return self.amount
        assert self.fraction is not None
        return int(free * self.fraction)


BUDGET_FORM = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(GiB|G|%)?\s*$", re.IGNORECASE)


def parse_budget(text: str | None) -> Budget:
    """``--gpu-memory-budget``: a fraction in (0, 1] (``0.9``) or ``90%``, or an amount (``40GiB``, ``40G``).

    None is the default, :data:`DEFAULT_FRACTION` of the free memory. A bare number above 1 is
    refused rather than guessed at (a fraction of 1 is all the free memory; 1 GiB is ``1GiB``).
    """
    if text is None:
        return Budget()
    match = BUDGET_FORM.match(str(text))
    if not match:
        raise MergingError(
            f"--gpu-memory-budget {text!r} is not a fraction of the free memory (0.9, 90%) or an amount in GiB (40GiB)"
        )
    value, unit = float(match.group(1)), (match.group(2) or "").lower()
    if unit in ("gib", "g"):
        if not 0 < value < 1 << 20:
            raise MergingError(f"--gpu-memory-budget {text!r} must be more than 0 GiB and less than a million")
        return Budget(fraction=None, amount=int(value * GIB))
    if unit == "%":
        value /= 100
    if not 0 < value <= 1:
        hint = f"; for an amount write {match.group(1)}GiB" if value > 1 and unit != "%" else ""
        raise MergingError(f"--gpu-memory-budget {text!r}: a fraction of the free memory must be in (0, 1]{hint}")
    return Budget(fraction=value)


def gib(size: float) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB / 10 else f"{size / MIB:.1f} MiB"


def free_memory(index: int) -> int:
    """Bytes GPU ``index`` can still give this process: free on the device, plus what its allocator caches unused."""
    free, _ = torch.cuda.mem_get_info(index)
    cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    return int(free) + max(0, int(cached))


def gpu_budgets(budget: Budget, count: int | None = None) -> list[int]:
    """The budget in bytes on each of the first ``count`` visible GPUs (default: all), measured now."""
    count = torch.cuda.device_count() if count is None else count
    return [budget.of(free_memory(i)) for i in range(count)]


def fits(need: int, budget: int) -> int:
    """How many trials needing ``need`` bytes each fit in ``budget`` bytes of one GPU."""
    return budget // max(1, need)


# ---------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Estimate:
    """One trial's estimated peak GPU memory: the total and its labelled terms (bytes)."""

    trial: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        terms = " + ".join(f"{gib(size)} {label}" for label, size in self.parts.items() if size)
        return f"about {gib(self.total)} (= {terms})"


@dataclass(frozen=True)
class Copies:
    """The encoder-sized float32 copies a method holds at its step's peak, and what they are."""

    count: int
    what: str


def _otmf_copies(options: Mapping[str, Any]) -> Copies:
    if options["masks"] == "off" or options["steps"] == 0:
        return Copies(5, "θ0, merged, θ_t, the two scaled deltas")
    gradients = 2 if options["schedule"] == "joint" else 1
    best = 2 if options["keep"] == "best" else 0
    count = 2 + 2 + 2 + gradients + 4 + best + 1
    return Copies(count, "θ0, merged, 2 scaled deltas, 2 masks, their gradients, Adam's moments, best masks, θ(M)")


# Read from each method's module; tests/test_gpu_budget.py checks every registered method has one.
COPIES: dict[str, Callable[[Mapping[str, Any]], Copies]] = {
    "weight_average": lambda o: Copies(3, "θ0, merged, θ_t"),
    "task_arithmetic": lambda o: Copies(3, "θ0, merged, θ_t"),
    "ties": lambda o: Copies(3, "θ0, merged, θ_t and the per-parameter trimmed vectors"),
    "magmax": lambda o: Copies(4, "θ0, merged, the running vector v, θ_t"),
    "opcm": lambda o: Copies(3, "θ0, merged, θ_t"),
    "dop": lambda o: Copies(3, "θ0, merged, θ_t"),
    "nufilt": lambda o: Copies(3, "θ0, merged, θ_t and one matrix's SVD and adapter"),
    "mingle": lambda o: Copies(3, "θ0, merged, θ_t for the teacher"),
    "otmf": _otmf_copies,
}


def method_copies(method: str, options: Mapping[str, Any]) -> Copies:
    """The copies of :data:`COPIES` for ``method`` at ``options`` (all its options, defaults filled in)."""
    count = COPIES.get(method)
    if count is None:
        return Copies(UNKNOWN_METHOD_COPIES, f"no count for {method}: {UNKNOWN_METHOD_COPIES} assumed")
    return count(options)


def tall_matrix_shapes(meta: Mapping[str, torch.Tensor], family: Any) -> list[tuple[int, int]]:
    """Every matrix of the encoder (as the family sees them) as a tall shape (m ≥ n)."""
    shapes = []
    for key, tensor in meta.items():
        for _, view in family.matrix_views(key, tensor):
            m, n = view.shape
            shapes.append((max(m, n), min(m, n)))
    return shapes


def opcm_work_bytes(shapes: Sequence[tuple[int, int]], on_cuda: bool = True) -> int:
    """OPCM's bases (V and s per matrix, float32) and, on CUDA, its largest Gram stack with the eigenvectors."""
    from merging.methods.opcm import EIGH_BATCH_BYTES

    bases = sum(4 * (n * n + n) for _, n in shapes)
    if not on_cuda:
        return bases
    by_width: dict[int, int] = {}
    for _, n in shapes:
        by_width[n] = by_width.get(n, 0) + 1
    stack = 0
    for n, count in by_width.items():
        if n == 0:
            continue
        most = max(1, EIGH_BATCH_BYTES // (8 * n * n))
        per_batch = math.ceil(count / math.ceil(count / most))
        stack = max(stack, per_batch * 8 * n * n)
    return bases + 2 * stack


def dop_work_bytes(shapes: Sequence[tuple[int, int]]) -> int:
    """DOP's largest chunk: matrices of one shape optimised together, each 24 copies and four operators."""
    from merging.methods.dop import chunk_size

    by_shape: dict[tuple[int, int], int] = {}
    for shape in shapes:
        by_shape[shape] = by_shape.get(shape, 0) + 1
    work = 0
    for shape, count in by_shape.items():
        per_matrix = 24 * math.prod(shape) * 4 + 4 * max(shape) ** 2 * 4
        work = max(work, min(count, chunk_size(shape)) * per_matrix)
    return work


def eval_bytes_per_image(image_size: int, tokens: int, width: int, mlp_width: int, heads: int) -> int:
    """One image of an evaluation batch: its input copies and the largest layer's live activations."""
    pixels = 3 * image_size * image_size
    return 7 * pixels + 4 * (4 * tokens * width + 2 * tokens * mlp_width + 2 * heads * tokens * tokens)


def train_bytes_per_image(layers: int, tokens: int, width: int, mlp_width: int, heads: int, image_size: int) -> int:
    """One image back-propagated through the tower: every layer's saved activations, float32, and its input."""
    per_layer = 10 * tokens * width + 3 * tokens * mlp_width + 3 * heads * tokens * tokens
    return 4 * layers * per_layer + 4 * 3 * image_size * image_size


def _meta_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, device="meta") for k, v in backbone.model.visual.state_dict().items()}


def estimate_trial(trial: Trial, shared: SharedInputs, own_process: bool = False) -> Estimate:
    """The formula of this module's docstring for ``trial`` over the sweep's shared inputs."""
    from merging.families import family_of
    from merging.methods import create_merger

    backbone = shared.backbone
    arch = backbone.arch
    meta = _meta_state(backbone)
    encoder = 4 * sum(v.numel() for v in meta.values())
    tower = sum(p.numel() * p.element_size() for p in backbone.model.visual.state_dict().values())
    merger = create_merger(trial.point.method, trial.point.options)
    options = merger.config
    copies = method_copies(trial.point.method, options)
    try:  # shapes only: what one more task adds
        merger.start(meta, "meta")
        growth = merger.per_task_bytes() * len(trial.config.checkpoints)
    except Exception:  # a method that cannot start without data (none of this library's) adds nothing known
        growth = 0
    family = merger.family or family_of(meta.keys(), "the pretrained encoder")
    shapes = tall_matrix_shapes(meta, family)
    work = 0
    if trial.point.method == "opcm":
        work = opcm_work_bytes(shapes)
    elif trial.point.method == "dop":
        work = dop_work_bytes(shapes)

    size, tokens = arch.image_size, (arch.image_size // arch.patch_size) ** 2 + 1
    largest = max((s.images.shape[0] for s in shared.images.values()), default=CUDA_BATCH)
    batch = min(CUDA_BATCH, max(1, largest))
    per_image = eval_bytes_per_image(size, tokens, arch.width, arch.mlp_width, arch.heads)
    parts = {
        f"for {copies.count} encoder copies of {gib(encoder)} ({copies.what})": copies.count * encoder,
        f"{trial.point.method}'s working memory": work,
        f"{len(trial.config.checkpoints)} tasks' added state": growth,
        "evaluator tower": tower,
        f"evaluation batch of {batch}": batch * per_image,
    }
    if merger.requires_data:
        train_batch = int(options.get("batch_size", 16))
        per_train = train_bytes_per_image(arch.layers, tokens, arch.width, arch.mlp_width, arch.heads, size)
        image = 3 * size * size
        if trial.point.method == "otmf":
            from merging.methods.otmf import _POOL_ON_DEVICE_BYTES

            pools = 2 * min(largest * image, _POOL_ON_DEVICE_BYTES)
        else:  # MINGLE's seed images, float32 on the device: at most the task's sample
            pools = largest * image * 4
        parts["merge context tower"] = tower
        parts[f"training batch of {train_batch}"] = train_batch * per_train
        parts["image pools"] = pools
    if own_process:
        parts["CUDA context"] = CUDA_CONTEXT_BYTES
    return Estimate(trial.name, parts)


def check_fit(estimate: Estimate, budgets: Sequence[int], budget: Budget) -> None:
    """Raise a one-line error when ``estimate`` fits in no GPU's budget."""
    room = max(budgets, default=0)
    if estimate.total <= room:
        return
    where = "no GPU is visible" if not budgets else f"{gib(room)} per GPU: {budget.describe()}"
    raise MergingError(
        f"trial {estimate.trial} needs {estimate.describe()} of GPU memory, more than the budget ({where}); "
        "lower --samples, raise --gpu-memory-budget, or run it with --device cpu"
    )


# ---------------------------------------------------------------- the local pool's slots


class GpuSlots:
    """Per GPU, the estimates of the trials running there, kept within its budget.

    :meth:`acquire` blocks until the trial fits on some GPU, and picks the one with the most
    room left; trials are served first come, first served, so a large trial is not passed over
    for ever by small ones. :meth:`release` gives the room back.
    """

    def __init__(self, budgets: Sequence[int]):
        self.budgets = list(budgets)
        self.used = [0] * len(budgets)
        self.running = [0] * len(budgets)
        self.peak = [0] * len(budgets)  # the most trials that ran at once on each GPU
        self._lock = threading.Condition()
        self._queue: list[object] = []

    def where(self, need: int) -> int | None:
        """The GPU with the most room that ``need`` fits on now, or None."""
        rooms = [(budget - used, -i) for i, (budget, used) in enumerate(zip(self.budgets, self.used, strict=True))]
        room, index = max(rooms, default=(0, 0))
        return -index if need <= room else None

    def acquire(self, need: int, stop: threading.Event | None = None, poll: float = 0.1) -> int | None:
        """Wait for room for ``need`` bytes; the GPU's index, or None when ``stop`` was set meanwhile."""
        if need > max(self.budgets, default=0):
            raise ValueError(f"{need} bytes fit on no GPU (budgets {self.budgets})")
        ticket = object()
        with self._lock:
            self._queue.append(ticket)
            try:
                while True:
                    if stop is not None and stop.is_set():
                        return None
                    index = self.where(need) if self._queue[0] is ticket else None
                    if index is not None:
                        self.used[index] += need
                        self.running[index] += 1
                        self.peak[index] = max(self.peak[index], self.running[index])
                        return index
                    self._lock.wait(poll)
            finally:
                self._queue.remove(ticket)
                self._lock.notify_all()

    def release(self, index: int, need: int) -> None:
        with self._lock:
            self.used[index] -= need
            self.running[index] -= 1
            self._lock.notify_all()


def estimate_trials(trials: Sequence[Trial], shared: SharedInputs, own_process: bool = False) -> dict[str, Estimate]:
    """Each trial's estimate by its name (trials of one row and task count share one computation)."""
    estimates: dict[str, Estimate] = {}
    cache: dict[tuple[str, str, int], Estimate] = {}
    for trial in trials:
        key = (trial.point.method, repr(sorted(trial.point.options.items())), len(trial.config.checkpoints))
        if key not in cache:
            cache[key] = estimate_trial(trial, shared, own_process)
        estimates[trial.name] = Estimate(trial.name, cache[key].parts)
    return estimates


def plan_gpu_slots(
    trials: Sequence[Trial], shared: SharedInputs, budget: Budget
) -> tuple[GpuSlots, dict[str, Estimate]]:
    """The local pool's slots over the visible GPUs and each trial's estimate (by name); raises if one fits nowhere."""
    budgets = gpu_budgets(budget)
    estimates = estimate_trials(trials, shared)
    for estimate in estimates.values():
        check_fit(estimate, budgets, budget)
    return GpuSlots(budgets), estimates


def default_gpu_workers(estimates: Mapping[Any, Estimate], slots: GpuSlots, cores: int) -> int:
    """The pool's size on CUDA by default: the trials that fit at once (the largest estimate), one per core at most.

    Never fewer than one per GPU: each trial needs a CPU thread for its Python and data work.
    """
    largest = max((e.total for e in estimates.values()), default=0)
    fit = sum(fits(largest, b) for b in slots.budgets) if largest else len(slots.budgets)
    return max(1, len(slots.budgets), min(fit, cores))


# ---------------------------------------------------------------- Ray


def ray_gpu_fraction(need: int, budget: int) -> float:
    """The share of one GPU a Ray trial asks for: 1/k where k trials needing ``need`` fit in ``budget``.

    Rounded up to Ray's four decimals, so Ray never packs more than k on a GPU; 0 fitting is an
    error for the caller (see :func:`check_fit`).
    """
    k = fits(need, budget)
    if k < 1:
        raise ValueError(f"{need} bytes do not fit in {budget}")
    return min(1.0, math.ceil(RAY_FRACTION_STEP / k) / RAY_FRACTION_STEP)
