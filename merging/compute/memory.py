"""Keep freed blocks in the process, so that every evaluation batch does not page-fault afresh.

glibc's malloc serves blocks from 128 KiB up (a threshold it raises on its own to a few MiB)
with ``mmap``, and gives the top of the heap back to the kernel when more than twice that
threshold is free there. An evaluation batch's activations are blocks of a few MiB, freed and
allocated again at every batch and every layer, so each batch used to fault all of its memory
in again from the kernel: on this 2-core CPU the mini tower spent 0.12 s on 500 images at two
threads with glibc's defaults and 0.066 s with the settings below (0.18 s and 0.115 s at one
thread; ``benchmarks/malloc_tuning.py`` measures it). The settings: blocks below 32 MiB (glibc's
largest mmap threshold) come from the heap, and the heap is trimmed only when more than
:data:`TRIM_THRESHOLD` is free at its top. Whole encoders and flat buffers, larger than 32 MiB,
still come from ``mmap`` and go back when freed, so a process keeps at most that much free heap
beyond the peak of its small blocks. The numbers computed are the same either way.

The entry points (``python -m merging``, ``app.py``) call :func:`keep_freed_memory` once at
start-up; a library user may call it too. ``MERGING_MALLOC_TUNING=0`` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV = "MERGING_MALLOC_TUNING"
M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum for it on 64-bit systems
TRIM_THRESHOLD = 512 << 20


def keep_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """Raise glibc's mmap and trim thresholds (see the module docstring); whether it did.

    Nothing happens outside glibc (macOS, Windows, musl), or when ``MERGING_MALLOC_TUNING`` is 0.
    """
    environ = os.environ if environ is None else environ
    if environ.get(ENV, "").strip() == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt answers 1 on success; both must hold, or the batches still fault
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
