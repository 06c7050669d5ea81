"""Token geometry: where the video tokens of a site's sequence are, 3D tiles and block windows.

diffusers orders video tokens frame-major raster (index = f * H * W + h * W + w). A window in that order is not
block-dense; after a permutation into 3D tiles whose volume equals the kernel block it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

__all__ = [
    "TokenLayout",
    "block_window_mask",
    "inverse_permutation",
    "tile_grid",
    "tile_permutation",
]

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class TokenLayout:
    """Where the parts of one attention sequence live.

    Attributes:
        grid: (frames, rows, cols) of the video/image tokens after patchify.
        text_tokens: number of text tokens in the same sequence (joint attention), 0 otherwise.
        text_first: whether the text tokens come before the video tokens.
        text_per_call: the text count is only known per attention call (Mochi drops each sample's padded prompt
            tokens before SDPA, one call per sample): a call's tokens beyond the grid are its text.
    """

    grid: Grid
    text_tokens: int = 0
    text_first: bool = False
    text_per_call: bool = False

    @property
    def video_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def total_tokens(self) -> int:
        return self.video_tokens + self.text_tokens

    @property
    def video_start(self) -> int:
        return self.text_tokens if self.text_first else 0

    def for_tokens(self, tokens: int) -> TokenLayout | None:
        """This layout for a call of ``tokens`` tokens, or None when it does not describe that call."""
        if tokens == self.total_tokens:
            return self
        if self.text_per_call and tokens >= self.video_tokens:
            return replace(self, text_tokens=tokens - self.video_tokens)
        return None

    def text_slice(self) -> slice:
        if self.text_first:
            return slice(0, self.text_tokens)
        return slice(self.video_tokens, self.video_tokens + self.text_tokens)

    def text_token_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool (N,): True at text tokens."""
        mask = torch.zeros(self.total_tokens, dtype=torch.bool, device=device)
        mask[self.text_slice()] = True
        return mask

    def block_has_text(self, block: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool (ceil(N / block),): blocks that hold at least one text token."""
        mask = self.text_token_mask(device)
        n_blocks = math.ceil(self.total_tokens / block)
        mask = torch.nn.functional.pad(mask, (0, n_blocks * block - self.total_tokens))
        return mask.view(n_blocks, block).any(dim=1)


def tile_grid(grid: Grid, tile: Grid) -> Grid:
    """Number of tiles along each axis (border tiles may be ragged)."""
    return tuple(math.ceil(g / t) for g, t in zip(grid, tile))  # type: ignore[return-value]


def tile_permutation(grid: Grid, tile: Grid, device: torch.device | str = "cpu") -> torch.Tensor:
    """Permutation ``perm`` with ``x_tiled = x[..., perm, :]``: raster tokens regrouped tile by tile.

    Tiles are visited frame-tile-major, then row, then column; tokens inside a tile in raster order. Ragged
    border tiles just hold fewer tokens, so a kernel block may straddle two tiles there.
    """
    f, h, w = grid
    tf, th, tw = tile
    if min(grid) < 1 or min(tile) < 1:
        raise ValueError(f"grid={grid} and tile={tile} must be positive")
    fi = torch.arange(f, device=device).view(f, 1, 1).expand(f, h, w)
    hi = torch.arange(h, device=device).view(1, h, 1).expand(f, h, w)
    wi = torch.arange(w, device=device).view(1, 1, w).expand(f, h, w)
    nt = tile_grid(grid, tile)
    tile_id = ((fi // tf) * nt[1] + hi // th) * nt[2] + wi // tw
    inner = ((fi % tf) * th + hi % th) * tw + wi % tw
    key = tile_id * (tf * th * tw) + inner
    return torch.argsort(key.flatten(), stable=True)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``x == x_tiled[..., inv, :]``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


def block_window_mask(tiles: Grid, radius: Grid, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool (n_tiles, n_tiles): tile j is within ``radius`` (frames, rows, cols) of tile i on the tile grid."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(t, device=device) for t in tiles), indexing="ij"), dim=-1).view(
        -1, 3
    )
    diff = (coords[:, None, :] - coords[None, :, :]).abs()
    limit = torch.tensor(radius, device=device)
    return (diff <= limit).all(dim=-1)
