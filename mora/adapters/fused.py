"""The MoRA layer's training path as one autograd node: out = linear(x, W, b) + delta(h, M), h = x or dropout(x).

Why: with the base layer and the adapter as separate autograd nodes, backward builds the adapter's input gradient
in its own (..., d_in) buffer and autograd then adds it to the base layer's (a full-width allocation and pass per
layer and step), and the forward builds the adapter's output before adding it. Here the forward adds the adapter's
output into the base output in place (`add_delta_`) and the backward adds its input gradient into the base layer's
(`delta_vjp_`). Same numbers as the unfused layer, tested against it; the layer takes this path only where it is a
plain frozen linear it may call directly (see `MoraLinear._path`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mora.adapters.inplace import add_delta_, delta_vjp_


class _FusedMoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        h: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        M: Tensor,
        cos: Tensor | None,
        sin: Tensor | None,
        compression: str,
        h_is_x: bool,
    ) -> Tensor:
        out = F.linear(x, weight, bias)  # (..., d_out); weight (d_out, d_in)
        tables = None if cos is None else (cos, sin)
        add_delta_(out, h, M, compression, tables)  # autograd is off inside forward: the in-place paths
        ctx.save_for_backward(h, weight, M, cos, sin)
        ctx.compression, ctx.h_is_x = compression, h_is_x
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        # The forward ran without autocast (the layer casts its inputs first), so the backward must too. A backward
        # called inside an autocast region runs under it (CUDA: on torch 2.11 the engine's device thread takes the
        # caller's state; CPU: the caller's thread), where autocast re-types the out-of-place ops (`@` to bf16,
        # CUDA's `sum` to fp32) but not the in-place ones, and the mixed GEMMs then fail: seen on an H200 (LOG.md).
        with torch.autocast(grad_out.device.type, enabled=False):
            return _FusedMoraLinear._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor):
        h, weight, M, cos, sin = ctx.saved_tensors
        want_x, want_h, _, want_b, want_M = ctx.needs_input_grad[:5]  # the weight is frozen
        tables = None if cos is None else (cos, sin)
        grad_x = grad_out @ weight if want_x else None  # (..., d_in), contiguous
        if ctx.h_is_x:  # the adapter's input gradient goes into the base layer's
            grad_h = grad_x
        else:
            grad_h = torch.zeros_like(h, memory_format=torch.contiguous_format) if want_h else None
        grad_M = delta_vjp_(grad_out, h, M, ctx.compression, tables, grad_h, want_M)
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if want_b else None
        return grad_x, None if ctx.h_is_x else grad_h, None, grad_b, grad_M, None, None, None, None


def fused_mora_linear(
    x: Tensor,
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    M: Tensor,
    compression: str,
    tables: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """linear(x, weight, bias) + delta(h, M, d_out, compression) in one autograd node. weight (d_out, d_in) is frozen
    (its gradient is not computed), h is x itself or a tensor of x's shape (dropout(x))."""
    if weight.requires_grad:
        raise ValueError("fused_mora_linear needs a frozen base weight (requires_grad=False); use base(x) + delta")
    cos, sin = tables if tables is not None else (None, None)
    return _FusedMoraLinear.apply(x, h, weight, bias, M, cos, sin, compression, h is x)
