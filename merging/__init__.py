"""Continual merging of CLIP image encoders: checkpoints, model families, methods, metrics.

The same library drives the Gradio app (``app.py``), the command line
(``python -m merging``) and the tests.

Importing the package imports nothing heavy: the names below are loaded from their
modules on first use (PEP 562), so ``python -m merging --help`` does not pay for torch,
and no method's dependencies (POT for OTMF) load until that method is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "METHODS": "methods",
    "ContinualMerger": "methods",
    "create_merger": "methods",
    "get_method": "methods",
    "method_names": "methods",
    "CheckpointError": "errors",
    "MergingError": "errors",
    "OptionError": "errors",
    "ContinualMerge": "experiment.merge",
    "MergeStep": "experiment.merge",
    "EncoderReader": "io.checkpoints",
    "check_compatible": "io.checkpoints",
    "load_encoder": "io.checkpoints",
    "open_encoder": "io.checkpoints",
    "FAMILIES": "families",
    "ModelFamily": "families",
    "family_of": "families",
    "get_family": "families",
    "save_encoder": "families.clip_vit.saving",
    "Layout": "families.clip_vit.layouts",
    "detect_layout": "families.clip_vit.layouts",
    "to_canonical": "families.clip_vit.layouts",
    "to_hf": "families.clip_vit.layouts",
    "to_open_clip": "families.clip_vit.layouts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'merging' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
