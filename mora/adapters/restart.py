"""ReLoRA / ReMoRA's restart on the adapter side (PAPER.md §2.5): merge every adapter layer into its frozen weights,
re-initialise it and, for ReMoRA, switch its sharing groups. When a run restarts, its jagged learning rate and what
becomes of the optimizer's state are the training loop's (mora.training.restarts).

ReMoRA switches the sharing groups at each restart: the paper toggles two kinds (App. B: `sharing` <->
`sharing_chunked`), the authors' code cycles four (`remora_types=4`: types 1 -> 2 -> 3 -> 4 -> 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from mora.adapters.peft_tuner import MoraLayer

REGROUP_CYCLES: dict[str, tuple[str, ...]] = {
    "paper": ("sharing", "sharing_chunked"),
    "code": ("sharing", "sharing_chunked", "sharing_chunked_in", "sharing_chunked_out"),
}

DEFAULT_REGROUP = "paper"


def regroup_of(adapter: Mapping[str, Any]) -> str | None:
    """The regrouping cycle of an adapter config: ReMoRA's `regroup` (the paper's by default), none otherwise."""
    if adapter.get("method") != "remora":
        return None
    regroup = adapter.get("regroup")
    return DEFAULT_REGROUP if regroup is None else str(regroup)


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


def restart_adapters(model: nn.Module, regroup: str | None = None) -> tuple[int, list[nn.Parameter]]:
    """Merge every adapter layer of `model`, re-initialise it (LoRA: A drawn anew, B = 0; MoRA: M = 0) and, with
    `regroup`, switch MoRA's operator to the next of its cycle. In a multi-process run every process must call it:
    the re-initialised adapter comes from process 0. Returns the layers done and the adapters' parameters."""
    adapter_params: list[nn.Parameter] = []
    layers = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MoraLayer):
                adapter_params += _restart_mora(module, regroup)
            elif isinstance(module, LoraLayer):
                adapter_params += _restart_lora(module)
            else:
                continue
            layers += 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for p in adapter_params:  # every process drew its own new A (its dropout used the RNG differently):
                torch.distributed.broadcast(p.data, src=0)  # process 0's, as DDP broadcast them at the start
    return layers, adapter_params


def _restart_mora(layer: MoraLayer, regroup: str | None) -> list[nn.Parameter]:
    layer.merge()
    layer.merged_adapters.clear()  # the merge is permanent: the base weights now hold dW
    for name in list(layer.mora_M.keys()):
        layer.mora_M[name].zero_()
        if regroup is not None:
            layer.set_compression(name, next_grouping(layer.mora_compression[name], regroup))
    return list(layer.mora_M.values())


def _restart_lora(layer: LoraLayer) -> list[nn.Parameter]:
    layer.merge()
    layer.merged_adapters.clear()
    for name in list(layer.lora_A.keys()):
        layer.reset_lora_parameters(name, init_lora_weights=True)
    return [*layer.lora_A.parameters(), *layer.lora_B.parameters()]
