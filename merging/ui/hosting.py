"""Hosted mode: what a visitor of a public lab may read, and where the lab keeps each session's files.

On a public Space every control, and every event handler behind it, is used by strangers,
hidden or not. So in hosted mode a checkpoint or backbone may only be an embedded asset
(under ``assets/``), a Hub id, or a file the visitor uploaded in the same session; any
other server path is refused with one line, without being looked at. Outside hosted mode
local paths work as on the command line.

Whatever the lab writes (results, CSVs, configurations, merged encoders, uploads) goes to a
per-session folder under one private temporary root: never to a path a visitor types, never
shared between sessions, removed when the session ends (or after it has been idle for
``MERGING_SESSION_TTL_HOURS``) and when the process exits.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from merging.errors import MergingError
from merging.evaluation.tasks import ASSETS
from merging.io.sources import HF_HUB_PREFIX, PROJECT, UPLOAD_PREFIX, is_hub_shaped, locate

HOSTED_ENV = "MERGING_HOSTED"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
LOCAL_DIR = "local-dir:"
DEFAULT_SESSION_TTL_HOURS = 6.0
DEFAULT_MAX_UPLOAD_MB = 2048  # a ViT-L/14 image encoder in float32 is 1.2 GB


def hosted_mode() -> bool:
    """``MERGING_HOSTED`` (1/0) when set, else whether this runs on Hugging Face Spaces (``SPACE_ID``)."""
    raw = os.environ.get(HOSTED_ENV, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    if raw:
        raise MergingError(f"{HOSTED_ENV}={raw!r} must be 1 or 0 (true/false)")
    return bool(os.environ.get("SPACE_ID"))


def _positive_env(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise MergingError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise MergingError(f"{name}={raw!r} must be positive")
    return value


def max_upload_bytes() -> int:
    """The largest checkpoint a visitor may upload: ``MERGING_MAX_UPLOAD_MB`` (default 2048)."""
    return int(_positive_env("MERGING_MAX_UPLOAD_MB", DEFAULT_MAX_UPLOAD_MB) * 2**20)


REFUSED = (
    "server paths cannot be read on this hosted lab: {!r} (give a Hub id ORG/NAME, an embedded checkpoint "
    "under assets/, or upload a .safetensors file)"
)


@dataclass(frozen=True)
class SourcePolicy:
    """Turns what a visitor wrote into something to open, or refuses it.

    ``uploads`` is the session's upload folder (``upload:NAME`` names a file in it).
    """

    hosted: bool = False
    uploads: Path | None = None

    def checkpoint(self, source: str) -> str:
        """The checkpoint source to open (a path, or ``hf-hub:ORG/NAME`` so it cannot be taken for a path)."""
        source = source.strip()
        if source.startswith(UPLOAD_PREFIX):
            return str(self._upload(source[len(UPLOAD_PREFIX) :].strip()))
        if not self.hosted:
            return locate(source)
        if source.startswith(HF_HUB_PREFIX):
            return source
        inside = self._inside_allowed(source)
        if inside is not None:
            return str(inside)
        if is_hub_shaped(source):
            return HF_HUB_PREFIX + source
        raise MergingError(REFUSED.format(source))

    def backbone(self, name: str) -> str:
        """The backbone name to load; in hosted mode ``local-dir:`` only inside the embedded assets."""
        name = name.strip()
        if not self.hosted or not name.startswith(LOCAL_DIR):
            return name
        inside = self._inside_allowed(name[len(LOCAL_DIR) :])
        if inside is None:
            raise MergingError(REFUSED.format(name))
        return LOCAL_DIR + str(inside)

    def _inside_allowed(self, text: str) -> Path | None:
        """The resolved path when it lies in the embedded assets or the session's uploads, else None.

        Relative paths are the project's (never the server's working directory); symbolic
        links are followed before the check, so a link cannot lead outside.
        """
        path = Path(text)
        if text.startswith("~"):
            return None
        resolved = (path if path.is_absolute() else PROJECT / path).resolve()
        roots = [ASSETS.resolve()] + ([self.uploads.resolve()] if self.uploads is not None else [])
        return resolved if any(resolved == r or resolved.is_relative_to(r) for r in roots) else None

    def _upload(self, name: str) -> Path:
        if self.uploads is None:
            raise MergingError("uploads are only available in the lab's page")
        if not name or Path(name).name != name or name in (".", ".."):
            raise MergingError(f"not an uploaded file name: {name!r}")
        path = self.uploads / name
        if not path.is_file():
            raise MergingError(f"no uploaded file {name!r} in this session (upload it again)")
        return path


def safe_upload_name(name: str) -> str:
    """A file name for an upload: its last component, with anything but letters, digits, ``._-`` replaced."""
    base = Path(name.replace("\\", "/")).name
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in base).lstrip(".")
    return cleaned or "upload.safetensors"


class Workspaces:
    """One private folder per session under a root of its own; bounded in runs and in time.

    Session ids come from the web framework but are hashed before they name a folder, so no
    visitor-controlled text ever becomes a path component. Each run gets a fresh ``run-N``
    folder; only the newest ``max_runs`` of a session are kept.
    """

    def __init__(self, root: Path | None = None, ttl_hours: float | None = None, max_runs: int = 5):
        self.root = root or Path(tempfile.mkdtemp(prefix="continual-merging-lab-sessions-"))
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.ttl_seconds = 3600 * (ttl_hours or _positive_env("MERGING_SESSION_TTL_HOURS", DEFAULT_SESSION_TTL_HOURS))
        self.max_runs = max_runs
        self._lock = threading.Lock()
        self._counter = 0
        atexit.register(self.close)

    def _path(self, session: str | None) -> Path:
        """Where a session's folder is (hashed id: no visitor text in the path); nothing is created."""
        return self.root / hashlib.sha256((session or "local").encode()).hexdigest()[:24]

    def folder(self, session: str | None) -> Path:
        """The session's folder (created on first use; its time stamp marks the session as alive)."""
        path = self._path(session)
        with self._lock:
            path.mkdir(exist_ok=True)
            os.utime(path)
        self.sweep(keep=path)
        return path

    def uploads(self, session: str | None) -> Path:
        path = self.folder(session) / "uploads"
        path.mkdir(exist_ok=True)
        return path

    def new_folder(self, session: str | None, kind: str = "run") -> Path:
        """A fresh ``kind-N`` folder for one run (or merge) of the session; the oldest beyond the bound go."""
        base = self.folder(session)
        with self._lock:
            self._counter += 1
            path = base / f"{kind}-{self._counter:05d}"
            path.mkdir()
            previous = sorted(base.glob(f"{kind}-*"), key=lambda p: int(p.name.split("-")[-1]))
        for old in previous[: -self.max_runs]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def owns(self, session: str | None, path: str | Path) -> bool:
        """Whether ``path`` lies in this session's folder."""
        return Path(path).resolve().is_relative_to(self._path(session).resolve())

    def release(self, session: str | None) -> None:
        """Delete a session's files (called when its page is closed)."""
        shutil.rmtree(self._path(session), ignore_errors=True)

    def sweep(self, keep: Path | None = None) -> None:
        """Delete the folders of sessions idle for longer than the time to live."""
        limit = time.time() - self.ttl_seconds
        for path in self.root.iterdir():
            if path != keep and path.is_dir() and path.stat().st_mtime < limit:
                shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
