"""The spectrum of the weight update: singular values of ΔW per adapted module (Fig. 5, after ReLoRA's analysis).

    ΔW = W_now - W_0      W_now: the layer's base weight plus its unmerged adapters' delta; W_0: the base weight
                          as built at step 0

For LoRA / MoRA the base weight never changes, so ΔW is the adapter's delta; for ReLoRA / ReMoRA the merges have
moved the base weight, and ΔW is everything accumulated since step 0. Fig. 5 counts singular values above 0.1,
averaged over the layers of each module type (q, k, v, o, gate, up, down).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

THRESHOLD = 0.1  # Fig. 5
PEFT_PREFIX = "base_model.model."


def effective_weight(layer: BaseTunerLayer) -> Tensor:
    """The weight the layer applies now (d_out, d_in), float32: base + the delta of every active, unmerged adapter."""
    weight = layer.get_base_layer().weight.detach().float()
    adapters = getattr(layer, layer.adapter_layer_names[0])
    for name in layer.active_adapters:
        if name in adapters and name not in layer.merged_adapters:
            weight = weight + layer.get_delta_weight(name).detach().float()
    return weight


def initial_weights(model: nn.Module, module_names: list[str]) -> dict[str, Tensor]:
    """The weights of a model as built at step 0, by module name, for the named modules."""
    modules = dict(model.named_modules())
    return {name: modules[name].weight.detach() for name in module_names}


def adapted_layers(model: nn.Module) -> dict[str, BaseTunerLayer]:
    """Every adapter layer of a PEFT model, keyed by its module name in the base model."""
    return {
        name.removeprefix(PEFT_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer)
    }


def iter_delta_weights(model: nn.Module, initial: Mapping[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """(name, ΔW (d_out, d_in)) of every adapter layer, one at a time: its weight now minus its weight at step 0."""
    for name, layer in adapted_layers(model).items():
        yield name, effective_weight(layer) - initial[name].to(layer.get_base_layer().weight.device).float()


def delta_weights(model: nn.Module, initial: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return dict(iter_delta_weights(model, initial))


def spectrum(
    deltas: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], threshold: float = THRESHOLD
) -> dict[str, Any]:
    """Per module type (the last part of the name): each layer's singular values (descending), how many exceed
    threshold, and their mean over layers. `deltas` may be a generator: then one ΔW is held at a time."""
    by_type: dict[str, dict[str, list]] = defaultdict(lambda: {"layers": [], "singular_values": [], "above": []})
    for name, delta in deltas.items() if isinstance(deltas, Mapping) else deltas:
        values = torch.linalg.svdvals(delta.float()).cpu()
        entry = by_type[name.rsplit(".", 1)[-1]]
        entry["layers"].append(name)
        entry["singular_values"].append([float(f"{v:.5g}") for v in values.tolist()])
        entry["above"].append(int((values > threshold).sum()))
    return {
        kind: {**entry, "mean_above": statistics.mean(entry["above"]), "threshold": threshold}
        for kind, entry in by_type.items()
    }
