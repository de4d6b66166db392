"""Zero-shot classification heads from the pretrained text tower (ALGORITHMS.md).

For each class, every template is filled with the class name and embedded; the embeddings
are L2-normalised, averaged and normalised again. Heads depend only on the backbone and the
task's names and templates, so they are cached in memory and on disk.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from merging.evaluation.backbones import Backbone
from merging.evaluation.tasks import Task
from merging.io.disk_cache import DiskCache


@torch.no_grad()
def build_head(backbone: Backbone, classnames: tuple[str, ...], templates: tuple[str, ...]) -> Tensor:
    """The (classes × embedding) head: per class, the normalised mean of normalised prompt embeddings."""
    rows = []
    for name in classnames:
        tokens = backbone.tokenizer([template.format(name) for template in templates])
        embeddings = F.normalize(backbone.model.encode_text(tokens).float(), dim=-1)
        rows.append(F.normalize(embeddings.mean(dim=0), dim=0))
    return torch.stack(rows)


class HeadCache:
    """Zero-shot heads per (backbone, task), in memory and under ``directory/heads`` (bounded, see disk_cache)."""

    def __init__(self, directory: Path):
        self.disk = DiskCache(directory, "heads")
        self.directory = self.disk.directory
        self._memory: dict[str, Tensor] = {}

    def get(self, backbone: Backbone, task: Task) -> Tensor:
        """The task's head: from memory, else from disk, else built from the text tower (and stored)."""
        text = "\n".join(task.classnames) + "\n--\n" + "\n".join(task.templates)
        key = f"{backbone.fingerprint}-{task.name}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"
        if key not in self._memory:
            name = f"{key}.safetensors"
            head = self.disk.read(name, lambda path: load_file(str(path))["head"])  # None: missing or damaged
            if head is None:
                head = build_head(backbone, task.classnames, task.templates)
                stored = {"head": head.contiguous()}
                self.disk.write(name, lambda path: save_file(stored, str(path)))
            self._memory[key] = head
        return self._memory[key]
