"""The Hugging Face Hub: resolve repository ids to local files through ``huggingface_hub``.

Everything goes through the standard Hub cache (``HF_HOME``, ``HF_HUB_CACHE``), a token in
``HF_TOKEN`` and the library's offline mode (``HF_HUB_OFFLINE=1``). Only the files a
checkpoint, backbone or dataset split needs are downloaded: the repository's file list is
read first (a dry run, which downloads nothing), the files are chosen from it, their size is
checked against a cap, and only then are they fetched; a repository (or dataset split) is
listed once per process, later calls reuse the listing. When the Hub cannot be reached, the
cache answers; if it holds nothing for the id the error says so at once. Repository code is
never executed: only JSON configs, safetensors (and, on explicit opt-in, pickles read with
``weights_only=True``) and parquet files are ever fetched.
"""

from __future__ import annotations

import fnmatch
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from merging.errors import MergingError
from merging.io.paths import expanded

HF_HUB_PREFIX = "hf-hub:"
DEFAULT_SIZE_CAP_GB = 4.0  # ViT-L/14 CLIPModel in float32 is 1.7 GB; a cap catches a wrong id early
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CONFIGS = ("config.json", "open_clip_config.json", "model.safetensors.index.json")
_WEIGHT_PRIORITY = ("model.safetensors", "open_clip_model.safetensors")
_PICKLES = ("pytorch_model.bin", "open_clip_pytorch_model.bin", "*.bin", "*.pt", "*.pth")

# fetch()'s memory: (Hub cache, offline, type, id, revision, patterns) → (snapshot folder, file list)
_listings: dict[tuple, tuple[Path, tuple[str, ...]]] = {}
_listing_locks: dict[tuple, threading.Lock] = {}
_listings_lock = threading.Lock()


class HubError(MergingError):
    """A repository id that cannot be resolved; the message names the id and why."""


@dataclass(frozen=True)
class HubRef:
    """A repository id with an optional revision (``org/name@rev``) and its type."""

    repo_id: str
    revision: str | None = None
    repo_type: str = "model"

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(text: str, repo_type: str = "model") -> HubRef | None:
    """``org/name[@revision]`` or ``hf-hub:org/name[@revision]`` → a HubRef; None if it is not one.

    A string that names an existing local path is never a Hub id.
    """
    explicit = text.startswith(HF_HUB_PREFIX)
    body = text[len(HF_HUB_PREFIX) :] if explicit else text
    if not explicit and expanded(text).exists():
        return None
    repo, _, revision = body.partition("@")
    if not _REPO_ID.match(repo):
        if explicit:
            raise HubError(f"{text}: not a Hub repository id (expected hf-hub:ORG/NAME[@REVISION])")
        return None
    return HubRef(repo, revision or None, repo_type)


def size_cap_bytes() -> float:
    """The download cap: ``MERGING_MAX_DOWNLOAD_GB`` (default 4 GB) per checkpoint or split."""
    raw = os.environ.get("MERGING_MAX_DOWNLOAD_GB", str(DEFAULT_SIZE_CAP_GB))
    try:
        return float(raw) * 1e9
    except ValueError:
        raise MergingError(f"MERGING_MAX_DOWNLOAD_GB={raw!r} is not a number") from None


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _describe(ref: HubRef) -> str:
    return f"{'dataset' if ref.repo_type == 'dataset' else 'repository'} {ref}"


def _snapshot(ref: HubRef, patterns: Sequence[str], *, dry_run: bool = False, local_only: bool = False):
    from huggingface_hub import snapshot_download

    return snapshot_download(
        ref.repo_id,
        repo_type=ref.repo_type,
        revision=ref.revision,
        allow_patterns=list(patterns),
        local_files_only=local_only,
        dry_run=dry_run,
        etag_timeout=10,
    )


def _translate(ref: HubRef, exc: Exception) -> HubError:
    """One line naming the id for each way the Hub can refuse."""
    from huggingface_hub import errors

    what = _describe(ref)
    if isinstance(exc, errors.GatedRepoError):
        return HubError(f"{what} is gated: accept its terms on the Hub and set HF_TOKEN")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return HubError(f"{what} not found on the Hub (or private: set HF_TOKEN)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return HubError(f"{what}: revision {ref.revision!r} not found")
    if isinstance(exc, errors.LocalEntryNotFoundError | errors.DryRunError | errors.CachedRepoTreeNotFoundError):
        mode = "offline mode (HF_HUB_OFFLINE=1) is on" if is_offline() else "the Hub cannot be reached"
        return HubError(f"{what} is not in the local Hub cache and {mode}")
    return HubError(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def fetch(ref: HubRef, choose: Callable[[list[str]], list[str]], patterns: Sequence[str] = ("*",)) -> Path:
    """Download the files ``choose`` picks from the repository's files matching ``patterns``.

    Online: a dry run lists the files (nothing is downloaded), ``choose`` picks, the picked
    files' total size is checked against the cap, then only they are fetched. Offline or
    unreachable: the cached snapshot answers, or an error names the id at once.
    Returns the local snapshot folder.

    Each listing costs HTTP requests, so a successful one is remembered for the life of the
    process per (Hub cache, offline mode, repository, revision, patterns): the same split or
    checkpoint is listed once, and later calls only re-run ``choose`` on the remembered file
    list and check that its files are still on disk (if not, it is resolved afresh).
    """
    key = (_hub_cache(), is_offline(), ref.repo_type, ref.repo_id, ref.revision, tuple(patterns))
    with _listings_lock:
        key_lock = _listing_locks.setdefault(key, threading.Lock())
    with key_lock:  # a concurrent caller for the same key waits and then finds the listing
        remembered = _listings.get(key)
        if remembered is not None:
            folder, files = remembered
            if all((folder / f).is_file() for f in choose(list(files))):
                return folder
        folder, files = _resolve(ref, choose, patterns)
        _listings[key] = (folder, tuple(files))
        return folder


def clear_listing_cache() -> None:
    """Forget every remembered listing (tests; or to see a revision that moved since the first call)."""
    with _listings_lock:
        _listings.clear()
        _listing_locks.clear()


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _resolve(ref: HubRef, choose: Callable[[list[str]], list[str]], patterns: Sequence[str]) -> tuple[Path, list[str]]:
    """:func:`fetch` without the memory: the snapshot folder and the file list ``choose`` was given."""
    from huggingface_hub import errors

    if not is_offline():
        try:
            listing = _snapshot(ref, patterns, dry_run=True)
        except errors.DryRunError:
            listing = None  # the Hub cannot be reached: fall back to the cache below
        except Exception as exc:  # every Hub failure becomes one line naming the id
            raise _translate(ref, exc) from None
        if listing is not None:
            sizes = {info.filename: info.file_size or 0 for info in listing}
            chosen = choose(sorted(sizes))
            to_download = sum(sizes[f] for f in chosen if not _is_cached(listing, f))
            if to_download > size_cap_bytes():
                raise HubError(
                    f"{_describe(ref)}: {', '.join(chosen)} would download {to_download / 1e9:.2f} GB, over the "
                    f"{size_cap_bytes() / 1e9:.1f} GB cap (raise MERGING_MAX_DOWNLOAD_GB to allow it)"
                )
            try:
                return Path(_snapshot(ref, chosen)), sorted(sizes)
            except Exception as exc:  # every Hub failure becomes one line naming the id
                raise _translate(ref, exc) from None
    try:
        folder = Path(_snapshot(ref, patterns, local_only=True))
    except Exception as exc:
        raise _translate(ref, exc) from None
    present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    chosen = choose(present)
    missing = [f for f in chosen if not (folder / f).is_file()]
    if missing:
        raise HubError(f"{_describe(ref)}: {missing[0]} is not in the local Hub cache and the Hub cannot be reached")
    return folder, present


def _is_cached(listing, filename: str) -> bool:
    return any(info.filename == filename and info.is_cached for info in listing)


# ------------------------------------------------------------ what to fetch


def choose_model_files(files: list[str], allow_pickle: bool = False, source: str = "") -> list[str]:
    """Configs plus the one set of weights ``resolve_source`` would read (safetensors first)."""
    top = [f for f in files if "/" not in f]
    chosen = [f for f in _CONFIGS if f in top]
    if "model.safetensors.index.json" in top:
        return chosen + sorted(f for f in top if f.startswith("model-") and f.endswith(".safetensors"))
    for name in _WEIGHT_PRIORITY:
        if name in top:
            return [*chosen, name]
    safetensors = sorted(f for f in top if f.endswith(".safetensors"))
    if len(safetensors) == 1:
        return chosen + safetensors
    if len(safetensors) > 1:
        raise HubError(f"{source}: several safetensors files ({', '.join(safetensors)}); name one as a path")
    pickles = [f for pattern in _PICKLES for f in top if fnmatch.fnmatch(f, pattern)]
    if pickles and not allow_pickle:
        raise HubError(
            f"{source} holds only pickle weights ({pickles[0]}); they are refused unless you opt in "
            "(the allow-pickle option), and are then read with torch.load(weights_only=True)"
        )
    if pickles:
        return [*chosen, pickles[0]]
    raise HubError(f"no supported weights in {source} (looked for model.safetensors, *.safetensors)")


def model_folder(source: str, allow_pickle: bool = False) -> Path | None:
    """The local snapshot folder of a Hub checkpoint id, or None if ``source`` is not a Hub id."""
    ref = parse_hub_id(source)
    if ref is None:
        return None
    return fetch(ref, lambda files: choose_model_files(files, allow_pickle, str(ref)))


def dataset_split_patterns(split: str, config: str | None = None) -> list[str]:
    """Where Hub datasets keep a split's parquet files (the layouts the Hub's converter writes)."""
    prefixes = [f"{config}/", f"data/{config}/", ""] if config else ["data/", ""]
    names = [f"{split}-*.parquet", f"{split}.parquet", f"{split}/*.parquet"]
    return [prefix + name for prefix in prefixes for name in names] + [f"**/{split}-*.parquet"]


def dataset_folder(repo: str, split: str, config: str | None = None) -> Path:
    """The local snapshot folder holding a Hub dataset split's parquet files."""
    ref = parse_hub_id(repo, repo_type="dataset") or parse_hub_id(HF_HUB_PREFIX + repo, repo_type="dataset")
    patterns = dataset_split_patterns(split, config)

    def choose(files: list[str]) -> list[str]:
        chosen = [f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)]
        if not chosen:
            raise HubError(f"dataset {ref}: no parquet files for split {split!r}")
        return chosen

    return fetch(ref, choose, patterns)


# ------------------------------------------------------------ search


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hub endpoint accepts a TCP connection within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def search_checkpoints(search: str, author: str | None = None, limit: int = 50, timeout: float = 2.0) -> list[str]:
    """Repository ids of models matching ``search`` (e.g. ``clip-vit-base-patch32``), most downloaded first.

    A convenience for choosing checkpoints: offline, or when the Hub does not accept a
    connection within ``timeout`` seconds, it returns an empty list at once instead of
    raising or retrying.
    """
    if is_offline() or not hub_reachable(timeout):
        return []
    from huggingface_hub import HfApi

    try:
        models = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).list_models(
            search=search, author=author, limit=limit, sort="downloads"
        )
        return [m.id for m in models]
    except Exception:  # rate-limited or refused: searching is optional
        return []
