"""Blocks every pattern keeps: the diagonal (self) block, text rows and columns, and sink blocks."""

from __future__ import annotations

import math

import torch

from ..layout import TokenLayout

__all__ = ["forced_blocks", "self_blocks"]


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
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks always attended and query blocks kept fully dense.

    Returns ``(forced, dense_rows)``: bool (n_q, n_k) with the self blocks, the key blocks holding text tokens and
    the first ``sink_blocks`` key blocks; bool (n_q,) marking query blocks that hold text tokens (text attends to
    everything, as joint attention needs).
    """
    forced = self_blocks(n, block_m, block_n, device)
    n_q = forced.shape[0]
    dense_rows = torch.zeros(n_q, dtype=torch.bool, device=device)
    if sink_blocks:
        forced[:, :sink_blocks] = True
    if layout is not None and layout.text_tokens and layout.total_tokens == n:
        forced |= layout.block_has_text(block_n, device)[None, :]
        dense_rows |= layout.block_has_text(block_m, device)
    forced |= dense_rows[:, None]
    return forced, dense_rows
