"""MoraLayer: a PEFT tuner layer around nn.Linear (or GPT-2's Conv1D) adding delta(x) = f_decomp(M f_comp(x))."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from mora.adapters.compiled import compiled_mora_linear, wanted
from mora.adapters.fused import fused_mora_linear
from mora.adapters.inplace import VJP_COMPRESSIONS, add_delta_, add_delta_weight_
from mora.adapters.mora import (
    check_shapes,
    delta_weight,
    r_hat,
    rope_tables,
    surviving_chunks,
)

from .config import MoraConfig
from .folder import MoraAdapterError


def check_supported_base(base_layer: nn.Module, name: str = "") -> None:
    """Refuse base layers MoRA cannot merge into exactly: quantized or non-float weights, non-linear layers."""
    where = f" {name}" if name else ""
    weight = getattr(base_layer, "weight", None)
    quantized = (
        resolve_quantization_backend(base_layer) is not None
        or weight is None
        or not (weight.dtype.is_floating_point)
        or hasattr(weight, "quant_state")
    )
    if quantized:
        raise ValueError(
            f"MoRA does not support quantized base layers:{where} is {type(base_layer).__name__}"
            + (f" with {weight.dtype} weights" if weight is not None else "")
            + ". Load the base model unquantized (e.g. torch_dtype=torch.bfloat16)."
        )
    if not isinstance(base_layer, (nn.Linear, Conv1D)):
        raise ValueError(
            f"MoRA adapts nn.Linear and transformers' Conv1D layers only;{where} is {type(base_layer).__name__}. "
            "Remove it from target_modules."
        )


class MoraLayer(BaseTunerLayer):
    adapter_layer_names = ("mora_M",)
    other_param_names = ("mora_r", "mora_r_hat", "mora_compression", "mora_dropout", "mora_cos", "mora_sin")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.mora_r: dict[str, int] = {}
        self.mora_r_hat: dict[str, int] = {}
        self.mora_compression: dict[str, str] = {}
        self.mora_M = nn.ParameterDict({})
        self.mora_dropout = nn.ModuleDict({})
        self.mora_cos = BufferDict({}, persistent=False)
        self.mora_sin = BufferDict({}, persistent=False)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs

        base = self.get_base_layer()
        check_supported_base(base)
        self.in_features, self.out_features = _get_in_out_features(base)
        # GPT-2 style Conv1D stores its weight as (d_in, d_out): merges must transpose dW.
        self.fan_in_fan_out = isinstance(base, Conv1D)

    def update_layer(self, adapter_name: str, config: MoraConfig, inference_mode: bool = False) -> None:
        size = r_hat(self.in_features, self.out_features, config.r, config.compression, config.rounding)
        check_shapes(self.in_features, self.out_features, size, config.compression)
        self.mora_r[adapter_name] = config.r
        self.mora_r_hat[adapter_name] = size
        self.mora_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        weight = self.get_base_layer().weight
        M = torch.zeros(size, size, device=weight.device, dtype=weight.dtype)
        if not config.init_weights:
            nn.init.normal_(M, std=size**-0.5)
        self.mora_M[adapter_name] = nn.Parameter(M)
        self.set_compression(adapter_name, config.compression)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_compression(self, adapter_name: str, compression: str) -> None:
        """Switch the operator of an adapter with the same r_hat (ReMoRA regrouping); rebuild rope tables."""
        check_shapes(self.in_features, self.out_features, self.mora_r_hat[adapter_name], compression)
        self.mora_compression[adapter_name] = compression
        if compression == "rope":
            size = self.mora_r_hat[adapter_name]
            # on the base weight's device: with low_cpu_mem_usage M starts on meta, and these tables, not being
            # saved, would never be filled in
            device = self.get_base_layer().weight.device
            cos, sin = rope_tables(size, surviving_chunks(self.in_features, self.out_features, size), device)
            self.mora_cos[adapter_name] = cos
            self.mora_sin[adapter_name] = sin
        else:
            if adapter_name in self.mora_cos:
                del self.mora_cos[adapter_name]
                del self.mora_sin[adapter_name]

    def _tables(self, adapter_name: str) -> tuple[Tensor, Tensor] | None:
        if adapter_name not in self.mora_cos:
            return None
        return self.mora_cos[adapter_name], self.mora_sin[adapter_name]

    def get_delta_weight(self, adapter_name: str) -> Tensor:
        """dW in the base weight's layout: (d_out, d_in), or (d_in, d_out) for Conv1D. In M's dtype."""
        M = self.mora_M[adapter_name]
        dW = delta_weight(
            M, self.in_features, self.out_features, self.mora_compression[adapter_name], self._tables(adapter_name)
        )
        return dW.T if self.fan_in_fan_out else dW

    def scale_layer(self, scale: float) -> None:
        if scale != 1:
            warnings.warn("MoRA has no scaling; scale_layer is ignored", UserWarning, stacklevel=2)

    def unscale_layer(self, scale: float | None = None) -> None:
        return


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    # the dtype autocast computes linear layers in on x's device, None without autocast
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class MoraLinear(nn.Module, MoraLayer):
    """MoRA on a dense layer: base(x) + sum over active adapters of delta(dropout(x))."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MoraConfig, **kwargs: Any) -> None:
        super().__init__()
        MoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        for adapter_name, M in self.mora_M.items():
            key = f"{prefix}mora_M.{adapter_name}"
            if key in state_dict and state_dict[key].shape != M.shape:
                raise MoraAdapterError(
                    f"MoRA adapter does not fit this model: {key} has shape {tuple(state_dict[key].shape)}, but this "
                    f"{self.in_features} -> {self.out_features} layer with compression="
                    f"{self.mora_compression[adapter_name]!r} and r={self.mora_r[adapter_name]} needs "
                    f"{tuple(M.shape)}. Load it on the model and config it was trained with."
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add dW of the active (or named) adapters into the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.mora_M:
                continue
            if safe_merge:
                merged = self._add_delta_weight_(weight.data.clone(), name, 1.0)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                weight.data.copy_(merged)
            else:
                self._add_delta_weight_(weight.data, name, 1.0)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract dW of every merged adapter from the base weight."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.mora_M:
                self._add_delta_weight_(weight.data, name, -1.0)

    def _add_delta_weight_(self, weight: Tensor, adapter_name: str, alpha: float) -> Tensor:
        # weight += alpha * dW in place, without materialising dW where the operator allows (mora.add_delta_weight_)
        target = weight.T if self.fan_in_fan_out else weight  # Conv1D stores (d_in, d_out)
        M = self.mora_M[adapter_name]
        add_delta_weight_(target, M, self.mora_compression[adapter_name], self._tables(adapter_name), alpha)
        return weight

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        path = self._path(x, args, kwargs)
        if path is not None:
            return self._one_node_forward(x, *path)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.mora_M:
                continue
            # Compute in the activations' dtype: M (r_hat^2 entries) is cast, never the input.
            M = self.mora_M[name].to(x.dtype)
            h = self.mora_dropout[name](x)  # each adapter draws its own mask from the same x
            add_delta_(result, h, M, self.mora_compression[name], self._tables(name))
        return result

    def _path(self, x: Tensor, args: tuple, kwargs: dict) -> tuple[str, Callable[..., Tensor]] | None:
        # The one place a path is chosen: where base + adapter may run as one node, the adapter and the function
        # that runs them, else None (the base layer, then add_delta_ per adapter). One node: the one active adapter
        # on a plain frozen nn.Linear/Conv1D that nothing hooks (DeepSpeed ZeRO-3 and accelerate's offload gather
        # weights in hooks), in x's dtype or under autocast (which computes the base layer in its dtype). Then the
        # compiled reference math where MORA_COMPILE wants it (CUDA by default: mora.adapters.compiled), else, when
        # training an operator with a backward by hand, the fused autograd node (mora.adapters.fused).
        names = [name for name in self.active_adapters if name in self.mora_M]
        if len(names) != 1 or args or kwargs:
            return None
        base = self.get_base_layer()
        weight = base.weight
        plain = (
            self.base_layer is base
            and type(base) in (nn.Linear, Conv1D)
            and not (base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__)
            and not hasattr(weight, "ds_id")
            and not weight.requires_grad
        )
        dtype = _autocast_dtype(x)
        fits = (
            x.dtype == weight.dtype and (base.bias is None or base.bias.dtype == x.dtype)
            if dtype is None
            else x.dtype in (torch.float32, dtype)
        )
        if not (plain and fits):
            return None
        if wanted(x.device):
            return names[0], compiled_mora_linear
        if torch.is_grad_enabled() and self.mora_compression[names[0]] in VJP_COMPRESSIONS:
            return names[0], fused_mora_linear
        return None

    def _one_node_forward(self, x: Tensor, name: str, run: Callable[..., Tensor]) -> Tensor:
        base = self.get_base_layer()
        weight, bias = base.weight.T if self.fan_in_fan_out else base.weight, base.bias  # weight (d_out, d_in)
        h = self.mora_dropout[name](x)  # x itself without dropout: its gradient then adds into the base layer's
        dtype = _autocast_dtype(x)
        if dtype is None:
            M = self.mora_M[name].to(x.dtype)
            return run(x, h, weight, bias, M, self.mora_compression[name], self._tables(name))
        # as autocast runs the base layer: every input cast to its dtype (autograd casts the gradients back)
        cast = x.to(dtype)
        h = cast if h is x else h.to(dtype)
        weight, bias, M = weight.to(dtype), None if bias is None else bias.to(dtype), self.mora_M[name].to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return run(cast, h, weight, bias, M, self.mora_compression[name], self._tables(name))

    def __repr__(self) -> str:
        return "mora." + super().__repr__()
