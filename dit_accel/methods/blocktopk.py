"""Plain mean-pooled block top-k: each query block keeps its highest-scoring key blocks, no compensation."""

from __future__ import annotations

import torch

from .. import kernels
from ..patterns.common import forced_blocks
from .base import Method, SiteCall, SparseResult
from .composed import ComposedMethod

__all__ = ["BlockTopK", "DenseMethod", "topk_block_mask"]


def topk_block_mask(call: SiteCall, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool block mask (B, H, n_q, n_k) keeping ``keep`` blocks per row (forced ones included) and dense rows."""
    cfg = call.config
    n = call.q.shape[2]
    forced, dense_rows = forced_blocks(
        n, cfg.block_m, cfg.block_n, call.layout, sink_blocks=cfg.sink_blocks, device=call.q.device
    )
    pooled_q = kernels.mean_pool(call.q, cfg.block_m)
    pooled_k = kernels.mean_pool(call.k, cfg.block_n, smooth=cfg.smooth_k)
    scores = torch.matmul(pooled_q, pooled_k.transpose(-1, -2))
    forced = forced.expand_as(scores)
    return kernels.topk_mask(scores, keep, forced=forced), dense_rows


def keep_count(sparsity: float, n_k: int) -> int:
    """Key blocks kept per query block for a target sparsity (at least one)."""
    return max(1, min(n_k, round((1.0 - sparsity) * n_k)))


def masked_density(mask: torch.Tensor, dense_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    density = mask.float().mean()
    video_rows = ~dense_rows
    video = mask[:, :, video_rows].float().mean() if bool(video_rows.any()) else None
    return density, video


def run_block_mask(call: SiteCall, mask: torch.Tensor, dense_rows: torch.Tensor) -> SparseResult:
    """Run the block-sparse kernel on a block mask and package the result."""
    cfg = call.config
    kv_indices, kv_counts = kernels.lut_from_mask(mask)
    out = kernels.block_sparse_attention(
        call.q,
        call.k,
        call.v,
        kv_indices,
        kv_counts,
        block_m=cfg.block_m,
        block_n=cfg.block_n,
        scale=call.scale,
        return_lse=False,
    )
    density, video = masked_density(mask, dense_rows)
    return SparseResult(out=out, density=density, video_density=video)


class DenseMethod(Method):
    """Full attention through dit_accel's machinery: every call is dense (reason ``method``), for A/B runs."""

    name = "dense"

    def dense_reason(self, call: SiteCall) -> str | None:
        return "method"


class BlockTopK(ComposedMethod):
    """Mean-pooled block top-k with smooth-K, per head; self, text and sink blocks always kept.

    The composed method with its default parts (pattern ``topk``, compensation ``none``), so every other part
    can still be mixed in through options.
    """

    name = "blocktopk"
