"""Fast CPU attention kernels, exact like :mod:`dit_accel.kernels.reference` (same contracts, float32 LSE).

The references are the oracle: they gather with ``torch.gather`` and take softmax in plain float32 ops, which on a
CPU costs about as much as dense SDPA at 10 % block density and several times more for a refresh step. Here the
same math runs through PyTorch's fused CPU flash-attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu``,
which also returns the LSE): dense attention with its LSE directly, and block-sparse attention as one flash call
over the query blocks, each against its own selected key blocks gathered with ``index_select``. Work that this path
does not cover (per-slot masses, token-level groups, a value head size unlike the key's, autograd) goes to the
reference, so every call is exact either way.
"""

from __future__ import annotations

import math

import torch

from . import reference

__all__ = ["block_sparse_attention", "block_sparse_attention_pair", "dense_attention"]

_GATHER_BUDGET = 1 << 24  # gathered key elements per chunk of query blocks (about 64 MB in float32)
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the fused kernel applies: CPU tensors of one float dtype and head size, no autograd."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and k.dtype == q.dtype == v.dtype
        and v.shape[-1] == q.shape[-1]
        and not grad
    )


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean keep-mask as the additive float mask the fused kernel takes (0 kept, -inf dropped)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
):
    """Full attention and its LSE (see :func:`dit_accel.kernels.reference.dense_attention`)."""
    if not _fast(q, k, v):
        return reference.dense_attention(q, k, v, scale=scale, key_padding=key_padding)
    b, _, n, d = q.shape
    key_padding = reference.check_key_padding(key_padding, b, k.shape[2], q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    mask = None if key_padding is None else _additive(key_padding[:, None, None, :], q.dtype)
    out, lse = _flash(q, k, v, attn_mask=mask, scale=scale)[:2]
    if key_padding is not None:  # a row with no key left: SDPA's 0 output, and lse -inf (the kernel says 0)
        empty = ~key_padding.any(-1)
        if bool(empty.any()):
            out = out.masked_fill(empty[:, None, None, None], 0.0)
            lse = lse.masked_fill(empty[:, None, None], float("-inf"))
    return out, lse.float()


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
    return_mass: bool = False,
    key_padding: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
    rho: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    rho_add: float = 0.0,
    rho_clamp: bool = False,
):
    """Block-sparse attention (see :func:`dit_accel.kernels.reference.block_sparse_attention`): each query block
    attends to its gathered key blocks in one fused flash call over all query blocks."""
    if return_mass or key_groups is not None or query_groups is not None or not _fast(q, k, v):
        return reference.block_sparse_attention(
            q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n, scale=scale, return_lse=return_lse,
            return_mass=return_mass, key_padding=key_padding, key_groups=key_groups, query_groups=query_groups,
            rho=rho, residual=residual, rho_add=rho_add, rho_clamp=rho_clamp,
        )  # fmt: skip
    if reference.check_reshape(rho, residual, q.shape[0], q.shape[1], q.shape[2], v.shape[-1], q.device) is not None:
        out, lse = block_sparse_attention(
            q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n, scale=scale, key_padding=key_padding
        )
        out = reference.apply_reshape(out, rho, residual, rho_add, rho_clamp).to(q.dtype)
        return (out, lse) if return_lse else out
    reference._check_block_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n)
    b, h, n, d = q.shape
    key_padding = reference.check_key_padding(key_padding, b, n, q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    n_qb, n_kb = math.ceil(n / block_m), math.ceil(n / block_n)
    # the used part of the LUT only (one host sync, as in the reference): the cost follows the density
    width = int(kv_counts.max().item()) if kv_counts.numel() else 0
    width = min(width, kv_indices.shape[-1])
    out = q.new_zeros(b, h, n_qb * block_m, d)
    lse = torch.full((b, h, n_qb * block_m), float("-inf"), device=q.device)
    if width == 0:
        return (out[:, :, :n], lse[:, :, :n]) if return_lse else out[:, :, :n]

    pad_q, pad_k = n_qb * block_m - n, n_kb * block_n - n
    qb = torch.nn.functional.pad(q, (0, 0, 0, pad_q)).reshape(b * h, n_qb, block_m, d)
    kb = torch.nn.functional.pad(k, (0, 0, 0, pad_k)).reshape(b * h * n_kb, block_n, d)
    vb = torch.nn.functional.pad(v, (0, 0, 0, pad_k)).reshape(b * h * n_kb, block_n, d)
    idx = kv_indices[..., :width].long().clamp(0, n_kb - 1).reshape(b * h, n_qb, width)
    used = torch.arange(width, device=q.device) < kv_counts.reshape(b * h, n_qb, 1)  # (BH, n_qb, width)
    # keys that take part: a used slot, a real (not padding) position, kept by key_padding
    real = (torch.arange(n_kb * block_n, device=q.device) < n).view(n_kb, block_n)
    alive = real.expand(b, n_kb, block_n)
    if key_padding is not None:
        alive = alive & torch.nn.functional.pad(key_padding, (0, pad_k)).view(b, n_kb, block_n)
    alive = alive.repeat_interleave(h, dim=0)  # (BH, n_kb, block_n)
    rows = torch.arange(b * h, device=q.device)[:, None, None]
    keep = used[..., None] & alive[rows, idx]  # (BH, n_qb, width, block_n)
    masked = not bool(keep.all())
    offset = (torch.arange(b * h, device=q.device) * n_kb).view(-1, 1, 1)
    flat = idx + offset  # rows of kb / vb

    out, lse = out.view(b * h, n_qb, block_m, d), lse.view(b * h, n_qb, block_m)
    chunk = max(1, _GATHER_BUDGET // max(1, b * h * width * block_n * d))
    for start in range(0, n_qb, chunk):
        stop = min(n_qb, start + chunk)
        sel = flat[:, start:stop].reshape(-1)
        kg = kb.index_select(0, sel).view(b * h, stop - start, width * block_n, d)
        vg = vb.index_select(0, sel).view(b * h, stop - start, width * block_n, d)
        mask = None
        if masked:
            mask = _additive(keep[:, start:stop].reshape(b * h, stop - start, 1, width * block_n), q.dtype)
        o, l = _flash(qb[:, start:stop], kg, vg, attn_mask=mask, scale=scale)[:2]
        if masked:  # query blocks with no key: output 0 and lse -inf, as the reference
            empty = ~keep[:, start:stop].flatten(2).any(-1)  # (BH, R)
            o = o.masked_fill(empty[..., None, None], 0.0)
            l = l.masked_fill(empty[..., None], float("-inf"))
        out[:, start:stop] = o
        lse[:, start:stop] = l
    out = out.view(b, h, -1, d)[:, :, :n]
    lse = lse.view(b, h, -1)[:, :, :n]
    return (out, lse) if return_lse else out


def block_sparse_attention_pair(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o_sparse, lse_sparse, o_full, lse_full)`` (see the reference's pair)."""
    o_sparse, lse_sparse = block_sparse_attention(
        q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n, scale=scale, key_padding=key_padding,
        key_groups=key_groups, query_groups=query_groups,
    )  # fmt: skip
    o_full, lse_full = dense_attention(q, k, v, scale=scale, key_padding=key_padding)
    return o_sparse, lse_sparse, o_full, lse_full
