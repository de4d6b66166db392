"""The task registry: what each classification task is and where its data lives.

Registries are JSON files in ``assets/``: ``tasks.json`` holds the 20 standard CLIP tasks
(data on the Hugging Face Hub) and ``mini/tasks.json`` the embedded mini benchmark (data in
the repository). Both have the same shape: named task sets (presets such as ``TA8`` or
``mini-8``) and, per task, class names, prompt templates ({} is the class name) and the
dataset: a Hub id or a local folder, the split evaluated, and the image and label columns.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from merging.errors import MergingError

ASSETS = Path(__file__).resolve().parents[2] / "assets"  # merging/evaluation/tasks.py -> the project
REGISTRY_FILES = (ASSETS / "tasks.json", ASSETS / "mini" / "tasks.json")


@dataclass(frozen=True)
class DatasetRef:
    """Where a task's images are: a Hub dataset id or a local folder of parquet files."""

    location: str
    is_local: bool
    split: str = "test"
    train_split: str | None = None
    config: str | None = None
    image_column: str = "image"
    label_column: str = "label"

    @property
    def path(self) -> Path:
        """The local folder (relative locations are relative to ``assets/``)."""
        path = Path(self.location)
        return path if path.is_absolute() else ASSETS / path


@dataclass(frozen=True)
class Task:
    """A classification task: its classes, prompts, data and (for presets) its checkpoint."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    dataset: DatasetRef
    checkpoint: str | None = None

    @property
    def checkpoint_path(self) -> Path | None:
        """The registered checkpoint as a local path (relative ones are under ``assets/``)."""
        if self.checkpoint is None or self.checkpoint_is_hub_id:
            return None
        path = Path(self.checkpoint)
        return path if path.is_absolute() else ASSETS / path

    @property
    def checkpoint_is_hub_id(self) -> bool:
        """A registered checkpoint written ``hf-hub:ORG/NAME[@REV]`` lives on the Hub."""
        return self.checkpoint is not None and self.checkpoint.startswith("hf-hub:")


@dataclass(frozen=True)
class TaskRegistry:
    tasks: dict[str, Task]
    sets: dict[str, tuple[str, ...]]

    def get(self, name: str) -> Task:
        try:
            return self.tasks[name]
        except KeyError:
            raise MergingError(f"unknown task {name!r}; registered tasks: {', '.join(self.tasks)}") from None

    def task_set(self, name: str) -> tuple[str, ...]:
        try:
            return self.sets[name]
        except KeyError:
            raise MergingError(f"unknown preset {name!r}; presets: {', '.join(self.sets)}") from None


def parse_registry(data: dict[str, Any]) -> TaskRegistry:
    """A registry from the JSON structure described in the module docstring."""
    tasks = {}
    for name, entry in data.get("tasks", {}).items():
        dataset = entry["dataset"]
        is_local = "local" in dataset
        tasks[name] = Task(
            name=name,
            classnames=tuple(entry["classnames"]),
            templates=tuple(entry["templates"]),
            dataset=DatasetRef(
                location=dataset["local"] if is_local else dataset["hub"],
                is_local=is_local,
                split=dataset.get("split", "test"),
                train_split=dataset.get("train_split"),
                config=dataset.get("config"),
                image_column=dataset.get("image_column", "image"),
                label_column=dataset.get("label_column", "label"),
            ),
            checkpoint=entry.get("checkpoint"),
        )
    sets = {name: tuple(members) for name, members in data.get("sets", {}).items()}
    return TaskRegistry(tasks, sets)


@lru_cache(maxsize=1)
def registry() -> TaskRegistry:
    """Every registered task and preset (the files that exist are merged).

    ``MERGING_REGISTRY`` adds registry files of your own (``os.pathsep``-separated), in the
    same JSON format; their entries override the built-in ones of the same name.
    """
    tasks: dict[str, Task] = {}
    sets: dict[str, tuple[str, ...]] = {}
    extra = [Path(p) for p in os.environ.get("MERGING_REGISTRY", "").split(os.pathsep) if p]
    for path in (*REGISTRY_FILES, *extra):
        if path in extra and not path.is_file():
            raise MergingError(f"MERGING_REGISTRY names {path}, which is not a file")
        if path.is_file():
            part = parse_registry(json.loads(path.read_text()))
            tasks.update(part.tasks)
            sets.update(part.sets)
    return TaskRegistry(tasks, sets)
