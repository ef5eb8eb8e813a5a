"""MoRA's in-place fast paths, the eager path on every device: the layer's forward, backward and merge.

Each is tested against the reference math (mora.adapters.mora) in float64:

- `add_delta_(out, x, M, ...)`: out += delta(x), adding M's output through views of `out` where an operator tiles
  or truncates it, so that no (..., d_out) update is materialised; `rope` applies P_c = M R_c to each chunk
  (rotating M, s r_hat^2 numbers, rather than x), so no rotated copy of x is kept for backward.
- `delta_vjp_`: delta's backward by hand (the fused training path, mora.adapters.fused), adding the input gradient
  into a given buffer.
- `add_delta_weight_`: the merge, weight += dW without materialising dW where its rows repeat.

On the CPU the GEMMs run on row-aligned operands, one per surviving chunk (the CPU's hardware heuristics are here,
each with its measurement in LOG.md); on other devices the chunk operators run as batched GEMMs over all chunks
(`_batches_chunks`). The compiled GPU path is mora.adapters.compiled.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mora.adapters.mora import (
    CHUNK_OPERATORS,
    SHARING_GROUPS,
    check_shapes,
    chunk_blocks,
    chunk_tables,
    compress_sharing,
    delta,
    delta_weight,
    n_chunks,
    surviving_chunks,
    weight_rows,
    wrap,
    wrap_runs,
)

VJP_COMPRESSIONS: tuple[str, ...] = ("truncation", "sharing", "decouple", "rope")  # those with a backward by hand


def add_delta_(
    out: Tensor, x: Tensor, M: Tensor, compression: str, tables: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """out += delta(x, M, out.shape[-1], compression), in place; returns out.

    The layer's fast path: where an operator tiles or truncates its output, M's output is added through views of
    `out`, so no (..., d_out) update is materialised. Autograd-safe (the base layer's output is not needed by its
    backward)."""
    d_out, size = out.shape[-1], M.shape[0]
    check_shapes(x.shape[-1], d_out, size, compression)
    recording = torch.is_grad_enabled() and (x.requires_grad or M.requires_grad)
    if not out.is_contiguous() and compression in CHUNK_OPERATORS:
        out.add_(delta(x, M, d_out, compression, tables))
    elif not recording and compression in VJP_COMPRESSIONS and out.is_contiguous():
        _add_delta_no_grad_(out.view(-1, d_out), x.reshape(-1, x.shape[-1]), M, compression, tables)
    elif compression in CHUNK_OPERATORS:  # in x's dtype cast to out's: autocast computes the base layer in bf16
        cos, sin = tables if tables is not None else (None, None)
        _AddChunkOutputs.apply(out, x.to(out.dtype), M.to(out.dtype), cos, sin, compression)
    elif compression in SHARING_GROUPS and SHARING_GROUPS[compression][1] == "cyclic":
        _add_tiled_(out, compress_sharing(x, size, SHARING_GROUPS[compression][0]) @ M.T)
    elif compression == "truncation":
        out[..., :size].add_(x[..., :size] @ M.T)
    else:
        out.add_(delta(x, M, d_out, compression, tables))
    return out


class _AddChunkOutputs(torch.autograd.Function):
    """out += the chunk outputs of x (decouple / rope) in place, under autograd: forward `_add_chunk_outputs_`,
    backward `delta_vjp_`. Saves x as given (no copy, no rotated copy) and M, not the rotated blocks."""

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, M: Tensor, cos: Tensor | None, sin: Tensor | None, compression: str):
        tables = None if cos is None else (cos, sin)
        _add_chunk_outputs_(out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), M, compression, tables)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, M, cos, sin)
        ctx.compression = compression
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, M, cos, sin = ctx.saved_tensors
        want_x, want_M = ctx.needs_input_grad[1:3]
        tables = None if cos is None else (cos, sin)
        grad_x = torch.zeros(x.shape, dtype=x.dtype, device=x.device) if want_x else None
        # in the forward's dtype: a backward called inside an autocast region runs under it (mora.adapters.fused)
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_M = delta_vjp_(grad_out, x, M, ctx.compression, tables, grad_x, want_M)
        return grad_out, grad_x, grad_M, None, None, None


def _add_delta_no_grad_(out: Tensor, x: Tensor, M: Tensor, compression: str, tables: tuple[Tensor, Tensor] | None):
    # out (N, d_out) += delta(x (N, d_in)) without autograd (inference, and the fused layer's forward): GEMMs on
    # row-aligned operands, accumulated into out's columns where the operator allows
    size = M.shape[0]
    if compression in CHUNK_OPERATORS:
        _add_chunk_outputs_(out, x, M, compression, tables)
    elif compression == "truncation":
        out[:, :size].addmm_(x[:, :size], _ld_aligned(M).T)
    else:  # sharing: (N, size) compressed input, tiled output
        compressed = _ld_aligned(compress_sharing(x, size, "cyclic"))
        _add_tiled_(out, torch.mm(compressed, _ld_aligned(M).T, out=_aligned_empty(x.shape[0], size, x)))


# Row strides of GEMM operands we allocate are rounded up to 64 bytes: on r_hat = 1966 (a row stride of 7864 bytes)
# this CPU's BLAS ran at 135 GFLOP/s, on the same matrices with a 64-byte-multiple stride at 181-185 (LOG.md).
_ALIGN_BYTES = 64


def _pads(like: Tensor) -> bool:
    # whether GEMM operands like this one get padded rows. Not reduced-precision floats on CPU: there torch 2.13's
    # bf16 GEMM (oneDNN on CPUs with AVX512-BF16) reads an A operand's row padding into the result, so the
    # uninitialised columns came out as NaN (LOG.md, 2026-12-04; tests/adapters/test_fused.py)
    return not (like.device.type == "cpu" and like.dtype in (torch.bfloat16, torch.float16))


def _aligned_empty(rows: int, cols: int, like: Tensor) -> Tensor:
    # (rows, cols) view of an uninitialised buffer whose row stride is a multiple of _ALIGN_BYTES (where _pads)
    if not _pads(like):
        return like.new_empty(rows, cols)
    step = _ALIGN_BYTES // like.element_size()
    return like.new_empty(rows, -(-cols // step) * step)[:, :cols]


def _ld_aligned(t: Tensor) -> Tensor:
    # t (rows, cols) itself if its row stride is aligned (or it needs none and is contiguous), else an aligned copy
    if t.stride(1) == 1 and (not _pads(t) or (t.stride(0) * t.element_size()) % _ALIGN_BYTES == 0):
        return t
    return _aligned_empty(*t.shape, t).copy_(t)


def _add_chunk_outputs_(out: Tensor, x: Tensor, M: Tensor, compression: str, tables: tuple[Tensor, Tensor] | None):
    # out (N, d_out) += chunk outputs of x (N, d_in), no autograd: GEMMs per surviving chunk accumulated straight
    # into out's columns, with only the rows of P_c whose outputs survive truncation; a tiled output (s * size <
    # d_out) goes through one (N, s * size) buffer. Blocks P_c = M R_c on column slices of x (no copy of x, not even
    # of a wrapping chunk), or, where fewer tokens than r_hat make rotating x cheaper, M on the rotated chunks of x.
    d_in, d_out, size = x.shape[1], out.shape[1], M.shape[0]
    s = surviving_chunks(d_in, d_out, size)
    cos, sin = chunk_tables(size, s, tables, x) if compression == "rope" else (None, None)
    if _batches_chunks(x):
        _add_chunk_outputs_batched_(out, x, M, s, cos, sin)
        return
    tiled = s * size < d_out
    target = _aligned_empty(out.shape[0], s * size, out) if tiled else out
    rotated = _rotated_chunks(x, s, cos, sin) if _rotates_input(x.shape[0], cos) else None  # (N, s, size)
    block_cos, block_sin = (cos, sin) if rotated is None else (None, None)  # the tables, where M is rotated
    buf = _aligned_empty(size, size, M) if block_cos is not None else _ld_aligned(M)  # P_c, reused by every chunk
    for c in range(s):
        lo, hi = c * size, min((c + 1) * size, d_out)
        block = _chunk_block(M[: hi - lo], c, block_cos, block_sin, buf)  # (k, size): the surviving rows of P_c
        for i, (a, j, length) in enumerate(_chunk_runs(x, c, size, rotated)):
            target[:, lo:hi].addmm_(a, block[:, j : j + length].T, beta=0 if tiled and not i else 1)
    if tiled:
        _add_tiled_(out, target)


def _batches_chunks(x: Tensor) -> bool:
    # chunk operators as batched GEMMs over all surviving chunks at once, on (s, N, size) views of x, the output and
    # the gradients, instead of a loop of GEMMs and rotations per chunk: on a GPU each of those is a kernel launch
    # of little work (rope at r = 8 on a 1024-wide model: 8 chunks of 128, about 40 launches per layer and step),
    # and the loop ran rope r = 8 at a third of FFT's tokens per second on an H200 (LOG.md, 2026-11-30). The CPU
    # keeps the loop, tuned there (it avoids the (s, size, size) blocks and a padded copy of a truncated gradient).
    return x.device.type != "cpu"


def _add_chunk_outputs_batched_(
    out: Tensor, x: Tensor, M: Tensor, s: int, cos: Tensor | None, sin: Tensor | None
) -> None:
    # out (N, d_out) += the first s chunk outputs of x (N, d_in): Y_c = X_c P_c^T for every chunk in one bmm,
    # written straight into out's columns when the chunks tile it exactly, else through one (N, s * size) buffer
    d_out, size = out.shape[1], M.shape[0]
    width = s * size
    chunks = wrap(x, width).unflatten(1, (s, size)).transpose(0, 1)  # (s, N, size), a view unless x wraps
    blocks_T = chunk_blocks(M, s, cos, sin).transpose(1, 2)  # (s, size, size): P_c^T
    if width == d_out and out.stride(1) == 1:
        out.unflatten(1, (s, size)).transpose(0, 1).baddbmm_(chunks, blocks_T)
        return
    y = torch.bmm(chunks, blocks_T).transpose(0, 1).flatten(1)  # (N, width)
    if width > d_out:  # truncated: only the last chunk loses rows
        out.add_(y[:, :d_out])
    else:
        _add_tiled_(out, y)


def _chunk_vjp_batched_(
    g: Tensor, x: Tensor, M: Tensor, s: int, cos: Tensor | None, sin: Tensor | None, gx: Tensor | None, want_M: bool
) -> Tensor | None:
    # delta_vjp_ of the chunk operators as batched GEMMs (see _batches_chunks): g (N, d_out), x and gx (N, d_in)
    d_in, size = x.shape[1], M.shape[0]
    width = s * size
    if width != g.shape[1]:
        g = _fold_tiles(g, width)  # (N, width): tiles summed, or zero-padded where the output is truncated
    g = g if g.stride(1) == 1 else g.contiguous()
    g_chunks = g.unflatten(1, (s, size)).transpose(0, 1)  # (s, N, size)
    if gx is not None:  # dX_c = g_c P_c
        blocks = chunk_blocks(M, s, cos, sin)  # (s, size, size)
        if width <= d_in:  # every chunk inside x: straight into gx's columns
            gx[:, :width].unflatten(1, (s, size)).transpose(0, 1).baddbmm_(g_chunks, blocks)
        else:
            _add_wrapped_(gx, torch.bmm(g_chunks, blocks).transpose(0, 1).flatten(1), 0)
    if not want_M:
        return None
    chunks = wrap(x, width).unflatten(1, (s, size)).transpose(0, 1)  # (s, N, size)
    grad_P = torch.bmm(g_chunks.transpose(1, 2), chunks)  # (s, size, size): g_c^T X_c, the gradient of P_c
    if cos is not None:  # P_c = M R_c: dM = sum_c dP_c R_c^T
        grad_P = _rotate_last(grad_P, cos[:, None], sin[:, None], transpose=True)
    return grad_P.sum(0)


def _rotates_input(n_tokens: int, cos: Tensor | None) -> bool:
    # rope: X_c (M R_c)^T = (X_c R_c^T) M^T, so a chunk's rotation can act on its N x size inputs instead of the
    # size x size block; cheaper when N < size (2x256 tokens at r=256: 512 x 1448 values per chunk, not 1448^2)
    return cos is not None and n_tokens < cos.shape[1]


def _transposed_operand_is_slow(t: Tensor, size: int) -> bool:
    # grad_M sums g_c^T X_c over N tokens, a GEMM whose first operand is transposed. For r_hat > 1024 this CPU's
    # bf16 GEMM ran it 20-45% slower than on a row-major copy of g^T, copy included (r_hat = 1448 at 2048 tokens:
    # 84 ms against 59 + 8); at r_hat <= 1024 the copy did not pay, in float32 never (LOG.md). GPU GEMMs take
    # transposed operands natively.
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16) and size > 1024


def _rotated_chunks(x: Tensor, s: int, cos: Tensor, sin: Tensor) -> Tensor:
    # (N, d_in) -> (N, s, size): X_c R_c^T for the first s chunks of the wrap-padded input, row-aligned
    size = cos.shape[1]
    out = _aligned_chunks(x.shape[0], s, size, x)
    inside = _inside_chunks(x.shape[1], s, size)
    for lo, hi in ((0, inside), (inside, s)):  # chunks inside x, from a view of it; those that wrap, from a copy
        chunks = wrap(x, hi * size, lo * size).unflatten(1, (hi - lo, size))
        _rotate_last(chunks, cos[lo:hi], sin[lo:hi], out=out[:, lo:hi], transpose=True)
    return out


def _inside_chunks(d_in: int, s: int, size: int) -> int:
    # how many of the first s chunks of the wrap-padded input lie inside x (the rest wrap around)
    return min(s, d_in // size)


def _aligned_chunks(n: int, s: int, size: int, like: Tensor) -> Tensor:
    # (n, s, size) uninitialised, each (n, size) chunk a row-aligned GEMM operand
    return _aligned_empty(n * s, size, like).unflatten(0, (n, s))


def _chunk_runs(x: Tensor, c: int, size: int, rotated: Tensor | None) -> list[tuple[Tensor, int, int]]:
    # chunk c's input as (N, length) column runs with their first column in the chunk: the rotated chunk whole, or
    # x's column slices (two where the chunk wraps around)
    if rotated is not None:
        return [(rotated[:, c], 0, size)]
    return [(x[:, f : f + length], j, length) for j, f, length in wrap_runs(c * size, (c + 1) * size, x.shape[1])]


def _chunk_block(M: Tensor, c: int, cos: Tensor | None, sin: Tensor | None, buf: Tensor) -> Tensor:
    # the block that multiplies chunk c's input, on M's first k rows: (k, size), no allocation. M itself (no tables:
    # decouple, or rope on rotated inputs; buf holds M), else P_c = M R_c rotated into buf
    if cos is None:
        return buf[: M.shape[0]]
    return _rotate_last(M, cos[c], sin[c], out=buf[: M.shape[0]])


def delta_vjp_(
    grad_out: Tensor,
    x: Tensor,
    M: Tensor,
    compression: str,
    tables: tuple[Tensor, Tensor] | None = None,
    grad_x: Tensor | None = None,
    want_M: bool = True,
) -> Tensor | None:
    """Backward of `delta` by hand: grad_x += J_x^T grad_out in place (when given), and return grad_M (when wanted).

    grad_out (..., d_out), x and grad_x (..., d_in), grad_x contiguous. For the fused layer, whose backward adds the
    adapter's input gradient into the base layer's (no second (..., d_in) buffer, no sum); chunk operators run one
    GEMM per surviving chunk on strided column slices of x, or, for rope with fewer tokens than r_hat, on x's rotated
    chunks (recomputed here, never saved). Operators: VJP_COMPRESSIONS."""
    d_in, d_out, size = x.shape[-1], grad_out.shape[-1], M.shape[0]
    check_shapes(d_in, d_out, size, compression)
    if compression not in VJP_COMPRESSIONS:
        raise ValueError(f"delta_vjp_ covers {', '.join(VJP_COMPRESSIONS)}, not {compression!r}; use autograd")
    g, x = grad_out.reshape(-1, d_out), x.reshape(-1, d_in)
    gx = None if grad_x is None else grad_x.view(-1, d_in)
    if compression == "truncation":
        g = g[:, :size]
        if gx is not None:
            gx[:, :size].addmm_(g, _ld_aligned(M))
        return torch.mm(g.T, x[:, :size], out=_aligned_empty(size, size, M)).contiguous() if want_M else None
    if compression == "sharing":
        g = _ld_aligned(_fold_tiles(g, size))  # (N, size)
        if gx is not None:
            _add_unfolded_(gx, torch.mm(g, _ld_aligned(M), out=_aligned_empty(g.shape[0], size, g)))
        if not want_M:
            return None
        compressed = _ld_aligned(compress_sharing(x, size, "cyclic"))  # (N, size)
        return torch.mm(g.T, compressed, out=_aligned_empty(size, size, M)).contiguous()
    s = surviving_chunks(d_in, d_out, size)
    cos, sin = chunk_tables(size, s, tables, x) if compression == "rope" else (None, None)
    if _batches_chunks(x):
        return _chunk_vjp_batched_(g, x, M, s, cos, sin, gx, want_M)
    folded = _fold_tiles(g, s * size) if s * size < d_out else g  # (N, min(s * size, d_out))
    rotated = _rotates_input(x.shape[0], cos)
    # g^T whole (one blocked transpose: a third of the time of one copy per chunk), where that pays
    g_T = folded.T.contiguous() if want_M and _transposed_operand_is_slow(g, size) else None
    g = _ld_aligned(folded) if s * size < d_out else g
    block_cos, block_sin = (None, None) if rotated else (cos, sin)  # the tables, where M is rotated
    xr = _rotated_chunks(x, s, cos, sin) if rotated and want_M else None  # (N, s, size): X_c R_c^T
    grad_in = _aligned_chunks(x.shape[0], s, size, x) if rotated and gx is not None else None  # grad of xr
    grad_M = _aligned_empty(size, size, M).zero_() if want_M else None
    buf = _aligned_empty(size, size, M) if block_cos is not None else _ld_aligned(M)  # P_c, reused by every chunk
    grad_P = _aligned_empty(size, size, M) if block_cos is not None and want_M else None  # a chunk's, before unrotating
    for c in range(s):
        lo, hi = c * size, min((c + 1) * size, g.shape[1])
        g_c = g[:, lo:hi]  # (N, k)
        block = _chunk_block(M[: hi - lo], c, block_cos, block_sin, buf) if gx is not None else None  # (k, size)
        if grad_in is not None:
            grad_in[:, c].addmm_(g_c, block, beta=0)
        elif gx is not None:
            for j, f, length in wrap_runs(c * size, (c + 1) * size, d_in):
                gx[:, f : f + length].addmm_(g_c, block[:, j : j + length])
        if grad_M is None:
            continue
        into = grad_M if grad_P is None else grad_P
        g_cT = g_c.T if g_T is None else g_T[lo:hi]  # (k, N)
        for a, j, length in _chunk_runs(x, c, size, xr):  # the runs fill disjoint columns of grad_P
            into[: hi - lo, j : j + length].addmm_(g_cT, a, beta=1 if grad_P is None else 0)
        if grad_P is not None:
            _rotate_last(grad_P[: hi - lo], cos[c], sin[c], out=grad_M[: hi - lo], transpose=True, accumulate=True)
    if grad_in is not None:  # the chunks' inputs are X_c R_c^T: their gradient is (g_c M) R_c
        inside = _inside_chunks(d_in, s, size)
        into = gx[:, : inside * size].unflatten(1, (inside, size))
        _rotate_last(grad_in[:, :inside], cos[:inside], sin[:inside], out=into, accumulate=True)
        if inside < s:  # the chunks that wrap around: their gradient folded onto x's features
            wrapped = _rotate_last(grad_in[:, inside:], cos[inside:], sin[inside:]).flatten(1)
            _add_wrapped_(gx, wrapped, inside * size)
    return None if grad_M is None else grad_M.contiguous()


def _rotate_last(
    A: Tensor, cos: Tensor, sin: Tensor, out: Tensor | None = None, *, transpose: bool = False, accumulate: bool = False
) -> Tensor:
    # A R_c (transpose: A R_c^T) along the last axis, cos and sin broadcast against A: R_c is the rotation that rope
    # applies to M's columns, M R_c = M * cos + rotate_half(M) * sin, pairing column b with b + half. Written into
    # `out`, or added to it (accumulate); a new tensor when out is None.
    half = A.shape[-1] // 2
    if out is None:
        out = A * cos
    elif accumulate:
        out.addcmul_(A, cos)
    else:
        torch.mul(A, cos, out=out)
    if transpose:  # (A R^T)[:half] = A[:half] cos - A[half:] sin[half:], (A R^T)[half:] = A[half:] cos + A[:half] sin
        out[..., :half].addcmul_(A[..., half:], sin[..., half:], value=-1)
        out[..., half:].addcmul_(A[..., :half], sin[..., :half])
    else:  # (A R)[:half] = A[:half] cos + A[half:] sin[:half], (A R)[half:] = A[half:] cos - A[:half] sin[half:]
        out[..., :half].addcmul_(A[..., half:], sin[..., :half])
        out[..., half:].addcmul_(A[..., :half], sin[..., half:], value=-1)
    return out


def _add_wrapped_(gx: Tensor, g: Tensor, start: int) -> None:
    # adjoint of wrap, added in place: gx (N, d_in) += g (N, w), g's column i being position start + i, which
    # reads feature (start + i) mod d_in
    for i, f, length in wrap_runs(start, start + g.shape[1], gx.shape[1]):
        gx[:, f : f + length].add_(g[:, i : i + length])


def _fold_tiles(g: Tensor, width: int) -> Tensor:
    # adjoint of tiling to d_out: (N, d_out) -> (N, width), the sum of g's width-wide tiles (the last may be partial)
    d_out = g.shape[1]
    reps, rest = divmod(d_out, width)
    if not reps:
        return torch.nn.functional.pad(g, (0, width - d_out))
    folded = g[:, : reps * width].unflatten(1, (reps, width)).sum(1)
    if rest:
        folded[:, :rest] += g[:, reps * width :]
    return folded


def _add_unfolded_(gx: Tensor, g: Tensor) -> None:
    # adjoint of the cyclic sharing compression, added in place: gx (N, d_in) += g (N, size) at feature k mod d_in
    # for every position k of the wrap-padded input (group k mod size)
    d_in, size = gx.shape[1], g.shape[1]
    _add_tiled_(gx, g)
    padded = n_chunks(d_in, size) * size
    if padded > d_in:
        k = torch.arange(d_in, padded, device=g.device)
        gx.index_add_(1, k % d_in, g[:, k % size])


def _add_tiled_(out: Tensor, y: Tensor) -> None:
    # out (..., d_out) += y (..., w) tiled along the last axis and truncated to d_out, through views of out
    d_out, width = out.shape[-1], y.shape[-1]
    reps, rest = divmod(d_out, width)
    if reps:
        out[..., : reps * width].unflatten(-1, (reps, width)).add_(y.unsqueeze(-2).to(out.dtype))
    if rest:
        out[..., reps * width :].add_(y[..., :rest].to(out.dtype))


def add_delta_weight_(
    weight: Tensor,
    M: Tensor,
    compression: str,
    tables: tuple[Tensor, Tensor] | None = None,
    alpha: float = 1.0,
) -> Tensor:
    """weight (d_out, d_in) += alpha * delta_weight(M, d_in, d_out, compression), in place; returns weight.

    The merge's fast path: where dW repeats a block of rows down d_out (every operator with a cyclic output), the
    block is added through views of `weight`, so dW is never materialised (one pass over the weight). The block
    and the addition are computed in M's dtype, then cast to the weight's."""
    d_out, d_in = weight.shape
    size = M.shape[0]
    check_shapes(d_in, d_out, size, compression)
    if compression == "truncation":
        weight[:size, :size].add_(M.to(weight.dtype), alpha=alpha)
    elif compression in SHARING_GROUPS and SHARING_GROUPS[compression][1] == "chunked":
        weight.add_(delta_weight(M, d_in, d_out, compression, tables).to(weight.dtype), alpha=alpha)
    else:
        rows = weight_rows(M, d_in, d_out, compression, tables)[:d_out]
        _add_tiled_rows_(weight, rows.to(weight.dtype), alpha)
    return weight


def _add_tiled_rows_(out: Tensor, rows: Tensor, alpha: float = 1.0) -> Tensor:
    # out (d_out, d_in) += alpha * rows (width, d_in) repeated down the rows of out and truncated to d_out
    width = rows.shape[0]
    reps, rest = divmod(out.shape[0], width)
    if reps:
        out[: reps * width].unflatten(0, (reps, width)).add_(rows.unsqueeze(0), alpha=alpha)
    if rest:
        out[reps * width :].add_(rows[:rest], alpha=alpha)
    return out
