"""Exact PyTorch references for every kernel in :mod:`dit_accel.kernels`.

They are the oracle the Triton kernels are tested against and the CPU path. They never build an N x N tensor:
block-sparse attention gathers the selected key blocks for a chunk of query blocks at a time, so its cost
follows the density like the real kernel's.

Conventions (shared with the Triton kernels):

* q, k, v are (B, H, N, D); ``kv_indices`` int32 (B, H, ceil(N / block_m), max_blocks), ascending, valid
  entries first; ``kv_counts`` int32 (B, H, ceil(N / block_m)).
* ``lse`` is float32 (B, H, N) in natural log.
* A query block whose count is 0 attends to nothing: its output is 0 and its ``lse`` is ``-inf``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["block_sparse_attention", "dense_attention"]

_GATHER_BUDGET = 1 << 24  # elements of gathered keys per chunk (about 64 MB in fp32)


def _check_block_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k, v must be (B, H, N, D) with equal shapes; got q={tuple(q.shape)}, k={tuple(k.shape)}, "
            f"v={tuple(v.shape)}"
        )
    b, h, n, _ = q.shape
    n_qb = math.ceil(n / block_m)
    if kv_indices.dim() != 4 or tuple(kv_indices.shape[:3]) != (b, h, n_qb):
        raise ValueError(
            f"kv_indices must be (B, H, ceil(N/block_m), max_blocks) = ({b}, {h}, {n_qb}, *); "
            f"got {tuple(kv_indices.shape)}"
        )
    if tuple(kv_counts.shape) != (b, h, n_qb):
        raise ValueError(f"kv_counts must be (B, H, ceil(N/block_m)) = ({b}, {h}, {n_qb}); got {tuple(kv_counts.shape)}")


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None):
    """Full attention and its natural-log LSE, a chunk of query rows at a time (never N x N at once)."""
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    kf, vf = k.float(), v.float()
    rows = max(1, _GATHER_BUDGET // max(1, b * h * k.shape[2]))
    outs, lses = [], []
    for start in range(0, n, rows):
        scores = torch.matmul(q[:, :, start : start + rows].float(), kf.transpose(-1, -2)) * scale
        row_lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.matmul(torch.exp(scores - row_lse[..., None]), vf))
        lses.append(row_lse)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    scale: float | None = None,
    return_lse: bool = True,
):
    """Attention of each query block to its listed key blocks only, exact, in float32 internally."""
    _check_block_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n)
    b, h, n, d = q.shape
    dv = v.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    n_qb = math.ceil(n / block_m)
    n_kb = math.ceil(n / block_n)
    max_blocks = kv_indices.shape[-1]

    pad_k = n_kb * block_n - n
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, pad_k)).view(b, h, n_kb, block_n, d)
    vf = torch.nn.functional.pad(v.float(), (0, 0, 0, pad_k)).view(b, h, n_kb, block_n, dv)
    pad_q = n_qb * block_m - n
    qf = torch.nn.functional.pad(q.float(), (0, 0, 0, pad_q)).view(b, h, n_qb, block_m, d)
    key_valid = (torch.arange(n_kb * block_n, device=q.device) < n).view(n_kb, block_n)

    out = torch.zeros(b, h, n_qb, block_m, dv, device=q.device, dtype=torch.float32)
    lse = torch.full((b, h, n_qb, block_m), float("-inf"), device=q.device, dtype=torch.float32)
    if max_blocks == 0:
        out = out.view(b, h, -1, dv)[:, :, :n].to(q.dtype)
        return (out, lse.view(b, h, -1)[:, :, :n]) if return_lse else out

    slot = torch.arange(max_blocks, device=q.device)
    rows_per_chunk = max(1, _GATHER_BUDGET // max(1, b * h * max_blocks * block_n * max(d, dv)))
    for start in range(0, n_qb, rows_per_chunk):
        stop = min(n_qb, start + rows_per_chunk)
        idx = kv_indices[:, :, start:stop].long().clamp(0, n_kb - 1)  # (B, H, R, M)
        used = slot < kv_counts[:, :, start:stop, None]  # (B, H, R, M)
        flat = idx.flatten(2)  # (B, H, R*M)
        kg = torch.gather(kf, 2, flat[..., None, None].expand(-1, -1, -1, block_n, d))
        vg = torch.gather(vf, 2, flat[..., None, None].expand(-1, -1, -1, block_n, dv))
        rows = stop - start
        kg = kg.view(b, h, rows, max_blocks * block_n, d)
        vg = vg.view(b, h, rows, max_blocks * block_n, dv)
        valid = used[..., None] & key_valid[idx]  # (B, H, R, M, block_n)
        valid = valid.view(b, h, rows, 1, max_blocks * block_n)
        scores = torch.matmul(qf[:, :, start:stop], kg.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~valid, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # (B, H, R, block_m)
        finite = torch.isfinite(row_lse)
        probs = torch.exp(scores - torch.where(finite, row_lse, torch.zeros_like(row_lse))[..., None])
        probs = torch.where(finite[..., None], probs, torch.zeros_like(probs))
        out[:, :, start:stop] = torch.matmul(probs, vg)
        lse[:, :, start:stop] = row_lse

    out = out.view(b, h, n_qb * block_m, dv)[:, :, :n].to(q.dtype)
    lse = lse.view(b, h, n_qb * block_m)[:, :, :n]
    return (out, lse) if return_lse else out


def mean_pool(x: torch.Tensor, block: int, *, smooth: bool = False) -> torch.Tensor:
    """Mean of each block of ``block`` tokens of (B, H, N, D), float32 (B, H, ceil(N/block), D).

    The ragged last block is averaged over its real tokens. ``smooth`` subtracts the mean over all tokens first
    (SageAttention's smooth-K), which leaves a row-wise top-k unchanged but conditions pooled scores better.
    """
    b, h, n, d = x.shape
    xf = x.float()
    if smooth:
        xf = xf - xf.mean(dim=2, keepdim=True)
    n_blocks = math.ceil(n / block)
    pad = n_blocks * block - n
    sums = torch.nn.functional.pad(xf, (0, 0, 0, pad)).view(b, h, n_blocks, block, d).sum(dim=3)
    counts = torch.full((n_blocks,), float(block), device=x.device)
    counts[-1] = n - (n_blocks - 1) * block
    return sums / counts[:, None]


def lut_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A boolean block mask (B, H, n_q, n_k) as a LUT: ascending ``kv_indices`` (width n_k) and ``kv_counts``.

    No host synchronisation: the LUT is as wide as the mask; entries past the count are padding.
    """
    n_k = mask.shape[-1]
    cols = torch.arange(n_k, device=mask.device, dtype=torch.int32)
    keyed = torch.where(mask, cols, cols + n_k)  # selected columns first, in ascending order
    order = torch.sort(keyed, dim=-1).values
    kv_indices = torch.where(order < n_k, order, order - n_k).to(torch.int32)
    kv_counts = mask.sum(dim=-1, dtype=torch.int32)
    return kv_indices.contiguous(), kv_counts


def topk_mask(scores: torch.Tensor, k: int, *, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B, H, n_q, n_k): the ``forced`` blocks plus the highest-scoring others, ``k`` per row in all.

    Rows keep at least their forced blocks even where those exceed ``k``.
    """
    n_k = scores.shape[-1]
    k = max(0, min(int(k), n_k))
    ranked = scores.float()
    if forced is not None:
        ranked = ranked.masked_fill(forced, float("inf"))
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        mask.scatter_(-1, torch.topk(ranked, k, dim=-1).indices, True)
    if forced is not None:
        mask |= forced
    return mask
