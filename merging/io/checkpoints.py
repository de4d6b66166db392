"""Reading checkpoints safely, whatever their model family.

Sources are local files or directories (Hub ids are resolved to such paths before they
get here). safetensors files are read lazily through memory maps, one tensor at a time,
so a checkpoint can be recognised and checked against the pretrained encoder from its
header before any weight is read. Pickle files (``.bin``, ``.pt``, ...) can run code when
unpickled: they are read only when the caller opts in, and then with
``torch.load(weights_only=True)``.

What a checkpoint *is* (its family, layout and architecture) is decided by
:mod:`merging.families` from the tensor names; this module only reads files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from merging.errors import CheckpointError
from merging.io.paths import expanded

if TYPE_CHECKING:
    from merging.families import Layout, Model, ModelFamily, Recipe

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HF_CONFIG = "config.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass(frozen=True)
class ResolvedSource:
    """The files behind a checkpoint source: weights (one or several shards) and a config."""

    source: str
    weight_files: tuple[Path, ...]
    config: dict[str, Any] | None = None
    config_kind: Literal["hf", "open_clip"] | None = None

    @property
    def is_pickle(self) -> bool:
        return self.weight_files[0].suffix in PICKLE_SUFFIXES


def resolve_source(source: str | Path) -> ResolvedSource:
    """Find the weight files and config of a local checkpoint file or directory."""
    path = expanded(source)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {source}")
    if path.is_file():
        if path.suffix != SAFETENSORS_SUFFIX and path.suffix not in PICKLE_SUFFIXES:
            raise CheckpointError(f"{source}: unsupported file type {path.suffix or '(none)'} (expected .safetensors)")
        standard = path.name in ("model.safetensors", "open_clip_model.safetensors")
        return _with_config(str(source), (path,), path.parent if standard else None)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index, source).get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{index}: empty weight_map")
        return _with_config(str(source), tuple(path / s for s in shards), path)
    for name in ("model.safetensors", "open_clip_model.safetensors"):
        if (path / name).is_file():
            return _with_config(str(source), (path / name,), path)
    candidates = sorted(path.glob(f"*{SAFETENSORS_SUFFIX}"))
    if len(candidates) > 1:
        names = ", ".join(c.name for c in candidates)
        raise CheckpointError(f"{source}: several safetensors files ({names}); name one of them")
    if candidates:
        return _with_config(str(source), (candidates[0],), path)
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        return _with_config(str(source), (pickles[0],), path)
    raise CheckpointError(f"no supported weights in {source} (looked for model.safetensors, *.safetensors)")


def _with_config(source: str, files: tuple[Path, ...], directory: Path | None) -> ResolvedSource:
    if directory is not None:
        if (directory / HF_CONFIG).is_file():
            return ResolvedSource(source, files, _read_json(directory / HF_CONFIG, source), "hf")
        if (directory / OPEN_CLIP_CONFIG).is_file():
            return ResolvedSource(source, files, _read_json(directory / OPEN_CLIP_CONFIG, source), "open_clip")
    return ResolvedSource(source, files)


def _read_json(path: Path, source: str | Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source}: cannot read {path.name}: {exc}") from None


class TensorFiles:
    """Names, shapes and dtypes of a checkpoint's tensors, and reading them on demand.

    No file stays open between reads: a safetensors tensor is a view of a memory map that
    lives exactly as long as the tensor, so once a loaded checkpoint is dropped its pages
    leave the process, and keeping many checkpoints "open" for validation costs nothing.
    A pickle is read whole at each session (it has no index), and dropped after it.
    """

    def __init__(self, resolved: ResolvedSource, allow_pickle: bool = False):
        self.source = resolved.source
        self.resolved = resolved
        self.allow_pickle = allow_pickle
        self._meta: dict[str, tuple[Path, tuple[int, ...], torch.dtype | None]] = {}
        if resolved.is_pickle:
            state = _load_pickle(resolved.weight_files[0], resolved.source, allow_pickle)
            self._meta = {k: (resolved.weight_files[0], tuple(v.shape), v.dtype) for k, v in state.items()}
            return
        for file in resolved.weight_files:
            with _open_safetensors(file, resolved.source) as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                    info = handle.get_slice(key)
                    self._meta[key] = (file, tuple(info.get_shape()), _DTYPES.get(info.get_dtype()))

    def keys(self) -> list[str]:
        return list(self._meta)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][1]

    def dtype(self, key: str) -> torch.dtype | None:
        return self._meta[key][2]

    @contextmanager
    def session(self) -> Iterator[Callable[[str], Tensor]]:
        """A getter for tensors, valid inside the ``with`` block; files are opened once per block."""
        if self.resolved.is_pickle:
            state = _load_pickle(self.resolved.weight_files[0], self.source, self.allow_pickle)
            yield state.__getitem__
            return
        handles: dict[Path, Any] = {}

        def get(key: str) -> Tensor:
            file = self._meta[key][0]
            if file not in handles:
                handles[file] = _open_safetensors(file, self.source)
            try:
                return handles[file].get_tensor(key)
            except SafetensorError as exc:
                raise CheckpointError(f"corrupt checkpoint {self.source}: cannot read {key}: {exc}") from None

        try:
            yield get
        finally:
            handles.clear()


def _open_safetensors(file: Path, source: str):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"corrupt checkpoint {source}: {file.name} is not a valid safetensors file ({exc})"
        ) from None


def _load_pickle(file: Path, source: str, allow_pickle: bool) -> dict[str, Tensor]:
    if not allow_pickle:
        raise CheckpointError(
            f"{source}: {file.name} is a pickle checkpoint, which can run code when loaded; "
            "allow pickles to read it (the allow-pickle option; then torch.load(weights_only=True)) "
            "or convert it to safetensors"
        )
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types; all mean "cannot read safely"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"corrupt or unsafe pickle checkpoint {source}: {first_line}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: the pickle holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


@dataclass
class EncoderReader(Mapping[str, Tensor]):
    """A checkpoint's model under its family's canonical keys, read tensor by tensor on access.

    Indexing reads (and for Hugging Face files converts) one tensor; :meth:`load`
    materialises all of them and checks they are finite.
    """

    source: str
    family: ModelFamily
    layout: Layout
    files: TensorFiles
    recipes: dict[str, Recipe]
    arch: Any
    config: dict[str, Any] | None = None
    _shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    def __getitem__(self, key: str) -> Tensor:
        with self.files.session() as get:
            return self.recipes[key].build(get)

    def __iter__(self) -> Iterator[str]:
        return iter(self.recipes)

    def __len__(self) -> int:
        return len(self.recipes)

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._shapes:
            self._shapes[key] = self.recipes[key].shape(self.files.shape)
        return self._shapes[key]

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the weights (of the first floating-point tensor)."""
        for recipe in self.recipes.values():
            dtype = self.files.dtype(recipe.sources[0])
            if dtype is not None and dtype.is_floating_point:
                return dtype
        return torch.float32

    @property
    def is_lazy(self) -> bool:
        """True when tensors can be read one at a time (safetensors), False for a pickle."""
        return not self.files.resolved.is_pickle

    def describe(self) -> str:
        return f"{self.source}: {self.layout.description}, {self.arch.summary}"

    def read_ahead(self, chunk_bytes: int = 8 << 20) -> int:
        """Read the checkpoint's files through once, so that the OS keeps their pages cached.

        A run does this for the next checkpoint while it merges the current one: the lazy
        reads of the next merge then come from memory instead of waiting on the disk. What is
        read is dropped at once (the process's memory does not grow). Returns the bytes read.
        """
        buffer = bytearray(chunk_bytes)
        total = 0
        for file in self.files.resolved.weight_files:
            with open(file, "rb", buffering=0) as handle:
                while count := handle.readinto(buffer):
                    total += count
        return total

    def load(self) -> dict[str, Tensor]:
        """All tensors under canonical keys; raises naming the first parameter with NaN or Inf."""
        state: dict[str, Tensor] = {}
        with self.files.session() as get:
            for key, recipe in self.recipes.items():
                tensor = recipe.build(get)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise CheckpointError(f"checkpoint {self.source} has NaN or Inf values in {key}")
                state[key] = tensor
        return state


def open_encoder(source: str | Path, allow_pickle: bool = False) -> EncoderReader:
    """Recognise a checkpoint's family, layout and architecture from its header; read no weights yet.

    ``source`` is a local file or folder, or a Hub repository id (``org/name[@revision]``,
    optionally ``hf-hub:``-prefixed), of which only the configs and weights are fetched.
    A checkpoint that no model family recognises raises, naming it.
    """
    from dataclasses import replace

    from merging.families import recognise
    from merging.io.hub import model_folder

    folder = model_folder(str(source), allow_pickle)
    resolved = resolve_source(source) if folder is None else replace(resolve_source(folder), source=str(source))
    files = TensorFiles(resolved, allow_pickle=allow_pickle)
    family, layout = recognise(files.keys(), str(source))
    recipes = family.recipes(layout, files.keys())
    shapes = {k: r.shape(files.shape) for k, r in recipes.items()}
    arch = family.architecture(shapes, resolved)
    return EncoderReader(str(source), family, layout, files, recipes, arch, resolved.config, shapes)


def load_encoder(source: str | Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Open and fully read a checkpoint's model under canonical keys."""
    return open_encoder(source, allow_pickle).load()


def check_compatible(pretrained: Model, finetuned: EncoderReader) -> None:
    """Raise unless ``finetuned`` is of the pretrained model's family and fits it parameter by parameter.

    ``pretrained`` is an opened checkpoint or anything with the same view (a loaded
    backbone's image tower); the family's check names the first offending parameter.
    """
    family = pretrained.family
    if finetuned.family is not family:
        raise CheckpointError(
            f"{finetuned.source} is {finetuned.family.kind}, but the pretrained model {pretrained.source} is "
            f"{family.kind}"
        )
    family.check_compatible(pretrained, finetuned)
