"""Static windows: the 3D window on tiles (clipped or shifted inward, FreeSwim) and Re-ttention's 1D raster band.

Both depend on geometry only, so a site builds them once per generation and reuses them at every step.
"""

from __future__ import annotations

import math

import torch

from ..layout import TokenLayout

__all__ = ["axis_window", "raster_block_mask", "window_group_mask"]


def axis_window(center: torch.Tensor, extent: int, size: int, inward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive [lo, hi] of a window of ``extent`` positions around ``center`` on an axis of ``size``.

    ``inward`` shifts the window inside at the borders so it always holds ``min(extent, size)`` positions
    (FreeSwim's d_u/d_b shift for odd extents); otherwise it is clipped there.
    """
    before = (extent - 1) // 2
    if inward:
        lo = torch.clamp(center - before, min=0, max=max(0, size - extent))
        hi = torch.clamp(lo + extent - 1, max=size - 1)
    else:
        lo = torch.clamp(center - before, min=0)
        hi = torch.clamp(center + (extent - 1 - before), max=size - 1)
    return lo, hi


def window_group_mask(
    coords: torch.Tensor, group_grid: tuple[int, int, int], extents: tuple[int, int, int], inward: bool
) -> torch.Tensor:
    """Bool (n_groups, n_groups): key tile j lies in the window of query tile i on every axis."""
    allowed = torch.ones(coords.shape[0], coords.shape[0], dtype=torch.bool, device=coords.device)
    for axis in range(3):
        lo, hi = axis_window(coords[:, axis], extents[axis], group_grid[axis], inward)
        key = coords[:, axis][None, :]
        allowed &= (key >= lo[:, None]) & (key <= hi[:, None])
    return allowed


def raster_block_mask(layout: TokenLayout, block_m: int, block_n: int, fraction: float) -> torch.Tensor:
    """Bool (n_q, n_k): blocks holding a video pair whose in-frame raster positions differ by at most
    ``int(frame_tokens * fraction) // 2`` (any, for ``fraction`` 1), in any two frames (Re-ttention's CogVideoX
    mask, at block level).

    The paper's mask is per token; a block kernel computes every block that holds one allowed pair, so this is
    the smallest block superset of it. Text rows and columns are added by the forced blocks.
    """
    n = layout.total_tokens
    per_frame = layout.grid[1] * layout.grid[2]
    # fraction 1 keeps every position (a clipped band as wide as the frame would still miss the far corners)
    half = per_frame if fraction >= 1.0 else int(per_frame * fraction) // 2
    pos = torch.full((n,), -1, dtype=torch.long)
    start = layout.video_start
    pos[start : start + layout.video_tokens] = torch.arange(layout.video_tokens) % per_frame
    cov_q = _coverage(pos, block_m, per_frame)
    cov_k = _coverage(pos, block_n, per_frame)
    # dilate the query coverage by the half band along the in-frame position
    reach = torch.nn.functional.max_pool1d(cov_q.float()[:, None, :], 2 * half + 1, stride=1, padding=half)[:, 0]
    return (reach @ cov_k.float().T) > 0


def _coverage(pos: torch.Tensor, block: int, per_frame: int) -> torch.Tensor:
    """Bool (n_blocks, per_frame): in-frame positions present in each block."""
    n = pos.numel()
    n_blocks = math.ceil(n / block)
    cov = torch.zeros(n_blocks, per_frame + 1, dtype=torch.bool)
    cov[torch.arange(n) // block, torch.where(pos >= 0, pos, per_frame)] = True
    return cov[:, :per_frame]
