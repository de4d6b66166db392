"""A Hugging Face Hub cache on disk, built from local files, for testing Hub code offline.

It has the layout ``huggingface_hub`` reads (``models--ORG--NAME/refs/<rev>`` holding a
commit hash, ``snapshots/<hash>/<files>``, and the same under ``datasets--``), so the real
resolution code runs against it with the library in offline mode.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping
from pathlib import Path


def add_repo(
    cache: Path,
    repo_id: str,
    files: Mapping[str, Path],
    repo_type: str = "model",
    revision: str = "main",
) -> str:
    """Put ``files`` (name in the repository → local file) in the cache; return the commit hash."""
    folder = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_type}:{repo_id}@{revision}".encode()).hexdigest()
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    snapshot = folder / "snapshots" / commit
    for name, source in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return commit


def add_folder(cache: Path, repo_id: str, folder: Path, repo_type: str = "model", revision: str = "main") -> str:
    """Every file under ``folder`` as a repository."""
    files = {str(p.relative_to(folder)): p for p in sorted(Path(folder).rglob("*")) if p.is_file()}
    return add_repo(cache, repo_id, files, repo_type, revision)
