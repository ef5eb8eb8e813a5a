"""Peak memory of one measured span in a process that may already have run others (the runner's in-process runs,
the benchmarks' cases): resident memory on the CPU, allocated memory on a CUDA device."""

from __future__ import annotations

import resource
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")  # Linux: VmRSS, VmHWM


def reset_peak_rss() -> int:
    """Start a peak-memory measurement: the current RSS in bytes, with the peak mark reset to it.

    Linux: writing 5 to /proc/self/clear_refs resets VmHWM. `ru_maxrss` cannot be reset, and a child started from a
    big parent begins with the parent's (exec keeps the larger mark), which hid every case's peak once the bench's
    own process had grown. Elsewhere: `ru_maxrss`, run each case in a fresh process from a small parent."""
    if _STATUS.exists():
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    """Peak RSS in bytes since `reset_peak_rss` (Linux), or of the process (elsewhere)."""
    if _STATUS.exists():
        return _status_kib("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"{_STATUS} has no {field}")


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring the peak of a span: RSS, and on a CUDA device its allocated memory."""
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """The peaks since `reset_peak_memory`, in MiB: peak_rss_mb, and peak_cuda_mb on a CUDA device."""
    peaks = {"peak_rss_mb": round(peak_rss() / 2**20, 1)}
    if device.type == "cuda":
        peaks["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peaks
