"""Blocks every pattern keeps (the diagonal (self) block, text rows and columns, sink blocks) and the blocks none
keeps: key blocks whose every key a key-padding mask removes (a padded prompt's tail)."""

from __future__ import annotations

import math

import torch

from .. import kernels
from ..layout import TokenLayout

__all__ = ["drop_padded_blocks", "drop_padded_blocks_lut", "forced_blocks", "self_blocks"]


def self_blocks(n: int, block_m: int, block_n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool (n_q, n_k): key blocks that overlap each query block's own tokens."""
    n_q, n_k = math.ceil(n / block_m), math.ceil(n / block_n)
    q_lo = torch.arange(n_q, device=device) * block_m
    q_hi = torch.clamp(q_lo + block_m, max=n)
    k_lo = torch.arange(n_k, device=device) * block_n
    k_hi = torch.clamp(k_lo + block_n, max=n)
    return (k_lo[None, :] < q_hi[:, None]) & (q_lo[:, None] < k_hi[None, :])


def forced_blocks(
    n: int,
    block_m: int,
    block_n: int,
    layout: TokenLayout | None,
    *,
    sink_blocks: int = 0,
    self_block: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks always attended and query blocks kept fully dense.

    Returns ``(forced, dense_rows)``: bool (n_q, n_k) with the self blocks (unless ``self_block`` is False, as in
    SLA's official selection), the key blocks holding text tokens and the first ``sink_blocks`` key blocks;
    bool (n_q,) marking query blocks that hold text tokens (text attends to everything, as joint attention needs).
    """
    forced = self_blocks(n, block_m, block_n, device)
    if not self_block:
        forced = torch.zeros_like(forced)
    n_q = forced.shape[0]
    dense_rows = torch.zeros(n_q, dtype=torch.bool, device=device)
    if sink_blocks:
        forced[:, :sink_blocks] = True
    if layout is not None and layout.text_tokens and layout.total_tokens == n:
        forced |= layout.block_has_text(block_n, device)[None, :]
        dense_rows |= layout.block_has_text(block_m, device)
    forced |= dense_rows[:, None]
    return forced, dense_rows


def drop_padded_blocks(mask: torch.Tensor, key_padding: torch.Tensor | None, block_n: int) -> torch.Tensor:
    """``mask`` (bool (B or 1, H or 1, n_q, n_k)) without the key blocks ``key_padding`` (bool (B, N), True = attend)
    masks completely, per batch: they would cost a block of work for nothing. The result is (B, H or 1, n_q, n_k);
    None leaves ``mask`` as it is. Partly masked blocks stay (the kernels mask their keys). No host sync."""
    if key_padding is None:
        return mask
    alive = kernels.key_blocks_alive(key_padding, block_n)  # (B, n_k)
    if mask.dim() != 4 or mask.shape[-1] != alive.shape[-1] or mask.shape[0] not in (1, alive.shape[0]):
        raise ValueError(
            f"mask must be (B or 1, H or 1, n_q, {alive.shape[-1]}) for key_padding {tuple(key_padding.shape)} and "
            f"block_n={block_n}; got {tuple(mask.shape)}"
        )
    return mask & alive[:, None, None, :]


def drop_padded_blocks_lut(
    kv_indices: torch.Tensor, kv_counts: torch.Tensor, key_padding: torch.Tensor | None, block_n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`drop_padded_blocks` for a LUT ``(kv_indices, kv_counts)`` (B, H, n_q, width): same width, ascending,
    counts only shrink. No host sync."""
    if key_padding is None:
        return kv_indices, kv_counts
    n_k = kernels.key_blocks_alive(key_padding, block_n).shape[-1]
    selected = kernels.reference.selected_block_mask(kv_indices, kv_counts, n_k)
    idx, counts = kernels.lut_from_mask(drop_padded_blocks(selected, key_padding, block_n))
    return idx[..., : kv_indices.shape[-1]].contiguous(), counts
