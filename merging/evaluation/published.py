"""The papers' published numbers (``assets/reference/reference_results.json``) for a run's setting.

One lookup for everything that shows published numbers beside ours (the live ACC/BWT plot's
markers, a sweep's table): which published benchmark a backbone and preset correspond to,
and each method's final ACC and BWT there, under the name the papers give it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from merging.evaluation.tasks import ASSETS

# The published results' backbone names for the backbones that load the OpenAI weights.
PUBLISHED_BACKBONES = {
    "ViT-B-32": "ViT-B/32",
    "openai/clip-vit-base-patch32": "ViT-B/32",
    "ViT-B-16": "ViT-B/16",
    "openai/clip-vit-base-patch16": "ViT-B/16",
    "ViT-L-14": "ViT-L/14",
    "openai/clip-vit-large-patch14": "ViT-L/14",
}
# The standard presets' task counts, as the published tables key them.
PRESET_SIZES = {"TA8": "8", "TALL14": "14", "TALL20": "20"}
# The mini presets mirror the real ViT-B/32 benchmark of about their size (assets/mini/README.md).
MINI_MIRRORS = {"mini-8": ("ViT-B/32", "8"), "mini-12": ("ViT-B/32", "14")}


@lru_cache(maxsize=1)
def published_results() -> dict[str, Any]:
    path = ASSETS / "reference" / "reference_results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def published_setting(backbone: str, preset: str, mirrors: bool = False) -> tuple[str, str] | None:
    """(published backbone, task count) for a standard preset on an OpenAI backbone, else None.

    With ``mirrors`` the mini presets map to the real benchmark they mirror.
    """
    if mirrors and preset in MINI_MIRRORS:
        return MINI_MIRRORS[preset]
    if preset in PRESET_SIZES and backbone in PUBLISHED_BACKBONES:
        return PUBLISHED_BACKBONES[backbone], PRESET_SIZES[preset]
    return None


def published_numbers(setting: tuple[str, str], names: Iterable[str]) -> dict[str, dict[str, float]]:
    """{name: {"ACC", "BWT"}} in percent for the names (methods or rows such as "pretrained") that have them.

    A method is looked up under its ``published_name``; a name that is no method, as it is.
    """
    from merging.methods import METHODS

    backbone, size = setting
    data = published_results()
    numbers: dict[str, dict[str, float]] = {}
    for name in names:
        key = METHODS[name].published_name if name in METHODS else name
        if key is None:
            continue
        for metric in ("ACC", "BWT"):
            value = data.get(metric, {}).get(backbone, {}).get(size, {}).get(key)
            if value is not None:
                numbers.setdefault(name, {})[metric] = float(value)
    return numbers


def config_setting(config: Mapping[str, Any], mirrors: bool = False) -> tuple[str, str] | None:
    """:func:`published_setting` of a results.json configuration."""
    return published_setting(str(config.get("backbone")), str(config.get("preset")), mirrors)
