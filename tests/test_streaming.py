"""The streaming interface: bounded memory, options, and the registry."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import types
import weakref

import pytest
import torch

from merging.errors import CheckpointError, OptionError
from merging.methods import METHODS, create_merger, get_method, method_names

from .encoders import TINY, finetuned, random_encoder, ready_merger


def held_bytes(root: object) -> int:
    """Bytes of tensor storage reachable from ``root``'s attributes, however deeply nested.

    A merger can hold tensors directly, in containers, or through other objects (its
    ``MergeContext``, a dataclass; an ``nn.Module``'s parameter dicts; a closure in a
    context's callables): all of them count, or a method that kept a checkpoint through one
    of those would pass the memory tests. Storages are counted once each, by address, so views
    and shared tensors are not counted twice, and a view that keeps a large tensor alive counts
    its whole storage. Modules, classes and plain functions' globals are not entered.
    """
    seen: set[int] = {id(root)}
    visited: list[object] = []  # keeps every object alive while its id is in ``seen``
    storages: dict[tuple[str, int], int] = {}
    stack: list[object] = list(_children(root))
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        visited.append(item)
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[(str(item.device), storage.data_ptr())] = storage.nbytes()
        stack.extend(_children(item))
    return sum(storages.values())


def _children(item: object) -> list[object]:
    """What ``item`` holds, for :func:`held_bytes` (dict keys too; no module or class internals)."""
    if isinstance(item, (str, bytes, int, float, complex, bool, type(None), torch.device, torch.dtype)):
        return []
    if isinstance(item, (types.ModuleType, type)):
        return []
    if isinstance(item, torch.Tensor):
        return [item.grad] if item.grad is not None else []
    if isinstance(item, dict):
        return [*item.keys(), *item.values()]
    if isinstance(item, (list, tuple, set, frozenset)):
        return list(item)
    if isinstance(item, types.MethodType):
        return [item.__self__, item.__func__]
    if isinstance(item, types.FunctionType):  # what a closure captured, and its defaults
        cells = [cell.cell_contents for cell in item.__closure__ or () if _filled(cell)]
        return [*cells, *(item.__defaults__ or ()), *(item.__kwdefaults__ or {}).values()]
    held: list[object] = []
    if dataclasses.is_dataclass(item):  # a slotted dataclass has no __dict__: read its fields
        held += [getattr(item, f.name) for f in dataclasses.fields(item) if hasattr(item, f.name)]
    held += list(getattr(item, "__dict__", {}).values())
    for cls in type(item).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if isinstance(name, str) and name not in ("__dict__", "__weakref__") and hasattr(item, name):
                held.append(getattr(item, name))
    return held


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # a closure variable not yet assigned
        return False
    return True


@dataclasses.dataclass
class _Box:
    """A dataclass holding a tensor, as a MergeContext holds its encoder."""

    tensor: torch.Tensor


@dataclasses.dataclass(slots=True)
class _SlottedBox:
    tensor: torch.Tensor


class _Holder:
    def __init__(self, inner: object) -> None:
        self.inner = inner


def test_held_bytes_finds_tensors_behind_objects_and_counts_each_storage_once():
    big = torch.zeros(1000)  # 4000 bytes
    assert held_bytes(_Holder([big, big[:10], {"view": big.view(10, 100)}])) == 4000
    assert held_bytes(_Holder(_Box(big))) == 4000  # hidden in a dataclass (the old helper saw 0)
    assert held_bytes(_Holder(_Holder(_SlottedBox(torch.zeros(10, dtype=torch.float64))))) == 80
    assert held_bytes(_Holder(lambda: big)) == 4000  # captured by a closure
    assert held_bytes(_Holder({frozenset({1}), (torch.zeros(2, dtype=torch.int8),)})) == 2
    module = torch.nn.Linear(3, 2)  # weight 6 + bias 2 floats
    assert held_bytes(_Holder(_Box(module))) == 32
    cycle: list[object] = []
    cycle.append(cycle)
    cycle.append(torch.zeros(3, dtype=torch.int16))
    assert held_bytes(_Holder(cycle)) == 6  # a cycle ends
    assert held_bytes(_Holder(torch)) == 0  # modules are not walked


@pytest.mark.parametrize("method", list(METHODS))
def test_never_keeps_earlier_checkpoints(method):
    pretrained = random_encoder(TINY)
    merger = ready_merger(method, pretrained)
    references = []
    sizes = []
    for seed in range(1, 6):
        model = finetuned(pretrained, seed)
        references.append([weakref.ref(t) for t in model.values()])
        merger.step(model, task=f"toy-{seed}")
        del model
        gc.collect()
        sizes.append(held_bytes(merger))
    for refs in references:
        assert all(r() is None for r in refs), f"{method} keeps a fine-tuned tensor alive"
    # a method whose merged model grows with T (MINGLE's experts) declares the most one task adds;
    # every other method declares 0, so from step 2 on its memory may not change at all
    growth = merger.per_task_bytes()
    added = [later - earlier for earlier, later in itertools.pairwise(sizes[1:])]
    assert all(0 <= a <= growth for a in added), f"{method} holds more memory as tasks arrive: {sizes}"
    encoder_bytes = sum(t.numel() * 4 for t in pretrained.values())
    # a data-driven method's context (the runner's image tower, shared by all methods) is not its own
    context_bytes = held_bytes(merger.context) if merger.context is not None else 0
    assert sizes[-1] <= 3 * encoder_bytes + context_bytes + len(sizes) * growth


def test_start_copies_the_pretrained_encoder():
    pretrained = random_encoder(TINY)
    merger = create_merger("task_arithmetic")
    merger.start(pretrained)
    before = {k: v.clone() for k, v in pretrained.items()}
    merger.step(finetuned(pretrained, 1))
    assert all(torch.equal(before[k], pretrained[k]) for k in pretrained)


def test_incoming_tensors_are_not_modified():
    pretrained = random_encoder(TINY)
    for method in METHODS:
        merger = ready_merger(method, pretrained)
        for seed in (1, 2, 3):
            model = finetuned(pretrained, seed)
            copy = {k: v.clone() for k, v in model.items()}
            merger.step(model, task=f"toy-{seed}", last=seed == 3)
            assert all(torch.equal(copy[k], model[k]) for k in model), method


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("nan"), "has NaN or Inf values in ln_post.bias"),
        (float("-inf"), "has NaN or Inf values in ln_post.bias"),
        (3e19, "has values in ln_post.bias too large to merge in float32"),  # finite, but its square overflows
    ],
)
def test_non_finite_or_overflowing_values_are_named_before_any_update(value, message):
    pretrained = random_encoder(TINY)
    merger = ready_merger("opcm", pretrained)
    merger.step(finetuned(pretrained, 1))
    before = {k: v.clone() for k, v in merger.merged.items()}
    bad = finetuned(pretrained, 2)
    bad["ln_post.bias"][5] = value
    with pytest.raises(CheckpointError, match=message):
        merger.step(bad)
    assert merger.step_count == 1 and all(torch.equal(before[k], merger.merged[k]) for k in before)


def test_keys_missing_from_finetuned_stay_pretrained():
    pretrained = random_encoder(TINY)
    merger = create_merger("opcm")
    merger.start(pretrained)
    for seed in (1, 2):
        result = merger.step({k: v for k, v in finetuned(pretrained, seed).items() if k != "proj"})
    assert torch.equal(result.merged["proj"], pretrained["proj"])
    assert "proj" not in merger.merge_keys


def test_options_parse_strings_and_report_valid_values():
    merger = create_merger("opcm", {"alpha": "0.7", "zero_diagonal": "false", "projection": "two_sided"})
    assert merger.config == {
        "alpha": 0.7,
        "projection": "two_sided",
        "zero_diagonal": False,
        "class_embedding": "merged",
    }
    with pytest.raises(OptionError) as exc:
        create_merger("opcm", {"alhpa": 0.5})
    assert str(exc.value) == (
        "unknown option 'alhpa' for opcm; valid options: alpha, projection, zero_diagonal, class_embedding"
    )
    with pytest.raises(OptionError, match=r"opcm option alpha=1.5 is out of range: must be a number in \[0, 1\]"):
        create_merger("opcm", {"alpha": "1.5"})
    with pytest.raises(OptionError, match="must be one of block, two_sided"):
        create_merger("opcm", {"projection": "three_sided"})
    with pytest.raises(OptionError, match="zero_diagonal=maybe is invalid: must be one of true, false"):
        create_merger("opcm", {"zero_diagonal": "maybe"})
    with pytest.raises(OptionError, match=r"ties option top_k=0 is out of range: must be a number in \(0, 100\]"):
        create_merger("ties", {"top_k": 0})
    with pytest.raises(OptionError, match="takes no options"):
        create_merger("weight_average", {"scaling": 1})
    with pytest.raises(OptionError, match=f"unknown method 'opcn'; valid methods: {', '.join(method_names())}$"):
        get_method("opcn")


def test_mismatched_incoming_encoder_is_reported():
    pretrained = random_encoder(TINY)
    merger = create_merger("opcm")
    merger.start(pretrained)
    merger.step(finetuned(pretrained, 1))
    bad = finetuned(pretrained, 2)
    bad["ln_post.weight"] = torch.ones(7)
    with pytest.raises(CheckpointError, match=r"at ln_post\.weight: pretrained \(32,\) vs fine-tuned encoder 2 \(7,\)"):
        merger.step(bad)


def test_lazy_reader_is_streamed_and_a_bad_one_changes_nothing(tmp_path):
    from merging.io.checkpoints import open_encoder

    from .encoders import write_hf

    pretrained = random_encoder(TINY)
    models = [{k: v for k, v in finetuned(pretrained, s).items() if k != "proj"} for s in (1, 2)]
    readers = [open_encoder(write_hf(m, tmp_path / f"m{i}")) for i, m in enumerate(models)]
    eager, lazy = create_merger("opcm"), create_merger("opcm")
    for merger, inputs in ((eager, models), (lazy, readers)):
        merger.start(pretrained)
        for model in inputs:
            result = merger.step(model)
    assert all(torch.equal(eager.merged[k], lazy.merged[k]) for k in pretrained)
    assert result.diagnostics["task_norm"] > 0

    broken = dict(models[0])
    broken["transformer.resblocks.1.mlp.c_proj.bias"] = torch.full((32,), float("nan"))
    bad = open_encoder(write_hf(broken, tmp_path / "bad"))
    before = {k: v.clone() for k, v in lazy.merged.items()}
    with pytest.raises(
        CheckpointError,
        match=f"checkpoint {tmp_path / 'bad'} has NaN or Inf values in "
        r"transformer\.resblocks\.1\.mlp\.c_proj\.bias",
    ):
        lazy.step(bad)
    assert lazy.step_count == 2 and all(torch.equal(before[k], lazy.merged[k]) for k in before)
