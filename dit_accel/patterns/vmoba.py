"""VMoBA: key chunks partitioned 1D / 2D / 3D cycling with the layer, gated by q . mean(K chunk).

Differences forced by a block kernel (documented in docs/methods.md): the gate is taken per query *block* (the
mean of its queries' gates, i.e. the pooled query times the chunk's mean key) instead of per query token, and a
selected chunk switches on every key block it overlaps.
"""

from __future__ import annotations

import math

import torch

__all__ = ["chunk_means", "partition_of", "vmoba_chunk_shape", "vmoba_threshold", "vmoba_topk"]


def partition_of(site_index: int) -> int:
    """0 (1D temporal), 1 (2D spatial over all frames) or 2 (3D cubes): VMoBA cycles with ``layer % 3``."""
    return site_index % 3


def vmoba_chunk_shape(grid: tuple[int, int, int], partition: int, counts: tuple[int, ...]) -> tuple[int, int, int]:
    """Chunk shape (frames, rows, cols) for ``counts`` chunks along the partitioned axes (clamped to the grid)."""
    f, h, w = grid

    def size(extent: int, count: int) -> int:
        return math.ceil(extent / max(1, min(count, extent)))

    if partition == 0:
        return (size(f, counts[0]), h, w)
    if partition == 1:
        return (f, size(h, counts[0]), size(w, counts[1]))
    return (size(f, counts[0]), size(h, counts[1]), size(w, counts[2]))


def chunk_means(
    k: torch.Tensor, group_of: torch.Tensor, n_chunks: int, key_padding: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 (B, H, n_chunks, D): the mean key of each chunk (``group_of`` labels kernel-order positions); with
    ``key_padding`` (bool (B, N) in kernel order) over the kept keys only (0 for a chunk with none)."""
    b, h, n, d = k.shape
    valid = group_of >= 0
    idx = group_of[valid]
    sums = torch.zeros(b, h, n_chunks, d, device=k.device, dtype=torch.float32)
    if key_padding is None:
        sums.index_add_(2, idx, k[:, :, valid].float())
        counts = torch.bincount(idx, minlength=n_chunks).clamp(min=1).to(torch.float32)
        return sums / counts[:, None]
    weight = key_padding[:, valid].float()  # (B, N_video)
    sums.index_add_(2, idx, k[:, :, valid].float() * weight[:, None, :, None])
    counts = torch.zeros(b, n_chunks, device=k.device, dtype=torch.float32).index_add_(1, idx, weight)
    return sums / counts.clamp(min=1.0)[:, None, :, None]


def vmoba_topk(gate: torch.Tensor, self_chunks: torch.Tensor, k: int) -> torch.Tensor:
    """Local + top-k (the training-free mode): the self chunks rank first, ``k`` chunks per row in all."""
    n_c = gate.shape[-1]
    k = max(1, min(int(k), n_c))
    ranked = gate.float().masked_fill(self_chunks, float("inf"))
    mask = torch.zeros(gate.shape, dtype=torch.bool, device=gate.device)
    mask.scatter_(-1, torch.topk(ranked, k, dim=-1).indices, True)
    return mask | self_chunks


def vmoba_threshold(gate: torch.Tensor, self_chunks: torch.Tensor, tau: float) -> torch.Tensor:
    """Global per-head selection (VMoBA's ``head_global``): min-max normalise the head's gates over all
    (query, chunk) pairs, count the self pairs first, then add the highest other pairs in descending order
    until the cumulative normalised sum reaches ``tau`` of the head's total (the smallest such prefix)."""
    b, h, n_q, n_c = gate.shape
    g = gate.float().reshape(b, h, -1)
    lo = g.amin(-1, keepdim=True)
    hi = g.amax(-1, keepdim=True)
    norm = (g - lo) / torch.clamp(hi - lo, min=torch.finfo(torch.float32).tiny)
    selfs = self_chunks.expand(b, h, n_q, n_c).reshape(b, h, -1)
    total = norm.sum(-1, keepdim=True)
    remain = tau * total - (norm * selfs).sum(-1, keepdim=True)
    others = norm.masked_fill(selfs, -1.0)  # self pairs sort last and are never counted again
    ranked, order = torch.sort(others, dim=-1, descending=True, stable=True)
    ranked = ranked.clamp(min=0.0)
    before = torch.cumsum(ranked, dim=-1) - ranked
    take = (before < remain) & (torch.gather(selfs, -1, order) == 0)
    mask = torch.zeros_like(selfs)
    mask.scatter_(-1, order, take)
    return mask.view(b, h, n_q, n_c) | self_chunks
