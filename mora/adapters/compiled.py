"""MoRA's GPU path: one layer's reference math (base linear + delta, mora.adapters.mora) through torch.compile.

Why: on a GPU the eager path (mora.adapters.inplace, mora.adapters.fused) spends its time around the GEMMs, in
kernels of little work each: the padded copy and chunk sum of f_comp, the rotation of M's blocks, the tiled add of
f_decomp into the base output, and in backward their adjoints and the sum of two input gradients. Inductor fuses
each of those groups into one generated kernel and leaves the GEMMs to cuBLAS; the backward is derived from the
same math by AOTAutograd, so there is no second hand-written backward to keep right. Every operator goes this way,
the chunked sharing variants of ReMoRA included.

Compilation: one graph (forward and backward) per operator, layer shape (d_in, d_out, r_hat), dtype, bias or none,
dropout or none, and grad mode. The number of tokens is marked dynamic, so changing batch sizes and sequence lengths
do not recompile (one token alone is specialised: 0/1 sizes always are); the layer's dimensions are marked static, so
that each layer shape gets kernels of its own, never a generic graph (dynamo would otherwise make a dimension
dynamic at its second value, and the operators' shape arithmetic is not written for symbolic sizes). A LLaMA has three
or four layer shapes, so a training run compiles three or four graphs, once, in its first step (measured by
bench/layer.py: its `first s` column). Dynamo's limit of graphs per function is raised from 8 to RECOMPILE_LIMIT;
a process that goes past it anyway (many models in one process, without `forget_graphs` between them) runs the
layers past it uncompiled, with a warning, rather than failing.

Where inductor cannot compile a graph (a Triton or compiler error on a GPU this path has not met), `auto` does not let
the run fail: that call runs the reference math uncompiled, one warning names the error, and every MoRA layer of the
process takes the eager path from then on (`compile_failure` says why; a run's summary.json records it). The backward
is compiled with the forward (AOTAutograd would otherwise compile it at the first backward, where an error could only
fail the step), so both fail where the layer can still fall back. `on` raises the error instead.

The switch: MORA_COMPILE in the environment, `auto` (the default: CUDA devices that Triton supports, else the eager
path with one warning), `on` (every device, e.g. to test on a CPU, where inductor emits C++), `off` (never: the
eager path runs everywhere). The layer asks `wanted`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._functorch import config as functorch_config

from mora.adapters.mora import delta

ENV = "MORA_COMPILE"
CHOICES = ("auto", "on", "off")
BACKEND = "inductor"
RECOMPILE_LIMIT = 64  # graphs of the compiled layer function: layer shapes x dtypes x grad modes x dropout or not
_failure: list[str] = []  # why a graph failed to compile in this process under `auto` (then the eager path only)


def setting() -> str:
    """MORA_COMPILE's value (`auto` where unset); a value not in CHOICES raises one line naming it and the fix."""
    choice = os.environ.get(ENV, "auto")
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r} is not one of {', '.join(CHOICES)}: unset it or choose one")
    return choice


def wanted(device: torch.device) -> bool:
    """Whether a layer on `device` takes the compiled path, as MORA_COMPILE says: `auto`, CUDA devices that inductor
    can generate kernels for (else the eager path, with one warning naming why); `on`, every device; `off`, none."""
    choice = setting()
    if choice != "auto" or device.type != "cuda":
        return choice == "on"
    if _failure:  # a graph failed to compile in this process (its warning said so)
        return False
    why = cannot_compile_for(device)
    if why is not None:
        warnings.warn(f"{ENV}=auto: {why}, so MoRA runs its eager path ({ENV}=off: no warning)", stacklevel=2)
    return why is None


@functools.cache
def cannot_compile_for(device: torch.device) -> str | None:
    """Why inductor cannot generate kernels for the CUDA `device`, or None: its GPU kernels are Triton's, and Triton
    needs its package (CUDA builds of torch on Linux bring it) and compute capability 7.0 or above (Volta)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}, below Triton's 7.0"
    return None


def linear_plus_delta(
    x: Tensor,
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    M: Tensor,
    compression: str,
    tables: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """linear(x, weight, bias) + delta(h, M): x and h (N, d_in), weight (d_out, d_in), M (r_hat, r_hat) -> (N, d_out).
    The reference math of one adapted layer, the function compiled; `tables`: rope's (cos, sin) or None."""
    return F.linear(x, weight, bias) + delta(h, M, weight.shape[0], compression, tables)


def compile_failure() -> str | None:
    """Why a graph failed to compile in this process under MORA_COMPILE=auto (its MoRA layers have run eager since),
    or None."""
    return _failure[0] if _failure else None


@functools.cache
def compiled_function(backend: str | Callable = BACKEND) -> Callable[..., Tensor]:
    """`linear_plus_delta` through torch.compile with `backend` (whole graph, no breaks); built once per backend.
    Raises dynamo's limit of graphs per function (8) to RECOMPILE_LIMIT, so that every layer shape keeps its own, and
    makes AOTAutograd compile a backward with its forward (process-wide, as dynamo's limit: other compiled code of the
    process compiles its backward at its first forward too, the same work done earlier)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    functorch_config.force_non_lazy_backward_lowering = True
    return torch.compile(linear_plus_delta, backend=backend, fullgraph=True)


def compiled_mora_linear(
    x: Tensor,
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    M: Tensor,
    compression: str,
    tables: tuple[Tensor, Tensor] | None = None,
    backend: str | Callable | None = None,
) -> Tensor:
    """linear(x, weight, bias) + delta(h, M, d_out, compression), compiled: x (..., d_in) -> (..., d_out). h is x
    itself or a tensor of x's shape (dropout(x)); weight (d_out, d_in) as nn.Linear keeps it. All in one dtype."""
    d_in, d_out = weight.shape[1], weight.shape[0]
    x2 = x.reshape(-1, d_in)  # (N, d_in): every leading shape is one graph
    h2 = x2 if h is x else h.reshape(-1, d_in)
    for t in {id(x2): x2, id(h2): h2}.values():
        torch._dynamo.maybe_mark_dynamic(t, 0)  # the token count
        torch._dynamo.mark_static(t, 1)  # the layer's width: one graph per layer shape, never a generic one
    for t in (weight, M) if bias is None else (weight, M, bias):
        torch._dynamo.mark_static(t)
    try:
        out = compiled_function(backend or BACKEND)(x2, h2, weight, bias, M, compression, tables)
    except torch._dynamo.exc.FailOnRecompileLimitHit:  # a process that has compiled RECOMPILE_LIMIT graphs already
        warnings.warn(
            f"MoRA's compiled path holds {torch._dynamo.config.recompile_limit} graphs already (dynamo's limit), so "
            f"a layer {d_in}->{d_out} runs its reference math uncompiled; forget_graphs() between runs avoids it",
            stacklevel=2,
        )
        out = linear_plus_delta(x2, h2, weight, bias, M, compression, tables)
    except torch._dynamo.exc.BackendCompilerFailed as error:  # inductor, Triton or the C++ compiler failed
        if setting() == "on":
            raise
        why = describe(error)
        _failure.append(why)
        warnings.warn(
            f"MoRA's compiled path could not compile a layer {d_in}->{d_out} ({why}), so it runs its "
            f"reference math uncompiled and every MoRA layer of this process its eager path; {ENV}=off does not "
            f"try to compile, {ENV}=on makes this an error",
            stacklevel=2,
        )
        out = linear_plus_delta(x2, h2, weight, bias, M, compression, tables)
    return out.view(*x.shape[:-1], d_out)


def describe(error: BaseException) -> str:
    """An error in one line: its type and its message's first line; a compiler's own error for dynamo's
    BackendCompilerFailed, which wraps it."""
    error = getattr(error, "inner_exception", error)
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def forget_graphs() -> None:
    """Drop every graph compiled so far (torch._dynamo.reset), where this function compiled any: a process that trains
    one model after another (a Hydra multirun, the in-process table runner) then compiles each run's graphs afresh
    and never reaches dynamo's limit of graphs per function. The training engine calls it as each run starts."""
    if compiled_function.cache_info().currsize:
        torch._dynamo.reset()
