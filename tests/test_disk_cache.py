"""The bounded disk cache: atomic writes, touching reads, least-recently-used eviction that spares entries in use."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from merging.errors import MergingError
from merging.evaluation.backbones import Preprocess
from merging.evaluation.datasets import ImageCache
from merging.evaluation.tasks import registry
from merging.io.disk_cache import GRACE_SECONDS, DiskCache, evict, in_use, max_bytes, write_atomic

PAST = 10 * GRACE_SECONDS  # older than the grace window


def entry(root: Path, name: str, size: int = 100, age: float = PAST) -> Path:
    """A cache entry of ``size`` bytes last touched ``age`` seconds ago."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    backdate(path, age)
    return path


def backdate(path: Path, age: float) -> None:
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_a_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "heads" / "h.bin"
    write_atomic(path, lambda p: p.write_bytes(b"old" * 1000))
    seen_mid_write = []

    def half_then_rest(temporary: Path) -> None:
        with temporary.open("wb") as handle:
            handle.write(b"new" * 500)
            handle.flush()
            seen_mid_write.append(path.read_bytes())  # what a concurrent reader sees now
            handle.write(b"new" * 500)

    write_atomic(path, half_then_rest)
    assert seen_mid_write == [b"old" * 1000] and path.read_bytes() == b"new" * 1000
    assert files(tmp_path) == {"heads/h.bin"}

    def fails(temporary: Path) -> None:
        temporary.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fails)
    assert files(tmp_path) == {"heads/h.bin"} and path.read_bytes() == b"new" * 1000


def test_readers_on_other_threads_only_ever_see_whole_entries(tmp_path):
    cache = DiskCache(tmp_path, "heads")
    versions = [bytes([i]) * 200_000 for i in range(20)]
    cache.write("h.bin", lambda p: p.write_bytes(versions[0]))
    done, seen = threading.Event(), []

    def reader() -> None:
        while not done.is_set():
            seen.append(cache.read("h.bin", lambda p: p.read_bytes()))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in versions[1:]:
            cache.write("h.bin", lambda p, v=version: p.write_bytes(v))
    finally:
        done.set()
        thread.join()
    assert seen and all(s in versions for s in seen)
    assert files(tmp_path) == {"heads/h.bin"}


def test_eviction_removes_the_least_recently_touched_entries_first(tmp_path):
    oldest = entry(tmp_path, "images/a.safetensors", age=PAST + 40)
    entry(tmp_path, "heads/b.safetensors", age=PAST + 30)
    entry(tmp_path, "references/c.json", age=PAST + 20)
    entry(tmp_path, "images/d.safetensors", age=PAST + 10)
    assert DiskCache(tmp_path, "images").read("a.safetensors", lambda p: p.read_bytes()) == b"x" * 100  # touched
    removed = evict(tmp_path, cap_bytes=250, grace=0)
    assert [p.name for p in removed] == ["b.safetensors", "c.json"]
    assert files(tmp_path) == {"images/a.safetensors", "images/d.safetensors"} and oldest.is_file()
    assert evict(tmp_path, cap_bytes=250, grace=0) == []


def test_writes_keep_the_cache_under_the_cap_and_never_evict_what_they_wrote(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGING_CACHE_MAX_GB", str(1000 / 1e9))  # 1000 bytes
    cache = DiskCache(tmp_path, "images")
    for index in range(5):
        cache.write(f"{index}.bin", lambda p: p.write_bytes(b"x" * 400))
        for older in range(index + 1):  # every entry left is outside the grace window, oldest first
            if cache.path(f"{older}.bin").is_file():
                backdate(cache.path(f"{older}.bin"), PAST + index - older)
    assert files(tmp_path) == {"images/3.bin", "images/4.bin"}
    big = cache.write("big.bin", lambda p: p.write_bytes(b"x" * 3000))  # alone over the cap: kept anyway
    assert big.is_file() and files(tmp_path) == {"images/big.bin"}


def test_entries_in_use_are_never_evicted(tmp_path):
    held = entry(tmp_path, "images/held.safetensors", age=PAST + 100)
    entry(tmp_path, "heads/other.safetensors")
    with in_use(held), in_use(tmp_path / "images" / "." / "held.safetensors"):  # re-entrant, any spelling
        with in_use(held):
            pass
        assert [p.name for p in evict(tmp_path, cap_bytes=0)] == ["other.safetensors"]
        assert held.is_file()
    assert evict(tmp_path, cap_bytes=0) == [held] and not held.exists()


def test_an_entry_another_thread_holds_is_spared(tmp_path):
    held = entry(tmp_path, "heads/held.safetensors")
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with in_use(held):
            holding.set()
            release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        holding.wait()
        assert evict(tmp_path, cap_bytes=0) == [] and held.is_file()
    finally:
        release.set()
        thread.join()
    assert evict(tmp_path, cap_bytes=0) == [held]


def test_fresh_entries_inside_the_grace_window_are_not_evicted(tmp_path):
    fresh = entry(tmp_path, "references/fresh.json", age=GRACE_SECONDS / 6)  # another process just wrote it
    stale = entry(tmp_path, "references/stale.json", age=PAST)
    assert evict(tmp_path, cap_bytes=0) == [stale]
    assert fresh.is_file()


def test_temporary_files_are_ignored_while_young_and_deleted_when_stale(tmp_path):
    young = entry(tmp_path, "images/a.safetensors.1-2-ab.tmp", size=10_000, age=PAST)
    old = entry(tmp_path, "images/b.safetensors.1-2-cd.tmp", size=10_000, age=2 * 3600)
    kept = entry(tmp_path, "images/c.safetensors", size=100)
    assert evict(tmp_path, cap_bytes=500) == []  # the young temporary file neither counts nor goes
    assert young.is_file() and not old.exists() and kept.is_file()


def test_only_the_caches_own_folders_are_scanned(tmp_path):
    mine = entry(tmp_path, "notes/mine.txt", size=10_000)
    evict(tmp_path, cap_bytes=0)
    assert mine.is_file()
    with pytest.raises(ValueError, match="not one of the cache folders"):
        DiskCache(tmp_path, "notes")


@pytest.mark.parametrize("value", ["ten", "-1", "0", "nan", ""])
def test_an_invalid_cap_is_a_one_line_error_naming_the_variable(tmp_path, monkeypatch, value):
    monkeypatch.setenv("MERGING_CACHE_MAX_GB", value)
    with pytest.raises(MergingError, match=r"^MERGING_CACHE_MAX_GB=.* is not a positive number") as raised:
        max_bytes()
    assert "\n" not in str(raised.value)
    with pytest.raises(MergingError, match="MERGING_CACHE_MAX_GB"):
        ImageCache(tmp_path)  # before any decoding, not after


def test_the_cap_defaults_to_ten_gigabytes_and_reads_fractions(monkeypatch):
    monkeypatch.delenv("MERGING_CACHE_MAX_GB", raising=False)
    assert max_bytes() == 10e9
    monkeypatch.setenv("MERGING_CACHE_MAX_GB", "0.5")
    assert max_bytes() == 0.5e9


def test_a_damaged_image_entry_is_treated_as_missing_and_rebuilt(tmp_path):
    task = registry().get("mini-land-cover")
    spec = Preprocess(image_size=8)
    first = ImageCache(tmp_path)
    data = first.load(task, "test", spec, limit=4)
    (stored,) = (tmp_path / "images").iterdir()
    stored.write_bytes(b"not a safetensors file")
    second = ImageCache(tmp_path)
    again = second.load(task, "test", spec, limit=4)
    assert second.decoded == 4 and torch.equal(again.images, data.images)
    third = ImageCache(tmp_path)  # the rebuilt entry was written back
    assert torch.equal(third.load(task, "test", spec, limit=4).images, data.images) and third.decoded == 0
    assert files(tmp_path) == {f"images/{stored.name}"}
