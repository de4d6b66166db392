"""Where results may be written, checked before any work starts, and a rescue when writing fails.

A run can take hours; finding out at the end that ``--out`` cannot be written would lose
it. So an output is checked first: it must not be (or lie inside) one of the run's inputs
(a merged encoder written over a fine-tuned checkpoint silently damages every later run),
nor inside the project's ``assets/`` (the embedded benchmark), and its folder must accept a
file. If writing still fails at the end (a full disk, a folder removed meanwhile), the
results go to a rescue folder under the system's temporary directory instead, and the error
names it.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from merging.errors import MergingError
from merging.evaluation.tasks import ASSETS
from merging.io.paths import expanded
from merging.io.sources import local_checkpoint

T = TypeVar("T")


def _input_roots(inputs: Iterable[str]) -> list[Path]:
    """What writing must not touch: each local input checkpoint's folder (or its single file)."""
    return [root for root in map(local_checkpoint, inputs) if root is not None]


def check_outputs(files: Sequence[str | Path], inputs: Iterable[str] = (), flag: str = "--out") -> None:
    """Refuse outputs that are inputs, lie inside an input or inside ``assets/``, or cannot be written.

    ``files`` are every file the command will write. Missing folders are created (that is
    the only trace a refused output can leave), and a probe file is written and removed in
    each, so permissions, read-only mounts and pseudo file systems are caught now.
    """
    assets = ASSETS.resolve()
    roots = _input_roots(inputs)
    for file in files:
        path = expanded(file)
        target = path.resolve()
        if target == assets or target.is_relative_to(assets):
            raise MergingError(
                f"{flag} {file} is inside the project's assets/ (the embedded benchmark); write elsewhere"
            )
        for root in roots:
            if target == root or target.is_relative_to(root):
                raise MergingError(f"{flag} {file} would write into the input checkpoint {root}; write elsewhere")
        if target.is_dir():
            raise MergingError(f"{flag} {file} is a folder, not a file")
        if target.exists() and not os.access(target, os.W_OK):
            raise MergingError(f"{flag} {file} exists and is not writable")
        _probe(target.parent, flag, file)


def _probe(folder: Path, flag: str, file: str | Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".merging-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MergingError(f"cannot write {flag} {file}: {reason} ({folder})") from None


def rescue_folder() -> Path:
    """A fresh folder under the system's temporary directory for results that could not be written."""
    root = Path(tempfile.gettempdir()) / "continual-merging-lab-rescue"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=root))


def write_or_rescue(write: Callable[[Path], T], out: Path, what: str = "the results") -> T:
    """``write(out)``; if that fails, ``write`` into a rescue folder and raise naming both places."""
    try:
        return write(out)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        rescued = rescue_folder() / out.name
        try:
            write(rescued)
        except OSError as second:
            raise MergingError(f"cannot write {out} ({reason}) nor a rescue copy ({second})") from None
        raise MergingError(f"cannot write {out} ({reason}); {what} are in {rescued}") from None
