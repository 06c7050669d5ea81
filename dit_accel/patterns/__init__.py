"""Block patterns: which key blocks each query block attends to.

:func:`plan_for` fixes the token order a pattern needs (3D tiles, VMoBA chunks, or the native order) from the
geometry alone; :func:`build_pattern` decides the block mask for one call in that order. Every pattern keeps the
self blocks, the text rows and columns of joint attention and the sink blocks (:func:`forced_blocks`), except the
key blocks a key-padding mask removes completely (:func:`drop_padded_blocks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import kernels
from ..config import AccelConfig
from ..layout import TokenLayout
from .common import drop_padded_blocks, drop_padded_blocks_lut, forced_blocks, self_blocks
from .geometry import GroupGeometry, auto_tile, block_group_overlap, coarsen, group_geometry, window_extents
from .scored import head_threshold_mask, keep_count, negligible_mask, pooled_scores
from .vmoba import (
    chunk_means,
    partition_of,
    token_threshold,
    token_topk,
    vmoba_geometry,
    vmoba_keep,
    vmoba_threshold,
    vmoba_topk,
)
from .window import raster_block_mask, window_group_mask

__all__ = [
    "GEOMETRIC_PATTERNS",
    "Pattern",
    "Plan",
    "build_pattern",
    "drop_padded_blocks",
    "drop_padded_blocks_lut",
    "forced_blocks",
    "plan_for",
    "self_blocks",
]

GEOMETRIC_PATTERNS = ("window", "inward", "raster", "vmoba")
STATIC_PATTERNS = ("window", "inward", "raster")


@dataclass(frozen=True)
class Plan:
    """Geometry of one site for one sequence shape: the kernel token order and the groups in it.

    Attributes:
        n: sequence length.
        perm / inv: kernel order (``x[..., perm, :]``) and its inverse; None when the native order is used.
        groups: tiles or chunks in kernel order (None for the non-geometric orders).
        forced / dense_rows: :func:`forced_blocks` in kernel order.
        partition: VMoBA partition (0, 1, 2) of this site, else -1.
        has_video_rows: whether any query block holds no text (computed once per plan, so no per-call sync).
        max_forced: the most forced key blocks in one query row (read once here, like has_video_rows).
        video_index: VMoBA: (S,) long kernel-order positions of the video tokens (the gated queries), else None.
        key_groups: VMoBA: int32 (N,) the chunk of each key in kernel order for the kernels' token gating, -1 at
            keys every query sees (text, sink blocks), else None.
    """

    n: int
    perm: torch.Tensor | None
    inv: torch.Tensor | None
    groups: GroupGeometry | None
    forced: torch.Tensor
    dense_rows: torch.Tensor
    partition: int = -1
    has_video_rows: bool = True  # some query block holds no text (read once here, not per call)
    max_forced: int = 0
    video_index: torch.Tensor | None = None
    key_groups: torch.Tensor | None = None


@dataclass
class Pattern:
    """A block mask in kernel order plus what compensation needs about it."""

    mask: torch.Tensor  # bool (B or 1, H or 1, n_q, n_k)
    negligible: torch.Tensor | None = None  # bool like mask, SLA's skipped blocks
    static: bool = False  # depends on geometry only: valid for the whole generation
    max_count: int | None = None  # an upper bound on the blocks of any row, known on the host (top-k), else None
    key_groups: torch.Tensor | None = None  # token-gated VMoBA: int32 (N,) chunk of each key (-1: seen by all)
    query_groups: torch.Tensor | None = None  # token-gated VMoBA: int64 (B, H, N, words) chunks each query sees


def _tile_for(config: AccelConfig, layout: TokenLayout) -> tuple[int, int, int]:
    if config.tile is not None:
        return config.tile
    return auto_tile(layout.grid, min(config.block_m, config.block_n))


def plan_for(config: AccelConfig, layout: TokenLayout | None, n: int, site_index: int, device: torch.device) -> Plan:
    """The token order and groups a site's pattern works in (pure geometry, cacheable per shape)."""
    pattern = config.pattern.kind
    geo_layout = layout if layout is not None and layout.total_tokens == n else None
    groups = None
    partition = -1
    if geo_layout is not None and pattern == "vmoba":
        partition = partition_of(site_index)
        sizes = config.vmoba_chunk_size[partition] if config.vmoba_chunk_size is not None else None
        groups = vmoba_geometry(geo_layout, partition, config.vmoba_chunks[partition], sizes, device)
    elif geo_layout is not None and (pattern in ("window", "inward") or (config.tiled and pattern != "raster")):
        groups = group_geometry(geo_layout, _tile_for(config, geo_layout), device)
    # forced blocks: the text tokens stay in place under every permutation, so the native layout holds
    forced, dense_rows = forced_blocks(
        n, config.block_m, config.block_n, geo_layout, sink_blocks=config.sink_blocks,
        self_block=config.self_block, device=device,
    )  # fmt: skip
    perm = groups.perm if groups is not None else None
    inv = groups.inv if groups is not None else None
    if groups is not None and perm is None:
        groups = GroupGeometry(None, None, groups.group_of, groups.n_groups, groups.group_coords, groups.group_grid)
    max_forced = int(forced.sum(-1).max()) if forced.numel() else 0
    video_index = key_groups = None
    if groups is not None and pattern == "vmoba" and geo_layout is not None:
        start = geo_layout.video_start  # text stays in place: the video tokens keep their range
        video_index = torch.arange(start, start + geo_layout.video_tokens, device=device)
        key_groups = groups.group_of.to(torch.int32)
        key_groups[: config.sink_blocks * config.block_n] = -1  # sink keys: seen by every query, like text
    return Plan(
        n, perm, inv, groups, forced, dense_rows, partition, bool((~dense_rows).any()), max_forced, video_index,
        key_groups,
    )  # fmt: skip


def build_pattern(
    config: AccelConfig,
    plan: Plan,
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout | None,
    scale: float | None,
    key_padding: torch.Tensor | None = None,
) -> Pattern:
    """The block mask of ``config.pattern.kind`` for q, k given in the plan's kernel order.

    ``key_padding`` (bool (B, N) in the same kernel order, True = attend): pooled scores and VMoBA's chunk means
    ignore masked keys, and key blocks with no kept key leave the pattern (forced ones too), per batch."""
    pattern = config.pattern.kind
    n_k = math.ceil(plan.n / config.block_n)
    forced = plan.forced
    bn = config.block_n
    if pattern in ("topk", "threshold"):
        scores = pooled_scores(q, k, config.block_m, bn, config.smooth_k, scale, key_padding)
        forced_b = drop_padded_blocks(forced.expand_as(scores), key_padding, bn)  # dead ones take no top-k slot
        max_count = None
        if pattern == "topk":
            keep = keep_count(config.sparsity, n_k, config.keep_rounding)
            mask = kernels.topk_mask(scores, keep, forced=forced_b)
            max_count = min(n_k, max(keep, plan.max_forced))  # forced blocks count first; all kept past k
        elif config.threshold_scope == "row":
            mask = kernels.threshold_mask(scores, config.tau, forced=forced_b)
        else:
            mask = head_threshold_mask(scores, config.tau, forced=forced_b)
        mask = drop_padded_blocks(mask, key_padding, bn)
        negligible = None
        if config.negligible > 0:  # never spend the negligible budget on dead blocks (they cost nothing anyway)
            taken = mask
            if key_padding is not None:
                taken = mask | ~kernels.key_blocks_alive(key_padding, bn)[:, None, None, :]
            negligible = negligible_mask(scores, taken, config.negligible)
        return Pattern(mask, negligible, max_count=max_count)
    if layout is None or plan.groups is None and pattern != "raster":
        raise ValueError(f"pattern={pattern!r} needs the token layout (grid) of the sequence")
    if pattern == "raster":
        fraction = config.raster_fraction if config.raster_fraction is not None else 1.0 - config.sparsity
        mask = raster_block_mask(layout, config.block_m, config.block_n, fraction).to(q.device)
        return Pattern(drop_padded_blocks((mask | forced)[None, None], key_padding, bn), static=True)
    groups = plan.groups
    assert groups is not None
    q_over = block_group_overlap(groups.group_of, config.block_m, groups.n_groups)
    k_over = block_group_overlap(groups.group_of, config.block_n, groups.n_groups)
    if pattern in ("window", "inward"):
        extents = config.window or window_extents(groups.group_grid, 1.0 - config.sparsity)
        gm = window_group_mask(groups.group_coords, groups.group_grid, extents, inward=pattern == "inward")
        mask = coarsen(gm, q_over, k_over) | forced
        return Pattern(drop_padded_blocks(mask[None, None], key_padding, bn), static=True)
    if config.vmoba_gate == "token":
        return _vmoba_token_pattern(config, plan, q, k, q_over, k_over, key_padding)
    # vmoba, gated per query block
    pq = kernels.mean_pool(q, config.block_m)  # (B, H, n_q, D): the gate of a block is the mean of its queries'
    gate = torch.matmul(
        pq, chunk_means(k, groups.group_of, groups.n_groups, key_padding).to(pq.dtype).transpose(-1, -2)
    )
    self_chunks = q_over[None, None].expand_as(gate)
    if config.vmoba_select == "topk":
        if config.vmoba_topk is not None:
            keep = config.vmoba_topk[plan.partition]
        else:
            keep = keep_count(config.sparsity, groups.n_groups)
        chunks = vmoba_topk(gate, self_chunks, keep)
    else:
        chunks = vmoba_threshold(gate, self_chunks, config.tau)
    mask = (chunks.float() @ k_over.float().T) > 0
    return Pattern(drop_padded_blocks(mask | forced, key_padding, bn))


def _vmoba_token_pattern(
    config: AccelConfig,
    plan: Plan,
    q: torch.Tensor,
    k: torch.Tensor,
    q_over: torch.Tensor,
    k_over: torch.Tensor,
    key_padding: torch.Tensor | None,
) -> Pattern:
    """The official VMoBA selection, per query token (see :mod:`.vmoba`): the chunks each video token chooses,
    as the kernels' bit words, and the key blocks the chosen chunks of a query block touch."""
    groups, video = plan.groups, plan.video_index
    assert groups is not None and video is not None and plan.key_groups is not None
    b, h, n, _ = q.shape
    n_c = groups.n_groups
    means, counts = chunk_means(k, groups.group_of, n_c, key_padding, with_counts=True)
    valid = counts > 0  # (B or 1, C): a chunk with no kept key is never chosen (the official batch-boundary rule)
    own_chunk = groups.group_of.index_select(0, video)
    own = torch.nn.functional.one_hot(own_chunk, n_c).bool()  # (S, C)
    gate = torch.matmul(q.index_select(2, video).to(means.dtype), means.transpose(-1, -2))  # (B, H, S, C), no scale
    if config.vmoba_select == "topk":
        chosen = token_topk(gate, own, valid, vmoba_keep(config.vmoba_topk, config.sparsity, plan.partition, n_c))
    else:
        chosen = token_threshold(gate, own, valid, config.tau, config.vmoba_scope)
    # the official code runs dense when no query chose a chunk besides its own (per sample here): all chunks on
    # the device, no sync (the one-chunk and top-1 cases are caught before, as the dense reason "vmoba_local")
    alone = ~(chosen & ~own).flatten(1).any(-1)  # (B,)
    chosen = chosen | alone[:, None, None, None]
    select = torch.ones(b, h, n, n_c, dtype=torch.bool, device=q.device)  # text rows see every chunk
    select = select.index_copy(2, video, chosen)
    n_q = q_over.shape[0]
    rows = torch.nn.functional.pad(select, (0, 0, 0, n_q * config.block_m - n)).view(b, h, n_q, config.block_m, n_c)
    mask = (rows.any(3).float() @ k_over.float().T) > 0  # key blocks touched by a chunk one of the block's tokens chose
    mask = drop_padded_blocks(mask | plan.forced, key_padding, config.block_n)
    return Pattern(mask, key_groups=plan.key_groups, query_groups=kernels.pack_groups(select))
