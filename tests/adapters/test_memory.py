"""Activation memory kept for backward by one adapted layer: at most LoRA's plus tokens x r_hat values (no full-width
copy of x), counted over distinct storages with saved_tensors_hooks. Bytes, not timings."""

import copy

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from mora import MoraConfig
from mora.adapters.peft_tuner import MoraLinear


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    # x is the caller's, parameters and buffers (weights, M, rotation tables) exist anyway: count activations only
    for t in (x, *layer.parameters(), *layer.buffers()):
        storages.pop(t.untyped_storage().data_ptr(), None)
    return sum(storages.values())


@pytest.mark.parametrize("d_in,d_out", [(96, 96), (96, 264), (264, 96)])
@pytest.mark.parametrize("compression", ["rope", "sharing", "decouple"])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("fused", [True, False])
def test_saved_for_backward_is_at_most_loras_plus_tokens_times_r_hat(
    d_in, d_out, compression, dropout, fused, monkeypatch
):
    if not fused:  # the path DeepSpeed ZeRO-3, hooked layers and several adapters take
        monkeypatch.setattr(MoraLinear, "_path", lambda *args: None)
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    x = torch.randn(4, 16, d_in, requires_grad=True)
    lora = LoraLinear(
        copy.deepcopy(base), "default", LoraConfig(r=2, lora_alpha=4, lora_dropout=dropout), r=2, lora_alpha=4
    )
    mora = MoraLinear(
        copy.deepcopy(base), "default", MoraConfig(r=2, compression=compression, dropout=dropout, init_weights=False)
    )
    lora.train()
    mora.train()
    r_hat = mora.mora_r_hat["default"]
    budget = saved_bytes(lora, x) + 4 * 16 * r_hat * x.element_size()
    assert saved_bytes(mora, x) <= budget
