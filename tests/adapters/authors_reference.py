"""An independent, loop-based re-statement of the authors' MoRA (kongds/MoRA, peft-mora layer.py at d0528b4):
the forward `_apply_mora` and the merge `get_delta_weight` for mora_type 1, 2, 3, 4 and 6, written from their
semantics for parity tests. It keeps their limits: it only runs where their code runs (pad <= d_in; rope merge
with at least 2 chunks)."""

from __future__ import annotations

import torch


def _uneven(dim: int, size: int) -> tuple[int, int, int]:
    # their split: m chunks of (dim // size + 1), then size - m chunks of dim // size
    short = dim // size
    m = dim - size * short
    return m, short + 1, short


def authors_forward(x: torch.Tensor, M: torch.Tensor, d_out: int, mora_type: int) -> torch.Tensor:
    d_in, size = x.shape[-1], M.shape[0]
    lead = x.shape[:-1]
    if mora_type in (1, 4, 6):
        n = d_in // size
        if d_in % size:
            pad = size - d_in % size
            x = torch.cat([x, x[..., :pad]], dim=-1)
            n += 1
    if mora_type in (1, 4):
        compressed = x.view(*lead, n, size).sum(dim=-2)
    elif mora_type in (2, 3):
        m, long, short = _uneven(d_in, size)
        parts = []
        if m > 0:
            parts.append(x[..., : m * long].reshape(*lead, m, long).sum(dim=-1))
        parts.append(x[..., m * long :].reshape(*lead, size - m, short).sum(dim=-1))
        compressed = torch.cat(parts, dim=-1)
    else:  # 6
        chunks = x.view(*lead, n, size)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, size, 2).float() / size))
        freqs = torch.outer(torch.arange(n).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        half_rot = torch.cat((-chunks[..., size // 2 :], chunks[..., : size // 2]), dim=-1)
        compressed = chunks * cos + half_rot * sin
    out = compressed @ M.T
    if mora_type in (1, 3):
        reps = -(-d_out // size)
        return torch.cat([out] * reps, dim=-1)[..., :d_out]
    if mora_type in (2, 4):
        m, long, short = _uneven(d_out, size)
        return torch.cat(
            [torch.repeat_interleave(out[..., :m], long, dim=-1), torch.repeat_interleave(out[..., m:], short, dim=-1)],
            dim=-1,
        )
    flat = out.reshape(*lead, -1)[..., :d_out]
    if flat.shape[-1] < d_out:
        reps = -(-d_out // flat.shape[-1])
        flat = torch.cat([flat] * reps, dim=-1)[..., :d_out]
    return flat


def authors_delta_weight(M: torch.Tensor, d_in: int, d_out: int, mora_type: int) -> torch.Tensor:
    size = M.shape[0]
    pad = size - d_in % size if d_in % size else 0
    reps = -(-d_out // size)
    if mora_type in (1, 4):
        w = torch.zeros(size, d_in, dtype=M.dtype)
        for i in range(d_in + pad):  # their per-feature loop
            w[:, i % d_in] += M[:, i % size]
    if mora_type in (2, 3):
        m, long, short = _uneven(d_in, size)
        w = torch.cat(
            [torch.repeat_interleave(M[:, :m], long, dim=1), torch.repeat_interleave(M[:, m:], short, dim=1)], dim=1
        )
    if mora_type in (1, 3):
        return torch.cat([w] * reps, dim=0)[:d_out]
    if mora_type in (2, 4):
        m, long, short = _uneven(d_out, size)
        return torch.cat(
            [torch.repeat_interleave(w[:m], long, dim=0), torch.repeat_interleave(w[m:], short, dim=0)], dim=0
        )
    n = -(-d_in // size)
    assert n >= 2, "their rope merge needs at least two chunks"
    w = torch.zeros(d_in + pad, d_in, dtype=M.dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, size, 2).float() / size))
    emb = torch.cat([torch.outer(torch.arange(n).float(), inv_freq)] * 2, dim=-1)
    cos, sin = emb.cos().to(M.dtype), emb.sin().to(M.dtype)
    swapped = torch.cat((M[:, size // 2 :], -M[:, : size // 2]), dim=-1)
    for i in range(n - 1):  # their per-chunk loop
        w[i * size : (i + 1) * size, i * size : (i + 1) * size] = swapped * sin[i] + M * cos[i]
    last = swapped * sin[n - 1] + M * cos[n - 1]
    i = n - 1
    w[i * size :, i * size :] = last[:, : size - pad]
    if pad:
        w[i * size :, :pad] = last[:, size - pad :]
    if d_in < d_out:
        return torch.cat([w] * reps, dim=0)[:d_out]
    return w[:d_out]
