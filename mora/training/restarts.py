"""ReLoRA / ReMoRA restarts (PAPER.md §2.5): every N steps merge the adapter into the frozen weights, re-initialise it,
reset optimizer state and re-warm the learning rate (the jagged schedule).

ReMoRA also switches the sharing groups at each restart: the paper toggles two kinds (App. B: `sharing` <->
`sharing_chunked`), the authors' code cycles four (`remora_types=4`: types 1 -> 2 -> 3 -> 4 -> 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from mora.adapters.peft_tuner import MoraLayer

REGROUP_CYCLES: dict[str, tuple[str, ...]] = {
    "paper": ("sharing", "sharing_chunked"),
    "code": ("sharing", "sharing_chunked", "sharing_chunked_in", "sharing_chunked_out"),
}
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


def next_grouping(compression: str, regroup: str) -> str:
    """The operator ReMoRA switches to at a restart."""
    if regroup not in REGROUP_CYCLES:
        raise ValueError(f"unknown ReMoRA regroup schedule {regroup!r}; choose one of {', '.join(REGROUP_CYCLES)}")
    cycle = REGROUP_CYCLES[regroup]
    if compression not in cycle:
        raise ValueError(
            f"ReMoRA regroups sharing operators ({', '.join(cycle)}); compression={compression!r} has no regrouping"
        )
    return cycle[(cycle.index(compression) + 1) % len(cycle)]


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
        """Merge every adapter layer, re-initialise it, regroup MoRA, reset optimizer state. Returns layers done.
        In a multi-process run every process must call it: the re-initialised adapter comes from process 0."""
        adapter_params: list[nn.Parameter] = []
        layers = 0
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, MoraLayer):
                    adapter_params += self._restart_mora(module)
                elif isinstance(module, LoraLayer):
                    adapter_params += self._restart_lora(module)
                else:
                    continue
                layers += 1
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                for p in adapter_params:  # every process drew its own new A (its dropout used the RNG differently):
                    torch.distributed.broadcast(p.data, src=0)  # process 0's, as DDP broadcast them at the start
        if optimizer is not None:
            if self.optimizer_reset == "full":
                optimizer.state.clear()
            else:
                for p in adapter_params:
                    optimizer.state.pop(p, None)
        return layers

    def _restart_mora(self, layer: MoraLayer) -> list[nn.Parameter]:
        layer.merge()
        layer.merged_adapters.clear()  # the merge is permanent: the base weights now hold dW
        for name in list(layer.mora_M.keys()):
            layer.mora_M[name].zero_()
            if self.regroup is not None:
                layer.set_compression(name, next_grouping(layer.mora_compression[name], self.regroup))
        return list(layer.mora_M.values())

    def _restart_lora(self, layer: LoraLayer) -> list[nn.Parameter]:
        layer.merge()
        layer.merged_adapters.clear()
        for name in list(layer.lora_A.keys()):
            layer.reset_lora_parameters(name, init_lora_weights=True)
        return [*layer.lora_A.parameters(), *layer.lora_B.parameters()]
