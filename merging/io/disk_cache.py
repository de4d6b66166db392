"""The on-disk cache shared by decoded images, zero-shot heads and reference rows.

Several runs (the app's warm-up, concurrent sessions of a hosted Space, a command line next
to the app) read and write the same cache, and a Space's disk is small. So every entry is
written under a unique temporary name and renamed into place (a reader never sees half a
file), every read touches the entry's modification time (recency shared across processes;
access times are unreliable under ``noatime``), and after each write the least recently used
entries are deleted until the cache fits ``MERGING_CACHE_MAX_GB``.

An entry in use is never deleted: neither one this process is reading or writing (see
:func:`in_use`) nor one whose modification time is within :data:`GRACE_SECONDS` (another
process just wrote or read it). When everything left is in use the cache stays over the cap
until a later write finds something to delete. Only the folders the caches own
(:data:`FOLDERS`) are scanned, so pointing ``MERGING_CACHE`` at a shared folder never
deletes anything else.
"""

from __future__ import annotations

import math
import os
import secrets
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

from merging.errors import MergingError

T = TypeVar("T")

# 10 GB holds every decoded test and train sample of the 20 standard tasks at the default
# 500 images each (about 75 MB per split) several times over, while leaving most of a Space's
# disk (50 GB ephemeral on the free tier) to the Hub cache, where the checkpoints live.
DEFAULT_MAX_GB = 10.0
MAX_GB_VARIABLE = "MERGING_CACHE_MAX_GB"
GRACE_SECONDS = 60.0  # an entry touched this recently may be in use by another process
STALE_TEMPORARY_SECONDS = 3600.0  # a temporary file this old was left by a writer that died
FOLDERS = ("images", "heads", "references")

_lock = threading.Lock()
_in_use: Counter[str] = Counter()


def cache_root() -> Path:
    """Where decoded images, zero-shot heads and reference rows are cached (``MERGING_CACHE`` overrides)."""
    return Path(os.environ.get("MERGING_CACHE", Path.home() / ".cache" / "continual-merging-lab"))


def max_bytes() -> float:
    """The cap from ``MERGING_CACHE_MAX_GB`` (default 10 GB); a bad value is a one-line error naming it."""
    raw = os.environ.get(MAX_GB_VARIABLE, str(DEFAULT_MAX_GB))
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if math.isnan(value) or value <= 0:
        raise MergingError(f"{MAX_GB_VARIABLE}={raw!r} is not a positive number of gigabytes (e.g. 10)")
    return value * 1e9


def _identity(path: Path) -> str:
    return os.path.realpath(path)


@contextmanager
def in_use(path: Path) -> Iterator[Path]:
    """Mark ``path`` as being read or written by this process, so eviction leaves it (re-entrant, thread-safe)."""
    key = _identity(path)
    with _lock:
        _in_use[key] += 1
    try:
        yield path
    finally:
        with _lock:
            _in_use[key] -= 1
            if _in_use[key] <= 0:
                del _in_use[key]


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` then rename onto ``path``: concurrent readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _entries(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    for folder in FOLDERS:
        for path in (root / folder).rglob("*"):
            try:
                info = path.stat()
            except OSError:  # removed meanwhile by another process
                continue
            if stat.S_ISREG(info.st_mode):
                yield path, info


def evict(root: Path, cap_bytes: float, now: float | None = None, grace: float = GRACE_SECONDS) -> list[Path]:
    """Delete least recently touched entries under ``root`` until they total at most ``cap_bytes``.

    Skips entries in use (this process's :func:`in_use`, or touched within ``grace`` seconds);
    deletes temporary files older than an hour and ignores younger ones. Returns what it deleted.
    """
    now = time.time() if now is None else now
    entries, total = [], 0
    for path, info in _entries(root):
        if path.name.endswith(".tmp"):
            if now - info.st_mtime > STALE_TEMPORARY_SECONDS:
                with suppress(OSError):
                    path.unlink()
            continue
        entries.append((info.st_mtime, path, info.st_size))
        total += info.st_size
    removed = []
    for _, path, size in sorted(entries):
        if total <= cap_bytes:
            break
        with _lock:  # a reader of this process waits, then finds the entry missing and recomputes it
            if _identity(path) in _in_use:
                continue
            try:
                if now - path.stat().st_mtime < grace:  # re-read: another process may have just touched it
                    continue
                path.unlink()
            except FileNotFoundError:
                pass  # another process evicted it first
            except OSError:
                continue
        total -= size
        removed.append(path)
    return removed


class DiskCache:
    """One folder of the bounded cache (``root/folder``): atomic writes, touching reads, eviction after writes."""

    def __init__(self, root: Path, folder: str):
        if folder not in FOLDERS:
            raise ValueError(f"{folder!r} is not one of the cache folders {FOLDERS} that eviction scans")
        max_bytes()  # a bad MERGING_CACHE_MAX_GB fails before any work, not after the first computation
        self.root = Path(root)
        self.directory = self.root / folder

    def path(self, name: str) -> Path:
        return self.directory / name

    def read(self, name: str, load: Callable[[Path], T]) -> T | None:
        """``load(path)`` of an entry, touched as recently used; None if it is missing or damaged."""
        path = self.path(name)
        with in_use(path):
            try:
                os.utime(path)
            except OSError:
                return None
            try:
                return load(path)
            except Exception:  # a damaged entry is treated as missing: recomputed, never trusted
                return None

    def write(self, name: str, write: Callable[[Path], None]) -> Path:
        """Write an entry atomically, then evict others until the cache fits the cap (never this one)."""
        path = self.path(name)
        with in_use(path):
            write_atomic(path, write)
            evict(self.root, max_bytes())
        return path
