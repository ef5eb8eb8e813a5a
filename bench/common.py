"""Shared pieces of the benchmarks: interleaved median timing (wall clock on CPU, CUDA events on a GPU), FLOP
floors, and writing results/bench/ (or another folder)."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mora.adapters.mora import surviving_chunks
from mora.paths import REPO_ROOT
from mora.provenance import commit

RESULTS = REPO_ROOT / "results" / "bench"
LLAMA_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of fn takes: the wall clock on CPU; on CUDA, events recorded around it on the stream, read
    after a synchronisation (the call's kernels, not the time Python took to queue them)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def interleaved_times(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, device: torch.device | None = None
) -> dict[str, list[float]]:
    """Seconds of each function per round, timing them round-robin so drift in the machine hits all alike."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, device: torch.device | None = None
) -> dict[str, float]:
    """Median seconds of each function, timed round-robin."""
    return {name: statistics.median(ts) for name, ts in interleaved_times(fns, repeats, warmup, device).items()}


def paired_ratios(times: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """Median over rounds of (time / the baseline's time in the same round): a slow or fast moment of a shared
    machine moves both terms of a ratio, where a ratio of two medians would keep it."""
    return {
        name: statistics.median(t / b for t, b in zip(ts, times[baseline], strict=True)) for name, ts in times.items()
    }


def extra_flops_fwd_bwd(method: str, d_in: int, d_out: int, r: int, r_hat: int | None) -> float:
    """Multiply-adds x 2 per token that an adapter adds to forward + backward (frozen base: backward is dx only)."""
    if method in ("lora", "dora"):
        return 6.0 * r * (d_in + d_out)
    if method in ("rope", "decouple"):
        return 6.0 * surviving_chunks(d_in, d_out, r_hat) * r_hat * r_hat
    return 6.0 * r_hat * r_hat  # sharing family and truncation: one r_hat x r_hat product


def floor_ratio(method: str, d_in: int, d_out: int, r: int, r_hat: int | None) -> float:
    """FLOP floor of forward + backward relative to the frozen base layer (4 * d_in * d_out per token)."""
    if method == "base":
        return 1.0
    return 1.0 + extra_flops_fwd_bwd(method, d_in, d_out, r, r_hat) / (4.0 * d_in * d_out)


def run_case(script: str, *args: str) -> dict[str, Any] | None:
    """Run `script --case ARGS` in a fresh process (its memory is this case's alone) and return the JSON it prints
    last; None, after printing why, when the case refuses its shape or fails."""
    result = subprocess.run([sys.executable, script, "--case", *args], capture_output=True, text=True)
    if result.returncode:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"skip {' '.join(args)}: {reason}", flush=True)
        return None
    row = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"done {' '.join(args)}", flush=True)
    return row


def machine() -> dict[str, Any]:
    head, dirty = commit()
    return {
        "commit": head,
        "git_dirty": dirty,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def write(name: str, payload: dict[str, Any], table: str, out: Path = RESULTS, quiet: bool = False) -> list[Path]:
    """Print the Markdown table and write <out>/<name>.json (with the machine) and <name>.md."""
    info = machine()
    changes = {True: " (with uncommitted changes)", False: "", None: " (copied without .git: changes unknown)"}
    table += (
        f"\nMeasured at commit {info['commit'][:7]}{changes[info['git_dirty']]}, "
        f"torch {info['torch']}, {info['threads']} threads, {info['device']}.\n"
    )
    if not quiet:
        print(table)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps({"machine": info, **payload}, indent=2))
    paths[1].write_text(table)
    return paths
