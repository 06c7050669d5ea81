"""``rettention-paper``'s block pattern is the smallest block superset of the official token mask.

Official masks, re-implemented from their description (cccrrrccc/Re-ttention, commit bbec1f5):
``scripts/Vbench_category.py`` ``generate_sliding_window_attention_mask`` (CogVideoX: text first; text rows and
columns all ones; a video token at in-frame position i sees positions [i - w // 2, i + w // 2] clipped to the
frame, in every frame, w = int(frame_tokens * 1/32)) and ``module/pixart_processor.py``
``create_local_attention_mask`` (PixArt: the band |i - j| <= w // 2 over the raster order, w = int(N * 1/32)).
A block kernel must compute every 64 x 64 block holding one allowed pair, and should compute no other.
"""

from __future__ import annotations

import math

import pytest
import torch
from _method_helpers import qkv, run_method

from dit_accel import kernels
from dit_accel.layout import TokenLayout


def official_cogvideox_mask(text: int, frames: int, frame_tokens: int, fraction: float) -> torch.Tensor:
    n = text + frames * frame_tokens
    half = int(frame_tokens * fraction) // 2
    pos = torch.arange(frames * frame_tokens) % frame_tokens
    video = (pos[:, None] - pos[None, :]).abs() <= half  # same in-frame window, every frame (clipping is implied)
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[text:, text:] = video
    return mask


def official_pixart_mask(n: int, fraction: float) -> torch.Tensor:
    half = int(n * fraction) // 2
    idx = torch.arange(n)
    return (idx[:, None] - idx[None, :]).abs() <= half


def block_superset(token_mask: torch.Tensor, block: int = 64) -> torch.Tensor:
    n = token_mask.shape[-1]
    nb = math.ceil(n / block)
    padded = torch.zeros(nb * block, nb * block, dtype=torch.bool)
    padded[:n, :n] = token_mask
    return padded.view(nb, block, nb, block).any(dim=3).any(dim=1)


@pytest.mark.parametrize(
    ("layout", "official"),
    [
        (TokenLayout(grid=(4, 16, 24), text_tokens=40, text_first=True), "cogvideox"),
        (TokenLayout(grid=(3, 10, 45), text_tokens=226, text_first=True), "cogvideox"),  # CogVideoX's text length
        (TokenLayout(grid=(1, 64, 64)), "pixart"),  # PixArt at 1024 x 1024: the half band is exactly one block
        (TokenLayout(grid=(1, 65, 64)), "pixart"),  # half band 65: one token more than a block reaches two blocks
    ],
)
def test_block_pattern_is_the_smallest_superset_of_the_official_mask(rng, layout, official):
    n = layout.total_tokens
    q, k, v = qkv(rng, 1, 2, n)
    _, call, result = run_method("rettention-paper", q, k, v, layout=layout, min_tokens=0)
    assert result.kind == "refresh"
    pattern = call.cache.pattern
    n_b = math.ceil(n / 64)
    ours = kernels.reference.selected_block_mask(pattern.kv_indices, pattern.kv_counts, n_b)[0, 0]
    if official == "cogvideox":
        frame_tokens = layout.grid[1] * layout.grid[2]
        token_mask = official_cogvideox_mask(layout.text_tokens, layout.grid[0], frame_tokens, 1 / 32)
    else:
        token_mask = official_pixart_mask(n, 1 / 32)
    want = block_superset(token_mask)
    assert torch.equal(ours, want), (int(ours.sum()), int(want.sum()))
    assert int(want.sum()) < n_b * n_b  # the pattern is sparse: the check is not trivially all-true
