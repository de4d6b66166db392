"""Zero-shot classification heads from the pretrained text tower (ALGORITHMS.md).

For each class, every template is filled with the class name and embedded; the embeddings
are L2-normalised, averaged and normalised again. Heads depend only on the backbone and the
task's names and templates, so they are cached in memory and on disk.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from .backbones import Backbone
from .tasks import Task


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
    """Zero-shot heads per (backbone, task), in memory and under ``directory/heads``."""

    def __init__(self, directory: Path):
        self.directory = directory / "heads"
        self._memory: dict[str, Tensor] = {}

    def get(self, backbone: Backbone, task: Task) -> Tensor:
        text = "\n".join(task.classnames) + "\n--\n" + "\n".join(task.templates)
        key = f"{backbone.fingerprint}-{task.name}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"
        if key not in self._memory:
            path = self.directory / f"{key}.safetensors"
            head = None
            if path.is_file():
                try:
                    head = load_file(str(path))["head"]
                except Exception:  # a damaged cache entry is rebuilt, never trusted
                    head = None
            if head is None:
                head = build_head(backbone, task.classnames, task.templates)
                self.directory.mkdir(parents=True, exist_ok=True)
                # unique name, then rename: a concurrent writer (the app's warm-up) never leaves half a file
                temporary = path.with_name(f"{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp")
                save_file({"head": head.contiguous()}, str(temporary))
                temporary.replace(path)
            self._memory[key] = head
        return self._memory[key]
