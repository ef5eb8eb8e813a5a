"""The layer's fused training path (base + MoRA in one autograd node): same outputs and gradients as the unfused
layer and as base(x) + x @ delta_weight.T, and taken only where it is safe."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mora import MoraConfig
from mora.adapters import inplace
from mora.adapters.fused import fused_mora_linear
from mora.adapters.inplace import VJP_COMPRESSIONS
from mora.adapters.mora import delta_weight
from mora.adapters.peft_tuner import MoraLinear

# (d_in, d_out, r): equal, in < out with tiled outputs, in > out with truncated ones, a wrapping last chunk
SHAPES = [(32, 32, 2), (19, 37, 2), (45, 30, 1), (64, 12, 1)]


def _layer(compression, d_in, d_out, r, base=None, **config):
    torch.manual_seed(0)
    base = base if base is not None else nn.Linear(d_in, d_out, dtype=torch.float64)
    layer = MoraLinear(base.requires_grad_(False), "default", MoraConfig(r=r, compression=compression, **config))
    with torch.no_grad():
        layer.mora_M["default"].normal_(0, 0.3)
    return layer


def _grads(layer, x, grad):
    out = layer(x)
    wrt = [t for t in (x, layer.mora_M["default"]) if t.requires_grad]
    return out, torch.autograd.grad(out, wrt, grad)


def _unfused(layer, x, grad, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(MoraLinear, "_path", lambda *args: None)
        return _grads(layer, x, grad)


@pytest.mark.parametrize("compression", VJP_COMPRESSIONS)
@pytest.mark.parametrize("d_in,d_out,r", SHAPES)
def test_fused_layer_equals_base_plus_x_times_delta_weight(compression, d_in, d_out, r):
    try:
        layer = _layer(compression, d_in, d_out, r)
    except ValueError:
        pytest.skip("truncation refuses r_hat > min(d_in, d_out)")
    x = torch.randn(3, 2, d_in, dtype=torch.float64).transpose(0, 1).requires_grad_()  # (2, 3, d_in), strided
    grad = torch.randn(2, 3, d_out, dtype=torch.float64)
    out, (grad_x, grad_M) = _grads(layer, x, grad)
    assert type(out.grad_fn).__name__ == "_FusedMoraLinearBackward"
    M = layer.mora_M["default"]
    reference = layer.base_layer(x) + x @ layer.get_delta_weight("default").T
    want_x, want_M = torch.autograd.grad(reference, (x, M), grad)
    assert torch.allclose(out, reference, atol=1e-12)
    assert torch.allclose(grad_x, want_x, atol=1e-12) and torch.allclose(grad_M, want_M, atol=1e-12)


@pytest.mark.parametrize("compression", ["rope", "sharing"])
def test_fused_equals_unfused_with_dropout_and_a_frozen_input(compression, monkeypatch):
    # dropout: the adapter's input gradient goes through the mask, apart from the base layer's; an input that needs
    # no gradient (the first layer under frozen embeddings): M's gradient alone
    layer = _layer(compression, 45, 30, 1, dropout=0.3)
    layer.train()
    grad = torch.randn(5, 30, dtype=torch.float64)
    for x in (torch.randn(5, 45, dtype=torch.float64, requires_grad=True), torch.randn(5, 45, dtype=torch.float64)):
        torch.manual_seed(1)
        out, grads = _grads(layer, x, grad)
        torch.manual_seed(1)
        want_out, want_grads = _unfused(layer, x, grad, monkeypatch)
        assert type(out.grad_fn).__name__ == "_FusedMoraLinearBackward"
        assert torch.allclose(out, want_out, atol=1e-12)
        assert len(grads) == len(want_grads) == 1 + x.requires_grad
        for a, b in zip(grads, want_grads, strict=True):
            assert torch.allclose(a, b, atol=1e-12)


def test_fused_gpt2_conv1d_and_a_trained_bias(monkeypatch):
    conv = Conv1D(30, 45).to(torch.float64)  # weight (d_in, d_out)
    layer = _layer("rope", 45, 30, 1, base=conv)
    conv.bias.requires_grad_(True)
    x = torch.randn(4, 45, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(4, 30, dtype=torch.float64)
    out = layer(x)  # the weight is frozen, the bias trains: fused, with the bias gradient
    assert type(out.grad_fn).__name__ == "_FusedMoraLinearBackward"
    got = torch.autograd.grad(out, (x, layer.mora_M["default"], conv.bias), grad)
    with monkeypatch.context() as patch:
        patch.setattr(MoraLinear, "_path", lambda *args: None)
        want = torch.autograd.grad(layer(x), (x, layer.mora_M["default"], conv.bias), grad)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_fused_in_bfloat16_matches_float64_within_bfloat16_rounding():
    layer = _layer("rope", 64, 48, 2)
    x = torch.randn(8, 64, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(8, 48, dtype=torch.float64)
    want_out, want = _grads(layer, x, grad)
    layer.to(torch.bfloat16)
    x16 = x.detach().bfloat16().requires_grad_()
    out, got = _grads(layer, x16, grad.bfloat16())
    assert type(out.grad_fn).__name__ == "_FusedMoraLinearBackward" and out.dtype == torch.bfloat16
    for a, b in zip((out, *got), (want_out, *want), strict=True):
        assert torch.allclose(a.double(), b, rtol=0.05, atol=0.05 * b.abs().max().item())


def _hooked(layer):
    layer.base_layer.register_forward_pre_hook(lambda module, args: None)  # as DeepSpeed ZeRO-3 gathers weights


def _two_adapters(layer):
    layer.update_layer("other", MoraConfig(r=1, compression="sharing"))
    layer.set_adapter(["default", "other"])


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(_hooked, id="hooked base layer"),
        pytest.param(_two_adapters, id="two active adapters"),
        pytest.param(lambda layer: layer.base_layer.weight.requires_grad_(True), id="trainable base weight"),
        pytest.param(lambda layer: layer.set_compression("default", "sharing_chunked"), id="no hand-written vjp"),
    ],
)
def test_unsafe_cases_take_the_unfused_path_with_the_same_numbers(change):
    layer = _layer("rope", 32, 32, 2)
    x = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    change(layer)
    out = layer(x)
    assert type(out.grad_fn).__name__ != "_FusedMoraLinearBackward"
    reference = layer.base_layer(x)
    for name in layer.active_adapters:
        reference = reference + x @ layer.get_delta_weight(name).T
    assert torch.allclose(out, reference, atol=1e-12)


@pytest.mark.parametrize("compression", ["rope", "sharing"])
def test_fused_under_autocast_computes_as_autocast_runs_the_base_layer(compression, monkeypatch):
    # mixed precision (accelerate's autocast): float32 weights and input, the layer computed in bfloat16; the same
    # dtypes as the unfused layer and the same numbers within bfloat16 rounding, float32 gradients
    layer = _layer(compression, 64, 48, 2).float()
    x = torch.randn(8, 64, requires_grad=True)
    grad = torch.randn(8, 48, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, got = _grads(layer, x, grad)
        want_out, want = _unfused(layer, x, grad, monkeypatch)
    assert type(out.grad_fn).__name__ == "_FusedMoraLinearBackward"
    assert out.dtype == want_out.dtype == torch.bfloat16
    for a, b in zip((out, *got), (want_out, *want), strict=True):
        assert a.dtype == b.dtype
        assert torch.allclose(a.float(), b.float(), rtol=0.02, atol=0.02 * b.abs().max().item())


def test_inference_takes_the_no_grad_path():
    layer = _layer("rope", 32, 32, 2)
    x = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        out = layer(x)
    assert out.grad_fn is None
    assert torch.allclose(out, layer.base_layer(x) + x @ layer.get_delta_weight("default").T, atol=1e-12)


def test_fused_function_refuses_a_trainable_weight():
    weight = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="frozen base weight"):
        fused_mora_linear(torch.zeros(2, 4), torch.zeros(2, 4), weight, None, torch.zeros(2, 2), "sharing")


@pytest.mark.parametrize("compression", ["rope", "sharing"])
def test_backward_under_an_autocast_region_computes_as_the_forward_did(compression):
    # a backward called inside autocast runs under it (the engine's training loop does so; on CUDA even in the
    # device thread): the fused backward must still compute in the forward's dtype, exactly as without autocast
    layer = _layer(compression, 64, 200, 4).float()  # d_out > r_hat: the tiles fold (CUDA autocast's fp32 `sum`)
    x = torch.randn(300, 64, requires_grad=True)
    grad = torch.randn(300, 200)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_FusedMoraLinearBackward"
    want = torch.autograd.grad(out, (x, layer.mora_M["default"]), grad, retain_graph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.autograd.grad(out, (x, layer.mora_M["default"]), grad)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("compression", ["rope", "decouple"])
def test_unfused_chunk_backward_under_an_autocast_region_computes_as_the_forward_did(compression, batched, monkeypatch):
    # the unfused layer's chunk operators (hooks, several adapters, checkpointing refuse the fused path) have their
    # own autograd node: a backward called inside autocast must compute M's gradient in the forward's dtype there
    # too, on the CPU's chunk loop and on the GPU's batched chunks (forced here); x's gradient also holds the base
    # layer's, which torch computes under autocast
    layer = _layer(compression, 64, 200, 4).float()
    x = torch.randn(300, 64, requires_grad=True)
    grad = torch.randn(300, 200)
    monkeypatch.setattr(inplace, "_batches_chunks", lambda x: batched)
    with monkeypatch.context() as patch:
        patch.setattr(MoraLinear, "_path", lambda *args: None)
        out = layer(x)
    assert type(out.grad_fn).__name__ == "_AddChunkOutputsBackward"
    M = layer.mora_M["default"]
    want = torch.autograd.grad(out, M, grad, retain_graph=True)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.autograd.grad(out, M, grad)[0]
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compression", ["sharing", "rope", "decouple", "truncation"])
def test_the_in_place_paths_never_read_uninitialised_memory(compression, dtype, monkeypatch):
    # every buffer the operators allocate starts as NaN: a value that reaches the output or M's gradient was read
    # before it was written. Found in CPU bf16 sharing on torch 2.13 with AVX512-BF16: the GEMM read its A
    # operand's row padding (the whole quick rehearsal's ReMoRA cell went NaN at step 1)
    allocate = inplace._aligned_empty

    def poisoned(rows, cols, like):
        buffer = allocate(rows, cols, like)
        return buffer.fill_(float("nan")) if buffer.is_floating_point() else buffer

    monkeypatch.setattr(inplace, "_aligned_empty", poisoned)
    torch.manual_seed(0)
    x = torch.randn(256, 64, dtype=dtype)
    size = 37 if compression in ("sharing", "truncation") else 36  # 64 = 37 + 27: a wrapping last chunk
    M = 0.1 * torch.randn(size, size, dtype=dtype)
    dense = delta_weight(M.double(), 64, 64, compression)  # (d_out, d_in)
    got = torch.zeros(256, 64, dtype=dtype)
    inplace.add_delta_(got, x, M, compression, None)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), x.double() @ dense.T, atol=0.05 if dtype == torch.bfloat16 else 1e-4,
                               rtol=0.05 if dtype == torch.bfloat16 else 1e-4)  # fmt: skip
    if compression in VJP_COMPRESSIONS:
        grad_out = torch.randn(256, 64, dtype=dtype)
        grad_M = inplace.delta_vjp_(grad_out, x, M, compression, None, None, True)
        assert torch.isfinite(grad_M).all()
