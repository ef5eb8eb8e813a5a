"""MoRA's math (arXiv 2405.12130, Eq. 2-11), the reference: delta(x) = f_decomp(M @ f_comp(x)), with one square M
of shape (r_hat, r_hat).

Pure functions, torch only, out of place, written to read against the paper. `delta` is the forward, `delta_weight`
the (d_out, d_in) matrix that merges into the base weight (Eq. 3): for every operator `delta(x) == x @
delta_weight(M, ...).T`. The fast paths live apart and are tested against these: mora.adapters.inplace (in-place
GEMMs tuned on the CPU, a backward by hand; the eager path on every device) and mora.adapters.compiled (these
functions through torch.compile: the GPU path). The layer chooses between them (mora.adapters.peft_tuner.layer).

Operators (`compression`), with the authors' `mora_type` numbers kept only in OFFICIAL_TYPES:

- `truncation` (Eq. 4/5): f_comp(x) = x[:r_hat], f_decomp(y) = [y; 0], so dW = [[M, 0], [0, 0]].
  Needs r_hat <= min(d_in, d_out); no padding.
- `sharing` (Eq. 6/7, type 1): input feature j joins group j mod r_hat (the input is wrap-padded to a multiple of
  r_hat with its own first features), outputs are M's output tiled: dW[i, j] = M[i mod r_hat, j mod r_hat].
- `sharing_chunked` (type 2), `sharing_chunked_in` (type 3), `sharing_chunked_out` (type 4): the same sharing with
  contiguous groups (m chunks of size q+1, then r_hat-m of size q, no padding) on both sides, on the input side
  only, or on the output side only. The authors use them only to switch groups between ReMoRA restarts.
- `decouple` (Eq. 8): the wrap-padded input is cut into n = ceil(d_in / r_hat) chunks, M maps each chunk, the
  outputs are concatenated and truncated to d_out (tiled if shorter): dW = blockdiag(M, ..., M). The paper leaves
  padding open; we use the same wrap-around padding and output rule as `rope`, so that `decouple` is exactly
  `rope` without its rotation (the author's description in kongds/MoRA#24).
- `rope` (Eq. 9-11, type 6): as `decouple`, but chunk c is rotated RoPE-style by angles c * theta_j first
  (rotate_half pairing j <-> j + r_hat/2, theta_j = 10000^(-2j/r_hat); chunk 0 is not rotated), so
  dW = blockdiag(M R_0, M R_1, ...). Rotating the chunk of x or the block of M is the same: X_c R_c^T M^T =
  X_c (M R_c)^T; here M is rotated (s blocks P_c = M R_c).

Where the output is truncated (n * r_hat > d_out) only the first ceil(d_out / r_hat) chunks reach the output; only
those are computed. Wrap-around padding is a true cycle (position k reads feature k mod d_in), which equals the
authors' `cat([x, x[..., :pad]])` wherever theirs runs and also covers r_hat > 2 * d_in, where theirs crashes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

COMPRESSIONS: tuple[str, ...] = (
    "truncation",
    "sharing",
    "decouple",
    "rope",
    "sharing_chunked",
    "sharing_chunked_in",
    "sharing_chunked_out",
)


OFFICIAL_TYPES: dict[int, str] = {
    1: "sharing",
    2: "sharing_chunked",
    3: "sharing_chunked_in",
    4: "sharing_chunked_out",
    6: "rope",
}


ROUNDINGS: tuple[str, ...] = ("official", "paper")


# For each sharing operator: (input grouping, output grouping).
SHARING_GROUPS: dict[str, tuple[str, str]] = {
    "sharing": ("cyclic", "cyclic"),
    "sharing_chunked": ("chunked", "chunked"),
    "sharing_chunked_in": ("chunked", "cyclic"),
    "sharing_chunked_out": ("cyclic", "chunked"),
}


CHUNK_OPERATORS = ("decouple", "rope")


ROPE_BASE = 10000.0


def check_compression(compression: object) -> str:
    """Return `compression` if it names an operator, else raise ValueError saying what is accepted."""
    if isinstance(compression, int) and not isinstance(compression, bool):
        hint = f" (the authors' mora_type={compression} is compression={OFFICIAL_TYPES[compression]!r})"
        raise ValueError(
            f"compression must be an operator name, not a number: {compression!r}"
            + (hint if compression in OFFICIAL_TYPES else "")
            + f"; choose one of {', '.join(COMPRESSIONS)}"
        )
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    return compression  # type: ignore[return-value]


def r_hat(d_in: int, d_out: int, r: int, compression: str, rounding: str = "official") -> int:
    """Side of the square M with LoRA's budget (d_in + d_out) * r.

    `official` rounds to the nearest integer as the authors' code does, `paper` floors as the paper writes
    (r_hat = floor(sqrt((d + k) r))). `rope` then rounds down to an even size, since it rotates pairs.
    """
    check_compression(compression)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if d_in <= 0 or d_out <= 0:
        raise ValueError(f"layer dimensions must be positive, got d_in={d_in}, d_out={d_out}")
    budget = (d_in + d_out) * r
    if rounding == "official":
        size = int(math.sqrt(budget) + 0.5)
    elif rounding == "paper":
        size = math.isqrt(budget)
    else:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDINGS)}")
    if compression == "rope":
        size = size // 2 * 2
    return size


def check_shapes(d_in: int, d_out: int, size: int, compression: str) -> None:
    """Raise ValueError where `compression` cannot map d_in -> d_out through a (size, size) matrix."""
    check_compression(compression)
    if size < 1:
        raise ValueError(f"r_hat must be at least 1, got {size}")
    if compression == "rope" and size % 2:
        raise ValueError(f"rope rotates pairs of features and needs an even r_hat, got r_hat={size}")
    if compression == "truncation" and size > min(d_in, d_out):
        raise ValueError(
            f"truncation keeps the first r_hat features, so it needs r_hat <= min(d_in, d_out); got r_hat={size} "
            f"for a {d_in} -> {d_out} layer: lower r or use compression='sharing'"
        )
    if compression in SHARING_GROUPS:
        grouping_in, grouping_out = SHARING_GROUPS[compression]
        for side, grouping, dim in (("input", grouping_in, d_in), ("output", grouping_out, d_out)):
            if grouping == "chunked" and size > dim:
                raise ValueError(
                    f"{compression} cuts the {side} ({dim} features) into r_hat={size} contiguous groups, which "
                    f"needs r_hat <= {dim}: lower r or use compression='sharing'"
                )


def rope_tables(size: int, n_chunks: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin of the chunk rotations, each (n_chunks, size), float32, as the authors build them."""
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, size, 2, device=device).float() / size))  # (size/2,)
    freqs = torch.outer(torch.arange(n_chunks, device=device).float(), inv_freq)  # (n, size/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (n, size)
    return emb.cos(), emb.sin()


def n_chunks(d_in: int, size: int) -> int:
    """Number of r_hat-chunks in the wrap-padded input of `decouple` / `rope`."""
    return -(-d_in // size)


def surviving_chunks(d_in: int, d_out: int, size: int) -> int:
    """Chunks whose outputs reach the (truncated) output of `decouple` / `rope`."""
    n = n_chunks(d_in, size)
    return min(n, -(-d_out // size)) if n * size >= d_out else n


def wrap(x: Tensor, length: int, start: int = 0) -> Tensor:
    # (..., d_in) -> (..., length - start): position k in [start, length) reads feature k mod d_in; a view of x
    # when no position wraps around, else a copy of its runs
    pieces = [x[..., f : f + n] for _, f, n in wrap_runs(start, length, x.shape[-1])]
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces, dim=-1) if pieces else x[..., :0]


def wrap_runs(start: int, stop: int, d_in: int) -> list[tuple[int, int, int]]:
    # positions [start, stop) of the wrap-padded input as runs of contiguous features: (offset from start, first
    # feature, length)
    runs, p = [], start
    while p < stop:
        f = p % d_in
        length = min(stop - p, d_in - f)
        runs.append((p - start, f, length))
        p += length
    return runs


def chunk_groups(dim: int, size: int, device: torch.device) -> Tensor:
    # (dim,) -> group of each feature: m chunks of q+1, then size-m chunks of q (authors' types 2-4)
    q, m = divmod(dim, size)
    i = torch.arange(dim, device=device)
    split = m * (q + 1)
    return torch.where(i < split, i // (q + 1), m + (i - split).clamp(min=0) // q)


def compress_sharing(x: Tensor, size: int, grouping: str) -> Tensor:
    # (..., d_in) -> (..., size)
    d_in = x.shape[-1]
    if grouping == "cyclic":
        full, rest = divmod(d_in, size)
        if rest == 0 or full == 0:
            n = n_chunks(d_in, size)
            return wrap(x, n * size).reshape(*x.shape[:-1], n, size).sum(dim=-2)
        # no padded copy of x: the last, partial chunk adds its features and the wrapped first ones
        summed = x[..., : full * size].reshape(*x.shape[:-1], full, size).sum(dim=-2)  # (..., size)
        head = summed[..., :rest] + x[..., full * size :]
        return torch.cat([head, summed[..., rest:] + x[..., : size - rest]], dim=-1)
    q, m = divmod(d_in, size)
    split = m * (q + 1)
    long = x[..., :split].reshape(*x.shape[:-1], m, q + 1).sum(dim=-1)  # (..., m)
    short = x[..., split:].reshape(*x.shape[:-1], size - m, q).sum(dim=-1)  # (..., size - m)
    return torch.cat([long, short], dim=-1)


def decompress_sharing(y: Tensor, d_out: int, grouping: str) -> Tensor:
    # (..., size) -> (..., d_out)
    size = y.shape[-1]
    if grouping == "cyclic":
        return tile(y, d_out)
    q, m = divmod(d_out, size)  # output i of the first m groups repeated q + 1 times, of the others q times
    lead = y.shape[:-1]
    long = y[..., :m].unsqueeze(-1).expand(*lead, m, q + 1).reshape(*lead, m * (q + 1))
    short = y[..., m:].unsqueeze(-1).expand(*lead, size - m, q).reshape(*lead, (size - m) * q)
    return torch.cat([long, short], dim=-1)


def tile(y: Tensor, d_out: int) -> Tensor:
    # (..., w) -> (..., d_out): y repeated along the last axis and truncated to d_out
    width = y.shape[-1]
    reps = -(-d_out // width)
    return y.unsqueeze(-2).expand(*y.shape[:-1], reps, width).reshape(*y.shape[:-1], reps * width)[..., :d_out]


def rotate(A: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # A R_c along the last axis, cos and sin broadcast against A: the rotation rope applies to M's columns,
    # pairing column b with b + half: (A R)[:half] = A[:half] cos + A[half:] sin, (A R)[half:] = A[half:] cos -
    # A[:half] sin (the authors' M * cos + rotate_half(M) * sin with their rotate_half's sign)
    half = A.shape[-1] // 2
    return A * cos + torch.cat([A[..., half:], -A[..., :half]], dim=-1) * sin


def chunk_blocks(M: Tensor, s: int, cos: Tensor | None, sin: Tensor | None) -> Tensor:
    # (size, size) -> (s, size, size): P_c = M (decouple, a broadcast view) or M R_c (rope)
    return M.expand(s, *M.shape) if cos is None else rotate(M, cos[:, None], sin[:, None])


def chunk_tables(size: int, s: int, tables: tuple[Tensor, Tensor] | None, like: Tensor) -> tuple[Tensor, Tensor]:
    # cached or fresh rotation tables, first s rows, in like's dtype and device
    cos, sin = tables if tables is not None else rope_tables(size, s, like.device)
    if cos.shape[0] < s or cos.shape[1] != size:
        raise ValueError(f"rope tables of shape {tuple(cos.shape)} do not cover {s} chunks of size {size}")
    return cos[:s].to(device=like.device, dtype=like.dtype), sin[:s].to(device=like.device, dtype=like.dtype)


def delta(
    x: Tensor,
    M: Tensor,
    d_out: int,
    compression: str,
    tables: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """f_decomp(M @ f_comp(x)): (..., d_in) -> (..., d_out), computed in x's dtype.

    `tables` are optional precomputed `rope_tables` (an nn.Module keeps them as buffers); without them they are
    built on the fly.
    """
    d_in, size = x.shape[-1], M.shape[0]
    check_shapes(d_in, d_out, size, compression)
    if M.shape != (size, size):
        raise ValueError(f"M must be square, got shape {tuple(M.shape)}")
    if compression == "truncation":
        y = x[..., :size] @ M.T  # (..., size)
        return torch.nn.functional.pad(y, (0, d_out - size))
    if compression in SHARING_GROUPS:
        grouping_in, grouping_out = SHARING_GROUPS[compression]
        y = compress_sharing(x, size, grouping_in) @ M.T  # (..., size)
        return decompress_sharing(y, d_out, grouping_out)
    s = surviving_chunks(d_in, d_out, size)  # decouple / rope: only the chunks that reach the output
    cos, sin = chunk_tables(size, s, tables, x) if compression == "rope" else (None, None)
    y = chunk_products(x, chunk_blocks(M, s, cos, sin)).flatten(-2)  # (..., s * size): X_c P_c^T
    return y[..., :d_out] if s * size >= d_out else tile(y, d_out)


def chunk_products(x: Tensor, P: Tensor) -> Tensor:
    """X_c P_c^T for the first s chunks X_c of the wrap-padded input: x (..., d_in), P (s, size, size) -> (..., s,
    size). Every operand is a view of x, never a padded copy, so that autograd keeps x itself for backward: the
    chunks inside x in one einsum, each chunk that wraps around as the sum over its runs of contiguous features."""
    d_in, (s, size) = x.shape[-1], P.shape[:2]
    inside = min(s, d_in // size)
    parts = []  # (..., chunks, size) each
    if inside:  # none where r_hat > d_in: every chunk wraps
        chunks = x[..., : inside * size].unflatten(-1, (inside, size))  # (..., inside, size), a view
        parts.append(torch.einsum("...cj,cij->...ci", chunks, P[:inside]))
    for c in range(inside, s):  # (..., size) each: run (offset o in the chunk, first feature f, length n)
        runs = wrap_runs(c * size, (c + 1) * size, d_in)
        parts.append(sum(x[..., f : f + n] @ P[c, :, o : o + n].T for o, f, n in runs).unsqueeze(-2))
    return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]


def delta_weight(
    M: Tensor,
    d_in: int,
    d_out: int,
    compression: str,
    tables: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The (d_out, d_in) matrix dW with delta(x) == x @ dW.T, in M's dtype. Vectorised: no loop over features."""
    size = M.shape[0]
    check_shapes(d_in, d_out, size, compression)
    if compression == "truncation":
        dW = M.new_zeros(d_out, d_in)
        dW[:size, :size] = M
        return dW
    rows = weight_rows(M, d_in, d_out, compression, tables)  # (width, d_in)
    if compression in SHARING_GROUPS and SHARING_GROUPS[compression][1] == "chunked":
        return rows[chunk_groups(d_out, size, M.device)]  # (d_out, d_in): contiguous groups of output rows
    width = rows.shape[0]
    if width >= d_out:
        return rows[:d_out]
    out = M.new_empty(d_out, d_in)
    reps, rest = divmod(d_out, width)
    out[: reps * width].unflatten(0, (reps, width)).copy_(rows.unsqueeze(0).expand(reps, width, d_in))
    out[reps * width :].copy_(rows[:rest])
    return out


def weight_rows(M: Tensor, d_in: int, d_out: int, compression: str, tables: tuple[Tensor, Tensor] | None) -> Tensor:
    # the block of dW's rows that its output side repeats or regroups: (size, d_in) for the sharing family, the
    # (s * size, d_in) rows of blockdiag(P_0, ..., P_{s-1}) for decouple / rope
    size = M.shape[0]
    if compression in SHARING_GROUPS:
        if SHARING_GROUPS[compression][0] == "cyclic":
            padded = n_chunks(d_in, size) * size
            return fold_padded(M[:, torch.arange(padded, device=M.device) % size], d_in)  # (size, d_in)
        return M[:, chunk_groups(d_in, size, M.device)]  # (size, d_in)
    s = surviving_chunks(d_in, d_out, size)
    cos, sin = chunk_tables(size, s, tables, M) if compression == "rope" else (None, None)
    blocks = chunk_blocks(M, s, cos, sin)  # (s, size, size)
    width, whole = s * size, min(s, d_in // size)
    # padded input columns folded onto d_in, written in place: peak memory is width x d_in, never a width x width
    # block-diagonal
    rows = M.new_zeros(width, d_in)
    if whole:
        region = rows[: whole * size, : whole * size].unflatten(0, (whole, size)).unflatten(2, (whole, size))
        region.diagonal(dim1=0, dim2=2).copy_(blocks[:whole].permute(1, 2, 0))  # (size, size, whole) view
    if whole < s:  # the partial last chunk: its padded columns k read feature k mod d_in
        columns = torch.arange(whole * size, width, device=M.device) % d_in
        rows[whole * size :].index_add_(1, columns, blocks[whole])
    return rows


def fold_padded(cols: Tensor, d_in: int) -> Tensor:
    # (rows, padded) -> (rows, d_in): padded input position k adds into feature k mod d_in
    padded = cols.shape[1]
    if padded <= d_in:
        return torch.nn.functional.pad(cols, (0, d_in - padded))
    out = cols[:, :d_in].clone()
    return out.index_add_(1, torch.arange(d_in, padded, device=cols.device) % d_in, cols[:, d_in:])
