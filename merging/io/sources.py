"""Checkpoint sources as people write them: paths, Hub ids and uploads, told apart and compared.

A source is a string in a checkpoint list, a flag or a saved configuration. This module
decides what kind of thing it names before anything is read (so that garbage gets a message
saying so instead of a misleading one about tasks), how it is stored in a configuration so
that the configuration replays on another machine (paths inside the project relative to
it, Hub ids as ids, other paths absolute), and when two sources name the same checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from merging.errors import MergingError
from merging.evaluation.tasks import ASSETS
from merging.io.paths import expanded

PROJECT = ASSETS.parent
UPLOAD_PREFIX = "upload:"
HF_HUB_PREFIX = "hf-hub:"
WEIGHT_FILE_NAMES = ("model.safetensors", "open_clip_model.safetensors")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_HUB_BODY = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_TASK_LABEL = re.compile(r"^[^\s/\\=]+$")


def is_hub_shaped(text: str) -> bool:
    """``ORG/NAME[@REV]`` or ``hf-hub:ORG/NAME[@REV]``, whether or not such a repository exists."""
    body = text[len(HF_HUB_PREFIX) :] if text.startswith(HF_HUB_PREFIX) else text
    return bool(_HUB_BODY.match(body))


def looks_like_path(text: str) -> bool:
    """A string a person would write for a file or folder (absolute, ``./``, ``~``, ``a/b``, ``x.safetensors``)."""
    if any(ord(c) < 32 for c in text):
        return False
    return text.startswith(("/", ".", "~")) or "/" in text or "\\" in text or text.endswith(WEIGHT_SUFFIXES)


def check_source_text(text: str) -> str:
    """``text`` stripped, or an error when it cannot name a checkpoint at all."""
    source = text.strip()
    if not source:
        raise MergingError("an empty checkpoint source: give a path, a Hub id ORG/NAME or an upload")
    if source.startswith(UPLOAD_PREFIX) and source[len(UPLOAD_PREFIX) :].strip():
        return source
    if is_hub_shaped(source) or looks_like_path(source) or expanded(source).exists():
        return source
    raise MergingError(f"not a path or a Hub id: {source!r}")


def is_task_label(text: str) -> bool:
    """Whether the part after the last ``=`` of ``SRC=TASK`` is meant as a task (not a path piece)."""
    return bool(_TASK_LABEL.match(text))


def locate(source: str) -> str:
    """Local paths made absolute: from the working directory, else from the project root.

    Saved configurations store project paths relative to the project, so a relative path
    that does not exist here but does in the project is the project's. Hub ids and uploads
    stay as they are.
    """
    if source.startswith((UPLOAD_PREFIX, HF_HUB_PREFIX)):
        return source
    path = expanded(source)
    if path.is_absolute():
        return str(path)
    if path.exists():
        return str(path.resolve())
    if (PROJECT / path).exists():
        return str(PROJECT / path)
    return source


def portable(source: str) -> str:
    """How a source is written into a configuration: project paths relative to the project."""
    path = Path(source)
    if path.is_absolute():
        try:
            return path.resolve().relative_to(PROJECT.resolve()).as_posix()
        except ValueError:
            return source
    return source


def local_checkpoint(source: str) -> Path | None:
    """The checkpoint a local source names, resolved: its folder (a folder and its
    ``model.safetensors`` are one checkpoint), or its single file; None if it is not on disk."""
    path = Path(locate(source))
    if not path.exists():
        return None
    resolved = path.resolve()
    return resolved.parent if resolved.is_file() and resolved.name in WEIGHT_FILE_NAMES else resolved


def identity(source: str) -> str:
    """A key equal for two sources that name the same checkpoint.

    A folder and its ``model.safetensors`` are the same checkpoint; Hub ids compare without
    the ``hf-hub:`` prefix and case (the Hub resolves ids case-insensitively).
    """
    local = local_checkpoint(source)
    if local is not None:
        return f"path:{local}"
    if is_hub_shaped(source):
        body = source[len(HF_HUB_PREFIX) :] if source.startswith(HF_HUB_PREFIX) else source
        repo, _, revision = body.partition("@")
        return f"hub:{repo.lower()}@{revision or 'main'}"
    return f"text:{locate(source)}"


def find_duplicate(sources: Sequence[str]) -> tuple[int, int] | None:
    """The 0-based positions of the first source listed twice and of its repetition, or None."""
    seen: dict[str, int] = {}
    for index, source in enumerate(sources):
        key = identity(source)
        if key in seen:
            return seen[key], index
        seen[key] = index
    return None


def check_no_duplicates(sources: Sequence[str], allowed: bool = False) -> None:
    """Refuse a checkpoint listed twice (merging it twice is almost always a slip) unless allowed."""
    if allowed:
        return
    found = find_duplicate(sources)
    if found is not None:
        first, second = found
        raise MergingError(
            f"checkpoint {sources[second]} is listed twice (positions {first + 1} and {second + 1}); remove one, "
            "or allow duplicates to merge it twice on purpose (the allow-duplicates option)"
        )
