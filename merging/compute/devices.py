"""Choosing the compute device, and measuring peak memory on it.

Peak host memory is the process's resident-set high-water mark (``VmHWM``), which Linux
lets a process reset by writing 5 to ``/proc/self/clear_refs``; so a peak can be taken
over one region of a run. On CUDA, torch's allocator statistics are used.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from merging.errors import MergingError

DEVICE_CHOICES = ("auto", "cpu", "cuda")
# Set in the worker process of a ZeroGPU Space's spaces.GPU window (merging.ui.zerogpu.compute).
GPU_WINDOW_VARIABLE = "MERGING_GPU_WINDOW"


def outside_zerogpu_window() -> bool:
    """On a ZeroGPU Space, whether this is the app's own process, where CUDA cannot be initialised.

    There CUDA exists only in the worker that runs a ``spaces.GPU`` function (the Lab tab's
    runs); the Merge and Sweep tabs compute in the app's process, so they must stay on the CPU.
    """
    on_zerogpu = os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")
    return on_zerogpu and os.environ.get(GPU_WINDOW_VARIABLE) != "1"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; asking for absent CUDA is an error.

    On a ZeroGPU Space outside the GPU window ``auto`` is the CPU and ``cuda`` an error that
    says why, instead of a CUDA that fails at its first use.
    """
    if name == "auto":
        if outside_zerogpu_window():
            return torch.device("cpu")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if outside_zerogpu_window():
            raise MergingError(
                "device cuda: on this ZeroGPU Space a GPU is lent only to the Lab tab's runs; "
                "merge and sweep here on the cpu (device auto or cpu)"
            )
        if not torch.cuda.is_available():
            raise MergingError("device cuda was asked for, but CUDA is not available on this machine")
        return torch.device("cuda")
    raise MergingError(f"unknown device {name!r}; valid devices: {', '.join(DEVICE_CHOICES)}")


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def resident_bytes() -> int | None:
    """Current resident set size of this process, or None where /proc is unavailable."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_memory(device: torch.device | None = None) -> bool:
    """Start a new peak-memory window; False where the platform cannot reset the host peak."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_bytes(device: torch.device | None = None) -> int | None:
    """Peak since the last reset: GPU bytes allocated on CUDA, else the host's resident peak."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def memory_in_use(device: torch.device | None = None) -> int | None:
    """Bytes in use now, on the same scale as :func:`peak_memory_bytes` (GPU allocated, or host RSS)."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return resident_bytes()
