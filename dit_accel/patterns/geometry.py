"""Token geometry shared by the geometric patterns: tiles, video-only permutations, group-to-block overlaps.

A geometric pattern is decided between *groups* of tokens (3D tiles, VMoBA chunks). The kernel works on blocks of
consecutive tokens, so the tokens are permuted until each group is contiguous, and a group-level mask becomes a
block-level mask through the overlap of blocks with groups: exact when groups align with blocks, a superset
(never fewer keys) where a block straddles two groups.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..layout import TokenLayout, inverse_permutation, tile_grid, tile_permutation

__all__ = [
    "GroupGeometry",
    "auto_tile",
    "block_group_overlap",
    "coarsen",
    "group_geometry",
]

Grid = tuple[int, int, int]


def auto_tile(grid: Grid, volume: int) -> Grid:
    """The tile (frames, rows, cols) of ``volume`` tokens that wastes the fewest padded tokens on ``grid``.

    The cost is the padded fraction plus 0.02 per unit of the tile's max/min side ratio: a compact tile makes its
    mean key more representative and its window more local, which is worth a few percent of ragged tokens.
    """
    best: tuple[float, int, Grid] | None = None
    for tf in _divisors(volume):
        for th in _divisors(volume // tf):
            tw = volume // (tf * th)
            tile = (tf, th, tw)
            if any(t > g for t, g in zip(tile, grid)) and math.prod(grid) >= volume:
                continue
            padded = math.prod(math.ceil(g / t) * t for g, t in zip(grid, tile))
            waste = padded - math.prod(grid)
            key = (waste / math.prod(grid) + 0.02 * max(tile) / min(tile), tf, tile)
            if best is None or key < best:
                best = key
    if best is None:  # grid smaller than one tile: one tile covers it
        return tuple(max(1, g) for g in grid)  # type: ignore[return-value]
    return best[2]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class GroupGeometry:
    """A token order in which every group is contiguous, and which group each position holds.

    Attributes:
        perm: (N,) long, ``x_kernel = x[..., perm, :]``; None when the order is unchanged.
        inv: (N,) long inverse of ``perm`` (None with it).
        group_of: (N,) long group index of each position in kernel order; -1 at text tokens.
        n_groups: number of groups.
        group_coords: (n_groups, 3) long coordinates of each group on the group grid.
        group_grid: number of groups along (frames, rows, cols).
    """

    perm: torch.Tensor | None
    inv: torch.Tensor | None
    group_of: torch.Tensor
    n_groups: int
    group_coords: torch.Tensor
    group_grid: Grid


def group_geometry(layout: TokenLayout, tile: Grid, device: torch.device | str = "cpu") -> GroupGeometry:
    """Permute the video tokens tile by tile (text tokens stay where they are) and label each position."""
    grid = layout.grid
    video_perm = tile_permutation(grid, tile, device=device)
    nt = tile_grid(grid, tile)
    f, h, w = grid
    fi = torch.arange(f, device=device).view(f, 1, 1).expand(f, h, w)
    hi = torch.arange(h, device=device).view(1, h, 1).expand(f, h, w)
    wi = torch.arange(w, device=device).view(1, 1, w).expand(f, h, w)
    tile_id = (((fi // tile[0]) * nt[1] + hi // tile[1]) * nt[2] + wi // tile[2]).flatten()
    start = layout.video_start
    n = layout.total_tokens
    identity = bool(torch.equal(video_perm, torch.arange(video_perm.numel(), device=device)))
    perm = torch.arange(n, device=device)
    perm[start : start + layout.video_tokens] = video_perm + start
    group_of = torch.full((n,), -1, dtype=torch.long, device=device)
    group_of[start : start + layout.video_tokens] = tile_id[video_perm]
    n_groups = math.prod(nt)
    coords = torch.stack(torch.meshgrid(*(torch.arange(t, device=device) for t in nt), indexing="ij"), -1).view(-1, 3)
    if identity:
        return GroupGeometry(None, None, group_of, n_groups, coords, nt)  # type: ignore[arg-type]
    return GroupGeometry(perm, inverse_permutation(perm), group_of, n_groups, coords, nt)  # type: ignore[arg-type]


def block_group_overlap(group_of: torch.Tensor, block: int, n_groups: int) -> torch.Tensor:
    """Bool (ceil(N / block), n_groups): which groups have a token in each block (text positions ignored)."""
    n = group_of.numel()
    n_blocks = math.ceil(n / block)
    block_of = torch.arange(n, device=group_of.device) // block
    hits = torch.zeros(n_blocks, n_groups + 1, dtype=torch.bool, device=group_of.device)
    hits[block_of, torch.where(group_of >= 0, group_of, n_groups)] = True
    return hits[:, :n_groups]


def coarsen(group_mask: torch.Tensor, q_overlap: torch.Tensor, k_overlap: torch.Tensor) -> torch.Tensor:
    """Block mask (..., n_qb, n_kb) from a group mask (..., n_gq, n_gk): a block pair is on when any of their
    groups' pairs is on (so every token pair the group mask allows is computed)."""
    gm = group_mask.float()
    qo, ko = q_overlap.float(), k_overlap.float()
    return (qo @ gm @ ko.transpose(0, 1)) > 0


def window_extents(grid: Grid, density: float) -> Grid:
    """Window extents (frames, rows, cols) on ``grid`` covering about ``density`` of it, shaped like the grid.

    Among all extents, the one whose volume is closest to the target wins; ties go to the shape whose per-axis
    fractions are the most equal (the window keeps the grid's aspect). An extent of 1 along an axis of several
    tiles cuts the video into slabs that never see each other (on the toy model, a hard cut every 4 frames at
    (1, 3, 3) of 4 x 4 x 4 tiles), so when the target volume allows 2 tiles along every such axis, only extents
    that have them compete.
    """
    target = max(1.0, density * math.prod(grid))
    joined = math.prod(min(2, g) for g in grid) <= target
    best: tuple[float, float, Grid] | None = None
    for ext in itertools.product(*(range(1 if not joined or g == 1 else 2, g + 1) for g in grid)):
        fracs = [math.log(e / g) for e, g in zip(ext, grid)]
        key = (abs(math.prod(ext) - target), max(fracs) - min(fracs), ext)
        if best is None or key < best:
            best = key
    assert best is not None
    return best[2]  # type: ignore[return-value]
