"""merging.compute.memory: glibc's malloc keeps an evaluation's freed blocks, and only there."""

from __future__ import annotations

from pathlib import Path

import pytest

from merging.compute import memory

PROJECT = Path(__file__).resolve().parents[1]


def test_it_tunes_glibc_and_answers_whether_it_did():
    if memory.platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert memory.keep_freed_memory({}) is True


def test_zero_in_the_environment_leaves_the_defaults(monkeypatch):
    calls = []
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda *a: calls.append(a))
    assert memory.keep_freed_memory({memory.ENV: "0"}) is False
    assert memory.keep_freed_memory({memory.ENV: " 0 "}) is False
    assert calls == []  # libc was not even opened


def test_nothing_happens_outside_glibc(monkeypatch):
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda *a: pytest.fail("libc opened outside glibc"))
    assert memory.keep_freed_memory({}) is False


def test_a_refused_setting_is_reported(monkeypatch):
    class Libc:
        def __init__(self, answers):
            self.mallopt = Mallopt(answers)

    class Mallopt:
        def __init__(self, answers):
            self.answers, self.argtypes, self.restype, self.seen = list(answers), None, None, []

        def __call__(self, parameter, value):
            self.seen.append((parameter, value))
            return self.answers.pop(0)

    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    for answers, expected in (([1, 1], True), ([1, 0], False), ([0, 1], False)):
        libc = Libc(answers)
        monkeypatch.setattr(memory.ctypes, "CDLL", lambda *a, libc=libc: libc)
        assert memory.keep_freed_memory({}) is expected
        assert libc.mallopt.seen[0] == (memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD)


@pytest.mark.parametrize("entry", ["merging/__main__.py", "app.py"])
def test_the_entry_points_tune_at_start_up(entry):
    assert "\nkeep_freed_memory()" in (PROJECT / entry).read_text()
