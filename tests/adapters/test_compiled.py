"""The compiled GPU path (mora.adapters.compiled) on the CPU: forward and gradients against the reference math in
float64 on every operator, through dynamo + AOTAutograd (every shape class) and inductor itself (its C++ backend,
one shape per operator); no more kept for backward than the input itself; one graph for every token count; the
MORA_COMPILE switch and its fallbacks where Triton cannot compile or a graph fails to; the layer's choice; a model
under gradient checkpointing."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from mora import MoraConfig
from mora.adapters import compiled
from mora.adapters.compiled import compiled_mora_linear, wanted
from mora.adapters.mora import COMPRESSIONS, delta_weight, n_chunks, rope_tables, surviving_chunks
from mora.adapters.peft_tuner import MoraLinear
from tests.adapters.test_math import SHAPES, WRAPS_TWICE, _valid
from tests.conftest import LLAMA_TARGETS, small_llama

CASES = [case for case in [(c, *s) for c in COMPRESSIONS for s in SHAPES] + WRAPS_TWICE if _valid(*case)]
# one shape per operator for inductor: the input wraps around (r_hat does not divide d_in) and the output is tiled
INDUCTOR_CASES = [(c, 19, 37, 6) for c in COMPRESSIONS]


def _check(compression, d_in, d_out, size, backend, dropout=True, bias=True, n=5):
    # forward and the gradients of x, h, M and the bias against x @ W.T + h @ delta_weight.T, in float64
    torch.manual_seed(0)
    x = torch.randn(2, n, d_in, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, n, d_in, dtype=torch.float64, requires_grad=True) if dropout else x
    weight = torch.randn(d_out, d_in, dtype=torch.float64)
    b = torch.randn(d_out, dtype=torch.float64, requires_grad=True) if bias else None
    M = torch.randn(size, size, dtype=torch.float64, requires_grad=True)
    tables = rope_tables(size, n_chunks(d_in, size)) if compression == "rope" else None
    g = torch.randn(2, n, d_out, dtype=torch.float64)
    leaves = [t for t in (x, h, b, M) if t is not None and (t is not h or dropout)]
    want = F.linear(x, weight, b) + h @ delta_weight(M, d_in, d_out, compression).T
    got = compiled_mora_linear(x, h, weight, b, M, compression, tables, backend=backend)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-10)
    for a, c in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g), strict=True):
        assert torch.allclose(a, c, atol=1e-10)


@pytest.mark.parametrize("compression,d_in,d_out,size", CASES)
def test_compiled_graph_equals_the_reference_on_every_shape_class(compression, d_in, d_out, size):
    torch._dynamo.reset()
    _check(compression, d_in, d_out, size, "aot_eager")


@pytest.mark.parametrize("compression", ["rope", "sharing"])
def test_compiled_graph_without_dropout_or_bias(compression):
    torch._dynamo.reset()
    _check(compression, 40, 24, 6, "aot_eager", dropout=False, bias=False)


@pytest.mark.slow
@pytest.mark.parametrize("compression,d_in,d_out,size", INDUCTOR_CASES)
def test_inductor_equals_the_reference_on_every_operator(compression, d_in, d_out, size):
    # the compiler the GPU runs, here generating C++: the code differs from the GPU's Triton, the graph does not
    torch._dynamo.reset()
    _check(compression, d_in, d_out, size, "inductor")


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["truncation", "sharing", "decouple", "rope"])
def test_inductor_keeps_no_more_for_backward_than_the_input_itself(compression):
    # activation memory on a GPU: per token, the graph keeps at most x's own bytes for backward (the eager path keeps
    # x), never a copy of x wrap-padded to whole chunks (decouple / rope where r_hat does not divide d_in: 24 of
    # 19 features here). Measured as the growth from 64 to 128 tokens of the storages autograd keeps, besides W and M.
    d_in, d_out, size = 19, 37, 6
    torch.manual_seed(0)
    weight, M = torch.randn(d_out, d_in), torch.randn(size, size, requires_grad=True)
    tables = rope_tables(size, n_chunks(d_in, size)) if compression == "rope" else None
    torch._dynamo.reset()
    kept = []
    for n in (64, 128):
        x = torch.randn(n, d_in, requires_grad=True)
        storages = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = compiled_mora_linear(x, x, weight, None, M, compression, tables, backend="inductor")
        out.sum().backward()
        params = {weight.untyped_storage().data_ptr(), M.untyped_storage().data_ptr()}
        kept.append(sum(b for ptr, b in storages.items() if ptr not in params))
    assert 0 < (kept[1] - kept[0]) / 64 <= d_in * x.element_size()


def test_one_graph_per_layer_shape_serves_every_token_count():
    # ten layer shapes (more than dynamo's default limit of 8 graphs), each its own static graph, then every shape
    # again at other token counts: no graph more
    torch._dynamo.reset()
    counter = CompileCounter()
    M = torch.randn(6, 6, requires_grad=True)
    shapes = [(40, 24 + k) for k in range(10)]
    assert surviving_chunks(40, 24, 6) == 4
    for leading in ((2, 7), (3, 5), (16,), (4, 128)):
        for d_in, d_out in shapes:
            weight, x = torch.randn(d_out, d_in), torch.randn(*leading, d_in)
            out = compiled_mora_linear(x, x, weight, None, M, "sharing_chunked", backend=counter)
            assert out.shape == (*leading, d_out)
            out.sum().backward()
    assert counter.frame_count == len(shapes)


def test_past_dynamos_graph_limit_a_layer_runs_uncompiled_with_a_warning_and_forget_graphs_starts_afresh():
    # a process that trains one model after another piles up graphs; past dynamo's limit the layer must not fail
    # (fullgraph=True turns the limit into an error): its reference math runs uncompiled, with the same numbers
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled.compiled_function(counter)  # built first: it raises dynamo's limit to RECOMPILE_LIMIT, patched lower below
    M, tables = torch.randn(6, 6, dtype=torch.float64), rope_tables(6, n_chunks(40, 6))
    with torch._dynamo.config.patch(recompile_limit=2):
        for d_out in (24, 25, 26):
            x, weight = torch.randn(5, 40, dtype=torch.float64), torch.randn(d_out, 40, dtype=torch.float64)
            want = x @ weight.T + x @ delta_weight(M, 40, d_out, "rope").T
            if d_out < 26:
                got = compiled_mora_linear(x, x, weight, None, M, "rope", tables, backend=counter)
            else:
                with pytest.warns(UserWarning, match=r"holds 2 graphs already \(dynamo's limit\), so a layer 40->26"):
                    got = compiled_mora_linear(x, x, weight, None, M, "rope", tables, backend=counter)
            assert torch.allclose(got, want, atol=1e-10)
        assert counter.frame_count == 2
        compiled.forget_graphs()  # as each training run starts: the next shape compiles again
        compiled_mora_linear(x, x, weight, None, M, "rope", tables, backend=counter)
        assert counter.frame_count == 3
    compiled.compiled_function.cache_clear()


@pytest.mark.parametrize(
    "setting,device,expected",
    [(None, "cuda", True), (None, "cpu", False), ("auto", "cuda", True), ("on", "cpu", True), ("off", "cuda", False)],
)
def test_the_switch(setting, device, expected, monkeypatch):
    if setting is None:
        monkeypatch.delenv(compiled.ENV, raising=False)
    else:
        monkeypatch.setenv(compiled.ENV, setting)
    monkeypatch.setattr(compiled, "cannot_compile_for", lambda device: None)  # a GPU that Triton supports
    assert wanted(torch.device(device)) is expected


@pytest.mark.parametrize(
    "triton,capability,why",
    [
        (False, (9, 0), "Triton is not installed"),
        (True, (6, 0), "Tesla P100-PCIE-16GB has compute capability 6.0, below Triton's 7.0"),
        (True, (7, 0), None),
        (True, (9, 0), None),
    ],
)
def test_auto_falls_back_to_eager_with_one_warning_where_triton_cannot_compile(triton, capability, why, monkeypatch):
    # a CUDA build of torch without Triton, or a GPU older than Volta: inductor cannot generate its kernels there, so
    # `auto` runs the eager path and says why, `on` still tries (the user's choice), `off` is silent
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if triton else None)  # "triton" only
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla P100-PCIE-16GB")
    compiled.cannot_compile_for.cache_clear()
    try:
        gpu = torch.device("cuda", 0)
        assert compiled.cannot_compile_for(gpu) == why
        monkeypatch.setenv(compiled.ENV, "auto")
        if why is None:
            assert wanted(gpu) is True
        else:
            with pytest.warns(UserWarning, match=rf"^MORA_COMPILE=auto: {why}, so MoRA runs its eager path"):
                assert wanted(gpu) is False
        monkeypatch.setenv(compiled.ENV, "on")
        assert wanted(gpu) is True
        monkeypatch.setenv(compiled.ENV, "off")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert wanted(gpu) is False
    finally:
        compiled.cannot_compile_for.cache_clear()


def _no_kernel(gm, example_inputs):  # a compiler that cannot generate this graph (a Triton or C++ compiler error)
    raise RuntimeError("no kernel for this GPU\nits traceback")


@pytest.mark.parametrize("fails", ["forward", "backward"])
def test_where_a_graph_cannot_compile_auto_runs_the_reference_math_and_eager_after_and_on_raises(fails, monkeypatch):
    # a GPU that this path has not met: inductor or Triton may fail on a graph, forward or backward. `auto` must not
    # fail the run: this call's numbers and gradients come from the reference math, one warning says why, and every
    # layer after takes the eager path. The backward compiles with the forward, so its failure is caught there too
    # (compiled lazily, it would fail inside loss.backward(), past any fallback)
    monkeypatch.setattr(compiled, "_failure", [])
    monkeypatch.setattr(compiled, "cannot_compile_for", lambda device: None)  # a GPU that Triton supports
    backend = _no_kernel if fails == "forward" else aot_autograd(fw_compiler=lambda gm, ex: gm, bw_compiler=_no_kernel)
    monkeypatch.setenv(compiled.ENV, "on")
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="no kernel for this GPU"):
        _check("rope", 19, 37, 6, backend)
    assert compiled.compile_failure() is None
    monkeypatch.setenv(compiled.ENV, "auto")
    gpu = torch.device("cuda", 0)
    assert wanted(gpu) is True
    torch._dynamo.reset()
    why = r"\(RuntimeError: no kernel for this GPU\), so it runs its reference math uncompiled and every MoRA layer"
    with pytest.warns(UserWarning, match=rf"^MoRA's compiled path could not compile a layer 19->37 {why}"):
        _check("rope", 19, 37, 6, backend)  # forward and gradients against the float64 reference
    assert compiled.compile_failure() == "RuntimeError: no kernel for this GPU"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert wanted(gpu) is False  # from now on the eager path, without another warning


def test_a_bad_switch_value_is_one_clear_line(monkeypatch):
    monkeypatch.setenv(compiled.ENV, "yes")
    with pytest.raises(ValueError, match=r"^MORA_COMPILE='yes' is not one of auto, on, off: unset it or choose one$"):
        wanted(torch.device("cpu"))


@pytest.mark.parametrize("grad", [True, False])
def test_the_layer_takes_the_compiled_path_where_wanted(grad, monkeypatch):
    # MORA_COMPILE=on stands in for a CUDA device: the layer runs one compiled graph, with the numbers of the eager
    # path, in training and inference; off: no graph
    torch.manual_seed(3)
    config = MoraConfig(r=2, compression="rope", target_modules=["layer"])
    layer = MoraLinear(nn.Linear(32, 48).requires_grad_(False), "default", config)  # frozen, as PEFT leaves it
    nn.init.normal_(layer.mora_M["default"])
    x = torch.randn(2, 5, 32)
    monkeypatch.setenv(compiled.ENV, "off")
    with torch.set_grad_enabled(grad):
        eager = layer(x)
    counter = CompileCounter()
    monkeypatch.setattr(compiled, "BACKEND", counter)
    with torch.set_grad_enabled(grad):
        assert counter.frame_count == 0 and torch.allclose(layer(x), eager)
        monkeypatch.setenv(compiled.ENV, "on")
        torch._dynamo.reset()
        assert torch.allclose(layer(x), eager, atol=1e-6)
    assert counter.frame_count == 1


@pytest.mark.parametrize("compression", ["rope", "sharing_chunked"])
def test_the_compiled_layer_under_autocast_matches_the_eager_one(compression, monkeypatch):
    # the gpu profiles train under bf16 autocast: the layer casts x, W and M to bf16 and compiles with autocast off,
    # as the fused node does; the eager path (off) gives the same output and gradients within bf16 rounding
    torch.manual_seed(4)
    config = MoraConfig(r=2, compression=compression, target_modules=["layer"], dropout=0.0)
    layer = MoraLinear(nn.Linear(32, 48).requires_grad_(False), "default", config)
    nn.init.normal_(layer.mora_M["default"], std=0.1)
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    results = {}
    for setting in ("off", "on"):
        monkeypatch.setenv(compiled.ENV, setting)
        x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        out.float().square().sum().backward()
        results[setting] = (out, x.grad, layer.mora_M["default"].grad.clone())
        layer.mora_M["default"].grad = None
    for eager, compiled_ in zip(results["off"], results["on"], strict=True):
        assert compiled_.dtype == eager.dtype
        assert (compiled_.float() - eager.float()).norm() <= 2**-7 * eager.float().norm()


@pytest.mark.parametrize("reentrant", [True, False])
def test_the_compiled_layers_under_gradient_checkpointing_give_the_eager_gradients(reentrant, monkeypatch):
    # Trainer and TRL users turn on gradient checkpointing on a GPU: the layers' forward runs again in backward,
    # under no_grad first where checkpointing is reentrant. On the compiled path (dynamo + AOTAutograd here) the loss
    # and every gradient equal the eager path's
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(compiled, "BACKEND", counter)
    results = {}
    for setting in ("off", "on"):
        monkeypatch.setenv(compiled.ENV, setting)
        torch._dynamo.reset()
        config = MoraConfig(r=4, compression="rope", target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
        model = get_peft_model(small_llama(0, use_cache=False), config)
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "mora_M" in name:
                nn.init.normal_(p, std=0.1)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
        model.train()
        ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        assert len(grads) == 2 * len(LLAMA_TARGETS) and all(g is not None for g in grads.values())
        results[setting] = loss, grads
    assert counter.frame_count > 0  # the "on" model took the compiled path
    (eager_loss, eager), (loss, grads) = results["off"], results["on"]
    assert torch.allclose(loss, eager_loss, atol=1e-6)
    assert all(torch.allclose(grads[k], eager[k], atol=1e-6) for k in eager)
