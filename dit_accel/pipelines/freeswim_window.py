"""FreeSwim's window sized by the training (base) latent grid, on the inward 3D-tile window of
:mod:`dit_accel.patterns`.

FreeSwim (arXiv 2511.14712, code ``cache/attention_processor_.py::init_mask_flex``) gives every query of the
high-resolution latent grid the receptive field it had at the training resolution: a ``base_rows x base_cols``
window over all frames, shifted inward at the borders so it never shrinks. The official mask is per token in raster
order, so a 128-token FlexAttention block there is about one grid row and roughly half of all blocks are partially
active at 1080p. Here the window is decided between 3D tiles whose volume is the kernel block
(:func:`dit_accel.patterns.window.window_group_mask` with ``inward=True``): every block is either fully computed or
skipped, and the window is ``E x tile`` tokens per axis with ``E`` chosen so that it matches the base grid.

This module only adds what FreeSwim needs on top of the shared pattern: window extents from the base grid, a tile
choice that fits them, the paper's softmax scale, and token-level masks for tests and docs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import AccelConfig, resolve_config
from ..layout import tile_grid
from ..patterns.window import window_group_mask

__all__ = [
    "WindowGeometry",
    "choose_tile",
    "freeswim_scale",
    "latent_grid",
    "tile_window_mask",
    "window_geometry",
]

Grid = tuple[int, int, int]


def latent_grid(
    height: int, width: int, num_frames: int, *, spatial: int = 8, temporal: int = 4, patch: Grid = (1, 2, 2)
) -> Grid:
    """Token grid (frames, rows, cols) after VAE and patchify: Wan's 8x spatial, 4x temporal, 1x2x2 patch."""
    for name, value, p in (("height", height, patch[1]), ("width", width, patch[2])):
        if value % (spatial * p):
            raise ValueError(f"{name}={value} must be a multiple of {spatial * p} (VAE factor x patch)")
    frames = (num_frames - 1) // temporal + 1
    return (frames // patch[0], height // spatial // patch[1], width // spatial // patch[2])


def freeswim_scale(n_base: int, head_dim: int) -> float:
    """FreeSwim's softmax scale ``sqrt(log(2 n) / log(n) / d)`` with ``n`` the base grid's tokens per frame.

    The official code hard-codes ``n = 30 * 52`` (Wan 480p); deriving it from the base grid keeps the entropy
    correction right for other training resolutions (e.g. 45 * 80 for a 720p 14B base).
    """
    if n_base < 2:
        raise ValueError(f"n_base={n_base} must be at least 2 tokens")
    if head_dim < 1:
        raise ValueError(f"head_dim={head_dim} must be positive")
    return math.sqrt(math.log(2 * n_base) / math.log(n_base) / head_dim)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _extent(window: int, tile: int, tiles: int) -> int:
    """Window extent in tiles whose token span is closest to ``window`` (at least one tile, at most all)."""
    return max(1, min(tiles, _round_half_up(window / tile)))


def choose_tile(grid: Grid, window_hw: tuple[int, int], block: int) -> Grid:
    """The 3D tile of ``block`` tokens that best fits FreeSwim's window on ``grid``.

    Score: relative error of the window's token span (rows + cols) against the requested window, plus the padded
    fraction of the grid (ragged border tiles make blocks straddle tiles, so they compute a little more). Ties go to
    the most cube-like tile, then to fewer frames.
    """
    f, h, w = grid
    wh, ww = min(window_hw[0], h), min(window_hw[1], w)
    best: tuple[float, float, int, Grid] | None = None
    for tf in range(1, block + 1):
        if block % tf:
            continue
        for th in range(1, block // tf + 1):
            if (block // tf) % th:
                continue
            tw = block // (tf * th)
            tile = (tf, th, tw)
            nt = tile_grid(grid, tile)
            rows = min(h, _extent(wh, th, nt[1]) * th)
            cols = min(w, _extent(ww, tw, nt[2]) * tw)
            mismatch = abs(rows - wh) / wh + abs(cols - ww) / ww
            padded = math.prod(n * t for n, t in zip(nt, tile)) / (f * h * w) - 1.0
            key = (round(mismatch + padded, 9), max(tile) / min(tile), tf, tile)
            if best is None or key < best:
                best = key
    assert best is not None
    return best[3]


@dataclass(frozen=True)
class WindowGeometry:
    """FreeSwim's window on one latent grid.

    Attributes:
        grid: (frames, rows, cols) of the target latent grid after patchify.
        window: requested window in tokens (frames, rows, cols); frames == grid frames means all frames.
        tile: 3D tile (its volume is the kernel block).
        extents: window extent in tiles (frames, rows, cols), shifted inward at the borders.
        block: kernel block size.
    """

    grid: Grid
    window: Grid
    tile: Grid
    extents: Grid
    block: int

    @property
    def span(self) -> Grid:
        """Tokens each query's window spans per axis (where the grid holds whole tiles)."""
        return tuple(min(g, e * t) for g, e, t in zip(self.grid, self.extents, self.tile))  # type: ignore[return-value]

    def config(self, **options: object) -> AccelConfig:
        """The ``window`` preset (inward pattern) with this tile and extent; ``options`` override fields."""
        values: dict[str, object] = dict(
            tile=self.tile, window=self.extents, block_m=self.block, block_n=self.block, min_tokens=0
        )
        values.update(options)
        return resolve_config("window", **values)


def window_geometry(
    grid: Grid,
    window_hw: tuple[int, int],
    *,
    block: int = 64,
    window_frames: int | None = None,
    tile: Grid | None = None,
) -> WindowGeometry:
    """FreeSwim's window (``window_hw`` = the base latent grid's rows and cols) as tile extents on ``grid``.

    ``window_frames`` limits the window to that many latent frames (None: all frames, as in the paper).
    """
    f, h, w = grid
    if len(window_hw) != 2 or min(window_hw) < 1:
        raise ValueError(f"window_hw={window_hw!r} must be two positive token counts (rows, cols)")
    if window_frames is not None and window_frames < 1:
        raise ValueError(f"window_frames={window_frames!r} must be None (all frames) or a positive frame count")
    frames = f if window_frames is None else min(f, window_frames)
    if tile is None:
        tile = choose_tile(grid, window_hw, block)
    elif len(tile) != 3 or min(tile) < 1:
        raise ValueError(f"tile={tile!r} must be three positive sizes (frames, rows, cols)")
    nt = tile_grid(grid, tile)
    extents = (
        nt[0] if window_frames is None else _extent(frames, tile[0], nt[0]),
        _extent(min(window_hw[0], h), tile[1], nt[1]),
        _extent(min(window_hw[1], w), tile[2], nt[2]),
    )
    return WindowGeometry(grid, (frames, window_hw[0], window_hw[1]), tuple(tile), extents, block)  # type: ignore[arg-type]


def tile_window_mask(grid: Grid, tile: Grid, extents: Grid, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool (N, N) in raster token order: the keys each query attends to under the inward tile window.

    Small grids only (tests, docs): it materialises N x N.
    """
    f, h, w = grid
    nt = tile_grid(grid, tile)
    coords = torch.stack(torch.meshgrid(*(torch.arange(t, device=device) for t in nt), indexing="ij"), -1).view(-1, 3)
    gm = window_group_mask(coords, nt, extents, inward=True)
    fi = torch.arange(f, device=device).view(f, 1, 1).expand(f, h, w)
    hi = torch.arange(h, device=device).view(1, h, 1).expand(f, h, w)
    wi = torch.arange(w, device=device).view(1, 1, w).expand(f, h, w)
    tile_of = (((fi // tile[0]) * nt[1] + hi // tile[1]) * nt[2] + wi // tile[2]).flatten()
    return gm[tile_of][:, tile_of]
