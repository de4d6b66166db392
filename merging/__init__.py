"""Continual merging of CLIP image encoders: checkpoints, task vectors, methods, metrics.

The same library drives the Gradio app (``app.py``), the command line
(``python -m merging``) and the tests.
"""

from .checkpoints import EncoderReader, check_compatible, load_encoder, open_encoder, save_encoder
from .errors import CheckpointError, MergingError, OptionError
from .layouts import Layout, detect_layout, to_canonical, to_hf, to_open_clip
from .merge import ContinualMerge, MergeStep
from .methods import METHODS, ContinualMerger, create_merger, get_method, method_names

__all__ = [
    "METHODS",
    "CheckpointError",
    "ContinualMerge",
    "ContinualMerger",
    "EncoderReader",
    "Layout",
    "MergeStep",
    "MergingError",
    "OptionError",
    "check_compatible",
    "create_merger",
    "detect_layout",
    "get_method",
    "load_encoder",
    "method_names",
    "open_encoder",
    "save_encoder",
    "to_canonical",
    "to_hf",
    "to_open_clip",
]
