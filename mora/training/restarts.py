"""ReLoRA / ReMoRA restarts in training (PAPER.md §2.5): every N steps the adapter is merged and re-initialised
(mora.adapters.restart), the optimizer's state reset, and the learning rate re-warmed (the jagged schedule).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mora.adapters.restart import REGROUP_CYCLES, regroup_of, restart_adapters

OPTIMIZER_RESETS = ("full", "adapter")
SCHEDULES = ("cosine", "linear", "constant")


def schedule_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """LR multiplier at update `step` (0-based) of a warmup + decay schedule, as transformers' schedulers."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def jagged_factor(kind: str, step: int, warmup: int, total: int, every: int, restart_warmup: int) -> float:
    """LR multiplier of the jagged schedule: after each restart at g (every g = k * every < total updates), the
    LR warms from 0 back to the value it had at g over `restart_warmup` updates, then decays with the same shape
    over the remaining total - g updates (the authors' scheduler reset, PAPER.md §2.5)."""
    scale, start, seg_warmup = 1.0, 0, warmup
    for g in range(every, min(step, total - 1) + 1, every):
        scale *= schedule_factor(kind, g - start, seg_warmup, total - start)
        start, seg_warmup = g, restart_warmup
    return scale * schedule_factor(kind, step - start, seg_warmup, total - start)


@dataclass
class Restarts:
    """Merge-and-restart policy for ReLoRA (LoRA layers) and ReMoRA (MoRA layers)."""

    every: int
    warmup: int = 50
    optimizer_reset: str = "full"
    regroup: str | None = None  # ReMoRA only: "paper" or "code"

    def __post_init__(self) -> None:
        if self.every <= 0:
            raise ValueError(f"restart interval must be a positive number of steps, got {self.every}")
        if self.warmup < 0:
            raise ValueError(f"restart warmup must be >= 0, got {self.warmup}")
        if self.optimizer_reset not in OPTIMIZER_RESETS:
            raise ValueError(
                f"unknown optimizer_reset {self.optimizer_reset!r}; choose one of {', '.join(OPTIMIZER_RESETS)}"
            )
        if self.regroup is not None and self.regroup not in REGROUP_CYCLES:
            raise ValueError(f"unknown regroup {self.regroup!r}; choose one of {', '.join(REGROUP_CYCLES)}")

    def due(self, global_step: int, total: int) -> bool:
        """True after the update that completes `global_step` updates, when a restart follows it."""
        return global_step % self.every == 0 and 0 < global_step < total

    def restart(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Merge and re-initialise every adapter layer (regrouping MoRA's for ReMoRA), reset the optimizer's state
        as `optimizer_reset` says. Returns the layers done. In a multi-process run every process must call it."""
        layers, adapter_params = restart_adapters(model, self.regroup)
        if optimizer is not None:
            if self.optimizer_reset == "full":
                optimizer.state.clear()
            else:
                for p in adapter_params:
                    optimizer.state.pop(p, None)
        return layers


def restarts_of(adapter: Mapping[str, Any]) -> Restarts | None:
    """The restart policy of an adapter config (`restart.{every, warmup, optimizer_reset}`, ReMoRA's `regroup`):
    ReLoRA and ReMoRA have one, every other method none."""
    method = adapter.get("method")
    if method not in ("relora", "remora"):
        return None
    restart = adapter.get("restart") or {}

    def get(key: str, default: Any) -> Any:
        value = restart.get(key)
        return default if value is None else value

    return Restarts(
        every=int(get("every", 2000)),
        warmup=int(get("warmup", 50)),
        optimizer_reset=str(get("optimizer_reset", "full")),
        regroup=regroup_of(adapter),
    )
