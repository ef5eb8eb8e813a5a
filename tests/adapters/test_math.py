"""The pure MoRA math: r_hat, delta == x @ delta_weight.T, parity with the authors' code, ranks, dtypes, errors."""

import pytest
import torch

from mora.adapters import inplace
from mora.adapters.inplace import (
    VJP_COMPRESSIONS,
    _rotates_input,
    _transposed_operand_is_slow,
    add_delta_,
    add_delta_weight_,
    delta_vjp_,
)
from mora.adapters.mora import (
    COMPRESSIONS,
    OFFICIAL_TYPES,
    check_shapes,
    delta,
    delta_weight,
    r_hat,
    rope_tables,
    surviving_chunks,
)
from tests.adapters.authors_reference import authors_delta_weight, authors_forward

# (d_in, d_out, r_hat): equal, in < out, in > out, r_hat not dividing either, many/one chunk(s)
SHAPES = [
    (32, 32, 8),
    (24, 40, 6),
    (40, 24, 6),
    (30, 45, 8),
    (45, 30, 8),
    (37, 19, 6),
    (19, 37, 6),
    (64, 12, 10),
    (12, 64, 10),
]


def _valid(compression, d_in, d_out, size):
    try:
        check_shapes(d_in, d_out, size, compression)
    except ValueError:
        return False
    return True


CASES = [(c, *s) for c in COMPRESSIONS for s in SHAPES if _valid(c, *s)]


def test_every_operator_is_covered_on_every_edge_shape():
    for compression in COMPRESSIONS:
        covered = {(d_in > d_out) - (d_in < d_out) for c, d_in, d_out, _ in CASES if c == compression}
        assert covered == {-1, 0, 1}, compression


@pytest.mark.parametrize("compression,d_in,d_out,size", CASES)
def test_delta_equals_x_times_delta_weight_against_float64(compression, d_in, d_out, size):
    torch.manual_seed(0)
    M64 = torch.randn(size, size, dtype=torch.float64)
    x64 = torch.randn(2, 3, d_in, dtype=torch.float64)
    reference = x64 @ delta_weight(M64, d_in, d_out, compression).T
    assert torch.allclose(delta(x64, M64, d_out, compression), reference, atol=1e-12)
    out32 = delta(x64.float(), M64.float(), d_out, compression)
    assert out32.shape == (2, 3, d_out) and out32.dtype == torch.float32
    assert torch.allclose(out32.double(), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mora_type,compression", sorted(OFFICIAL_TYPES.items()))
@pytest.mark.parametrize("d_in,d_out,size", SHAPES)
def test_parity_with_the_authors_code(mora_type, compression, d_in, d_out, size):
    if not _valid(compression, d_in, d_out, size):
        pytest.skip("the operator refuses this shape")
    torch.manual_seed(1)
    M = torch.randn(size, size, dtype=torch.float64)
    x = torch.randn(4, d_in, dtype=torch.float64)
    assert torch.allclose(delta(x, M, d_out, compression), authors_forward(x, M, d_out, mora_type), atol=1e-12)
    if mora_type == 6 and d_in <= size:
        pytest.skip("the authors' rope merge crashes with a single chunk")
    expected = authors_delta_weight(M, d_in, d_out, mora_type)
    assert torch.allclose(delta_weight(M, d_in, d_out, compression), expected, atol=1e-12)


@pytest.mark.parametrize("mora_type,compression", sorted(OFFICIAL_TYPES.items()))
def test_parity_in_bfloat16(mora_type, compression):
    torch.manual_seed(2)
    d_in, d_out, size = 40, 24, 6
    M = torch.randn(size, size).bfloat16()
    x = torch.randn(5, d_in).bfloat16()
    ours, theirs = delta(x, M, d_out, compression), authors_forward(x, M, d_out, mora_type)
    assert ours.dtype == torch.bfloat16
    assert torch.allclose(ours.float(), theirs.float(), atol=0.1, rtol=0.02)


def test_official_types_map_to_names():
    assert OFFICIAL_TYPES[1] == "sharing" and OFFICIAL_TYPES[6] == "rope"
    assert set(OFFICIAL_TYPES) == {1, 2, 3, 4, 6}
    assert set(OFFICIAL_TYPES.values()) <= set(COMPRESSIONS)
    assert {"truncation", "sharing", "decouple", "rope"} <= set(COMPRESSIONS)


@pytest.mark.parametrize(
    "d_in,d_out,r,compression,expected",
    [
        (4096, 4096, 8, "rope", 256),
        (4096, 11008, 8, "rope", 348),
        (11008, 4096, 8, "rope", 348),
        (4096, 4096, 256, "sharing", 1448),
        (4096, 11008, 256, "sharing", 1966),
        (768, 768, 128, "sharing", 443),  # 250M attention (PAPER.md §3.4)
        (768, 2560, 128, "sharing", 653),  # 250M MLP
        (2048, 2048, 128, "sharing", 724),
        (2048, 5461, 128, "sharing", 980),
    ],
)
def test_r_hat_official(d_in, d_out, r, compression, expected):
    assert r_hat(d_in, d_out, r, compression) == expected


def test_r_hat_paper_floors_and_rope_is_even():
    assert r_hat(4096, 11008, 8, "sharing", rounding="paper") == 347
    assert r_hat(4096, 11008, 8, "sharing") == 348
    assert r_hat(4096, 11008, 8, "rope", rounding="paper") == 346
    for d in range(2, 60):
        assert r_hat(d, d + 3, 3, "rope") % 2 == 0


def test_decouple_is_rope_without_rotation():
    torch.manual_seed(3)
    M, x = torch.randn(6, 6, dtype=torch.float64), torch.randn(2, 40, dtype=torch.float64)
    cos, sin = rope_tables(6, 7)
    identity = (torch.ones_like(cos), torch.zeros_like(sin))
    assert torch.allclose(delta(x, M, 24, "rope", identity), delta(x, M, 24, "decouple"))
    assert not torch.allclose(delta(x, M, 24, "rope", (cos, sin)), delta(x, M, 24, "decouple"))


def test_fresh_adapter_is_a_no_op():
    for compression, d_in, d_out, size in CASES:
        M = torch.zeros(size, size)
        assert torch.count_nonzero(delta(torch.randn(3, d_in), M, d_out, compression)) == 0
        assert torch.count_nonzero(delta_weight(M, d_in, d_out, compression)) == 0


@pytest.mark.parametrize(
    "compression,d_in,d_out,size,rank",
    [
        ("sharing", 48, 48, 8, 8),
        ("sharing", 30, 50, 8, 8),
        ("sharing_chunked", 30, 50, 8, 8),
        ("sharing_chunked_in", 50, 30, 8, 8),
        ("sharing_chunked_out", 50, 30, 8, 8),
        ("truncation", 48, 40, 8, 8),
        ("rope", 48, 48, 8, 48),  # high rank: up to min(d_in, d_out)
        ("rope", 48, 32, 8, 32),
        ("rope", 32, 48, 8, 32),
        ("decouple", 48, 48, 8, 48),
    ],
)
def test_rank_of_delta_weight(compression, d_in, d_out, size, rank):
    torch.manual_seed(4)
    dW = delta_weight(torch.randn(size, size, dtype=torch.float64), d_in, d_out, compression)
    assert torch.linalg.matrix_rank(dW).item() == rank


def test_only_surviving_chunks_are_computed():
    # 11008 -> 4096 at r_hat=348: 32 input chunks, 12 reach the output
    assert surviving_chunks(11008, 4096, 348) == 12
    assert surviving_chunks(4096, 11008, 348) == 12
    torch.manual_seed(5)
    M, x = torch.randn(6, 6, dtype=torch.float64), torch.randn(3, 60, dtype=torch.float64)
    dW = delta_weight(M, 60, 13, "rope")
    assert torch.count_nonzero(dW[:, 18:]) == 0  # ceil(13/6) = 3 chunks -> input columns 0..17
    assert torch.allclose(delta(x, M, 13, "rope"), x @ dW.T)


@pytest.mark.parametrize("compression", ["sharing", "rope", "decouple"])
def test_r_hat_above_the_input_size(compression):
    # the authors' forward crashes when r_hat > 2 * d_in and their rope merge when r_hat >= d_in
    torch.manual_seed(6)
    for d_in, d_out, size in [(5, 30, 12), (5, 7, 12), (12, 12, 12), (3, 40, 20)]:
        M, x = torch.randn(size, size, dtype=torch.float64), torch.randn(2, d_in, dtype=torch.float64)
        assert torch.allclose(delta(x, M, d_out, compression), x @ delta_weight(M, d_in, d_out, compression).T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_dtypes(dtype, compression):
    torch.manual_seed(7)
    d_in, d_out, size = 40, 48, 8
    M64, x64 = torch.randn(size, size, dtype=torch.float64), torch.randn(6, d_in, dtype=torch.float64)
    reference = delta(x64, M64, d_out, compression)
    out = delta(x64.to(dtype), M64.to(dtype), d_out, compression)
    dW = delta_weight(M64.to(dtype), d_in, d_out, compression)
    assert out.dtype == dtype and dW.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    scale = reference.abs().max()
    assert (out.double() - reference).abs().max() <= tol * scale * 4
    assert (x64 @ dW.double().T - reference).abs().max() <= tol * scale * 4


def test_vectorised_delta_weight_is_fast_on_llama_shapes():
    # the authors loop over 11008 features (type 1) and 32 chunks (type 6); ours is a few tensor ops
    M = torch.randn(348, 348)
    for compression in ("sharing", "rope"):
        assert delta_weight(M, 11008, 4096, compression).shape == (4096, 11008)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: r_hat(8, 8, 0, "sharing"), "r must be a positive integer"),
        (lambda: r_hat(8, 8, -2, "rope"), "r must be a positive integer"),
        (lambda: r_hat(8, 8, 2, "rotation"), "unknown compression 'rotation'"),
        (lambda: r_hat(8, 8, 2, 6), r"mora_type=6 is compression='rope'"),
        (lambda: r_hat(8, 8, 2, "rope", rounding="ceil"), "unknown rounding"),
        (lambda: check_shapes(8, 8, 7, "rope"), "even r_hat"),
        (lambda: check_shapes(8, 20, 10, "truncation"), "truncation .* r_hat <= min"),
        (lambda: check_shapes(8, 20, 10, "sharing_chunked"), "r_hat <= 8"),
        (lambda: check_shapes(20, 8, 10, "sharing_chunked_out"), "r_hat <= 8"),
        (lambda: delta(torch.randn(2, 8), torch.randn(7, 7), 8, "rope"), "even r_hat"),
        (lambda: delta(torch.randn(2, 8), torch.randn(4, 4), 8, "decoupled"), "unknown compression"),
    ],
)
def test_invalid_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("compression,d_in,d_out,size", CASES)
def test_in_place_fast_path_equals_the_plain_delta(compression, d_in, d_out, size):
    torch.manual_seed(8)
    M = torch.randn(size, size, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, d_in, dtype=torch.float64, requires_grad=True)
    base = torch.randn(2, 3, d_out, dtype=torch.float64)
    grad = torch.randn(2, 3, d_out, dtype=torch.float64)
    plain = base + delta(x, M, d_out, compression)
    plain_grads = torch.autograd.grad(plain, (x, M), grad)
    fast = add_delta_(base.clone(), x, M, compression)
    assert torch.allclose(fast, plain, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fast, (x, M), grad), plain_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("compression,d_in,d_out,size", CASES)
def test_gradients_match_autograd_through_delta_weight(compression, d_in, d_out, size):
    # rope / decouple have a hand-written backward (delta_vjp_); delta_weight is plain autograd
    torch.manual_seed(9)
    M = torch.randn(size, size, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, d_in, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, d_out, dtype=torch.float64)
    fast = torch.autograd.grad(delta(x, M, d_out, compression), (x, M), grad)
    reference = torch.autograd.grad(x @ delta_weight(M, d_in, d_out, compression).T, (x, M), grad)
    for a, b in zip(fast, reference, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


CHUNK_CASES = [case for case in CASES if case[0] in ("rope", "decouple")]
WRAPS_TWICE = [(c, 5, 7, 12) for c in ("sharing", "decouple", "rope")]  # r_hat > 2 d_in: the padding wraps twice


@pytest.mark.parametrize("compression,d_in,d_out,size", CHUNK_CASES + WRAPS_TWICE[1:])
def test_chunk_products_under_autograd_match_delta_weight(compression, d_in, d_out, size):
    # rope / decouple run GEMMs per chunk into the output (_AddChunkOutputs) under autograd: delta and add_delta_
    # give delta_weight's outputs and gradients, with leading batch dims, a non-contiguous x and partial grads
    torch.manual_seed(10)
    M = torch.randn(size, size, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 2, d_in, dtype=torch.float64).transpose(0, 1).requires_grad_()  # (2, 4, d_in), strided
    grad = torch.randn(2, 4, d_out, dtype=torch.float64)
    reference = x @ delta_weight(M, d_in, d_out, compression).T
    base = torch.randn(2, 4, d_out, dtype=torch.float64)
    for out in (delta(x, M, d_out, compression), add_delta_(base.clone(), x, M, compression) - base):
        assert torch.allclose(out, reference, atol=1e-12)
        for wrt in ((x, M), (x,), (M,)):
            got = torch.autograd.grad(out, wrt, grad, retain_graph=True)
            want = torch.autograd.grad(reference, wrt, grad, retain_graph=True)
            for a, b in zip(got, want, strict=True):
                assert torch.allclose(a, b, atol=1e-10)


def test_chunk_products_into_a_non_contiguous_output():
    torch.manual_seed(14)
    M, x = torch.randn(6, 6, dtype=torch.float64), torch.randn(3, 40, dtype=torch.float64)
    out = torch.randn(24, 3, dtype=torch.float64).T  # (3, 24), strided
    want = out + x @ delta_weight(M, 40, 24, "rope").T
    assert torch.allclose(add_delta_(out, x, M, "rope"), want, atol=1e-12)


@pytest.mark.parametrize("compression,d_in,d_out,size", CASES)
def test_in_place_merge_equals_adding_delta_weight(compression, d_in, d_out, size):
    # the merge's fast path adds dW's repeated rows through views of the weight; also on a transposed weight
    # (Conv1D) and with alpha = -1 (unmerge)
    torch.manual_seed(11)
    M = torch.randn(size, size, dtype=torch.float64)
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    dW = delta_weight(M, d_in, d_out, compression)
    assert torch.allclose(add_delta_weight_(W.clone(), M, compression), W + dW, atol=1e-12)
    transposed = W.T.clone()  # (d_in, d_out) storage, merged through its (d_out, d_in) view
    add_delta_weight_(transposed.T, M, compression, alpha=-1.0)
    assert torch.allclose(transposed.T, W - dW, atol=1e-12)


VJP_CASES = [case for case in CASES if case[0] in VJP_COMPRESSIONS] + WRAPS_TWICE


@pytest.mark.parametrize("compression,d_in,d_out,size", VJP_CASES)
def test_hand_written_vjp_equals_autograd_through_delta_weight(compression, d_in, d_out, size):
    # delta_vjp_ adds J_x^T g into a gradient that already holds something (the base layer's), with batch dims, a
    # non-contiguous x and grad_out; grad_x or grad_M alone
    torch.manual_seed(12)
    M = torch.randn(size, size, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 2, d_in, dtype=torch.float64).transpose(0, 1).requires_grad_()  # (2, 4, d_in), strided
    g = torch.randn(4, 2, d_out, dtype=torch.float64).transpose(0, 1)
    want_x, want_M = torch.autograd.grad(x @ delta_weight(M, d_in, d_out, compression).T, (x, M), g)
    already = torch.randn(2, 4, d_in, dtype=torch.float64)
    grad_x = already.clone()
    grad_M = delta_vjp_(g, x.detach(), M.detach(), compression, grad_x=grad_x)
    assert torch.allclose(grad_x, already + want_x, atol=1e-12)
    assert torch.allclose(grad_M, want_M, atol=1e-12) and grad_M.is_contiguous()
    assert torch.allclose(delta_vjp_(g, x.detach(), M.detach(), compression), want_M, atol=1e-12)
    only_x = already.clone()
    assert delta_vjp_(g, x.detach(), M.detach(), compression, grad_x=only_x, want_M=False) is None
    assert torch.equal(only_x, grad_x)


@pytest.mark.parametrize("compression,d_in,d_out,size", CASES + WRAPS_TWICE)
def test_no_grad_path_equals_the_plain_delta(compression, d_in, d_out, size):
    # without autograd, add_delta_ accumulates GEMMs straight into the output (aligned copies of M, no copy of x)
    torch.manual_seed(13)
    M = torch.randn(size, size, dtype=torch.float64)
    x = torch.randn(4, 2, d_in, dtype=torch.float64).transpose(0, 1)
    base = torch.randn(2, 4, d_out, dtype=torch.float64)
    with torch.no_grad():
        fast = add_delta_(base.clone(), x, M, compression)
    assert torch.allclose(fast, base + x @ delta_weight(M, d_in, d_out, compression).T, atol=1e-12)


ROPE_CASES = [case for case in CASES if case[0] == "rope"] + WRAPS_TWICE[2:]


def _check_forward_autograd_and_vjp(x, M, compression, d_out):
    # against x @ delta_weight.T in float64: add_delta_ without autograd, autograd through it, and delta_vjp_ into a
    # gradient that already holds something (grad_x alone as well)
    g = torch.randn(*x.shape[:-1], d_out, dtype=torch.float64)
    base = torch.randn(*x.shape[:-1], d_out, dtype=torch.float64)
    reference = x @ delta_weight(M, x.shape[-1], d_out, compression).T
    want_x, want_M = torch.autograd.grad(reference, (x, M), g)
    with torch.no_grad():
        assert torch.allclose(add_delta_(base.clone(), x, M, compression), base + reference, atol=1e-12)
    got_x, got_M = torch.autograd.grad(add_delta_(base.clone(), x, M, compression), (x, M), g)
    assert torch.allclose(got_x, want_x, atol=1e-10) and torch.allclose(got_M, want_M, atol=1e-10)
    grad_x = torch.ones_like(want_x)
    grad_M = delta_vjp_(g, x.detach(), M.detach(), compression, grad_x=grad_x)
    assert torch.allclose(grad_x, 1 + want_x, atol=1e-12) and torch.allclose(grad_M, want_M, atol=1e-12)
    assert delta_vjp_(g, x.detach(), M.detach(), compression, want_M=False) is None


@pytest.mark.parametrize("rotates_input", [True, False], ids=["rotated-x", "rotated-M"])
@pytest.mark.parametrize("compression,d_in,d_out,size", ROPE_CASES)
def test_rope_rotating_the_input_or_the_blocks_gives_the_same_numbers(rotates_input, compression, d_in, d_out, size):
    # X_c (M R_c)^T = (X_c R_c^T) M^T: with fewer tokens than r_hat the chunks of x are rotated, else the blocks of
    # M. Both sides of that threshold: the no-grad forward, autograd through add_delta_, and delta_vjp_
    n = size - 1 if rotates_input else size
    assert _rotates_input(n, rope_tables(size, 1)[0]) is rotates_input
    torch.manual_seed(15)
    M = torch.randn(size, size, dtype=torch.float64, requires_grad=True)
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    _check_forward_autograd_and_vjp(x, M, compression, d_out)


@pytest.mark.parametrize("n", [9, 1100], ids=["rotated-x", "rotated-M"])
def test_rope_vjp_in_bfloat16_at_large_r_hat_stays_within_rounding(n):
    # in bf16 on CPU at r_hat > 1024, grad_M's GEMM takes a row-major copy of g^T (both sides of the rotation
    # threshold); compared with float64 on the same bf16 inputs, errors stay at bf16 rounding (relative 2^-7 of
    # each gradient's norm)
    torch.manual_seed(16)
    d_in, d_out, size = 1100, 2100, 1040  # 2 chunks, the second wraps; a tiled output
    M, x, g = (torch.randn(*shape).bfloat16() for shape in ((size, size), (n, d_in), (n, d_out)))
    assert _rotates_input(n, rope_tables(size, 1)[0]) is (n < size) and _transposed_operand_is_slow(g, size)
    M64, x64 = M.double().requires_grad_(), x.double().requires_grad_()
    want_x, want_M = torch.autograd.grad(x64 @ delta_weight(M64, d_in, d_out, "rope").T, (x64, M64), g.double())
    grad_x = torch.zeros(n, d_in, dtype=torch.bfloat16)
    grad_M = delta_vjp_(g, x, M, "rope", grad_x=grad_x)
    for got, want in ((grad_x, want_x), (grad_M, want_M)):
        assert got.dtype == torch.bfloat16
        assert (got.double() - want).norm() <= 2**-7 * want.norm()


def test_vjp_refuses_operators_without_one():
    with pytest.raises(ValueError, match="delta_vjp_ covers"):
        delta_vjp_(torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(4, 4), "sharing_chunked")


@pytest.mark.parametrize("compression,d_in,d_out,size", CHUNK_CASES + WRAPS_TWICE[1:])
def test_batched_chunk_path_equals_delta_weight(compression, d_in, d_out, size, monkeypatch):
    # the GPU's path for rope / decouple (one bmm over all chunks, _batches_chunks), forced here on the CPU: the
    # no-grad forward, autograd through add_delta_ and delta_vjp_ into a gradient that already holds something
    monkeypatch.setattr(inplace, "_batches_chunks", lambda x: True)
    torch.manual_seed(17)
    M = torch.randn(size, size, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 2, d_in, dtype=torch.float64).transpose(0, 1).requires_grad_()  # (2, 4, d_in), strided
    _check_forward_autograd_and_vjp(x, M, compression, d_out)
