"""Content-adaptive patterns on pooled block scores: SLA's top-k (+ negligible blocks) and the cumulative threshold."""

from __future__ import annotations

import math

import torch

from .. import kernels

__all__ = ["head_threshold_mask", "keep_count", "negligible_mask", "pooled_scores"]


def keep_count(sparsity: float, n_k: int, rounding: str = "half_up") -> int:
    """Key blocks kept per query block for a target sparsity: ``(1 - sparsity) n_k`` rounded half up (2.5 -> 3,
    not Python's round-half-to-even), or down with ``rounding="floor"`` (SLA's official ``int(topk * K)``); at
    least one and at most ``n_k``.

    The small epsilon absorbs binary error (``(1 - 0.85) * 10`` is 1.4999999999999996, meant as 1.5;
    ``(1 - 0.9) * 10`` is 0.9999999999999998, meant as 1)."""
    if rounding not in ("half_up", "floor"):
        raise ValueError(f"rounding={rounding!r} is not allowed; choose 'half_up' or 'floor'")
    half = 0.5 if rounding == "half_up" else 0.0
    return max(1, min(n_k, math.floor((1.0 - sparsity) * n_k + half + 1e-9)))


def pooled_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    block_m: int,
    block_n: int,
    smooth_k: bool,
    scale: float | None,
    key_padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 (B, H, n_q, n_k): mean-pooled Q times mean-pooled (smoothed) K, times the softmax scale.

    The scale does not change a top-k but makes the scores logits, so a softmax over them is a mass estimate.
    With ``key_padding`` (bool (B, N), True = attend) the key means (and smooth-K's mean) cover kept keys only, and
    a fully masked key block scores ``-inf``: it never wins a top-k slot nor takes softmax mass.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    pq = kernels.mean_pool(q, block_m)
    pk = kernels.mean_pool(k, block_n, smooth=smooth_k, key_padding=key_padding)
    scores = torch.matmul(pq, pk.transpose(-1, -2)) * scale
    if key_padding is not None:
        dead = ~kernels.key_blocks_alive(key_padding, block_n)[:, None, None, :]
        scores = scores.masked_fill(dead, float("-inf"))
    return scores


def negligible_mask(scores: torch.Tensor, selected: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool like ``scores``: the lowest ``floor(fraction * n_k)`` blocks of each row among the unselected ones
    (SLA's k_l): skipped by both branches."""
    n_k = scores.shape[-1]
    count = int(math.floor(fraction * n_k))
    out = torch.zeros_like(selected)
    if count <= 0:
        return out
    ranked = scores.float().masked_fill(selected, float("inf"))
    count = min(count, n_k)
    lowest = torch.topk(ranked, count, dim=-1, largest=False).indices
    out.scatter_(-1, lowest, True)
    return out & ~selected


def head_threshold_mask(scores: torch.Tensor, tau: float, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Bool like ``scores``: per (batch, head) the fewest (query block, key block) pairs, highest mass first, whose
    mass reaches ``tau`` of the head's total, where a pair's mass is its row softmax divided by the row count.

    One budget per head: rows with a concentrated distribution give blocks to rows that need more.
    """
    b, h, n_q, n_k = scores.shape
    mass = torch.softmax(scores.float(), dim=-1).reshape(b, h, n_q * n_k) / n_q
    ranked, order = torch.sort(mass, dim=-1, descending=True, stable=True)
    before = torch.cumsum(ranked, dim=-1) - ranked
    mask = torch.zeros_like(mass, dtype=torch.bool)
    mask.scatter_(-1, order, before < tau)
    mask = mask.view(b, h, n_q, n_k)
    if forced is not None:
        mask = mask | forced
    return mask
