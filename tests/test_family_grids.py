"""The latent grid each family adapter reads from the forward's arguments, against the model's own patchified shape.

The tiny pipelines run at a non-square size (so a grid with rows and columns swapped fails) and the grid the
layout carries into the first self-attention call is compared with the shape the model itself builds: Cosmos's
patch embedding output (B, T, H, W, C), HunyuanVideo 1.5's patch convolution output (B, C, T, H, W), Mochi's
RoPE arguments (frames, rows, cols), and for LTX-2 the
per-token patch coordinates the pipeline hands the transformer (their distinct values per axis, and the raster
order the layout assumes: frame-major, then rows, then columns).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dit_accel
from dit_accel.testing import tiny_pipeline

# non-square sizes: (height, width) in pixels per family, and the grid they must give
SIZES = {
    "cosmos": ((128, 64), (3, 16, 8)),  # 9 frames; VAE /4 in time and space, patch (1, 2, 2)
    "mochi": ((256, 128), (3, 16, 8)),  # 13 frames; VAE /6 in time, /8 in space, patch 2
    "ltx2_video": ((64, 32), (3, 32, 16)),  # 5 frames; VAE /2, patch 1; the pipeline wants multiples of 32
    "hunyuan_video15": ((64, 32), (2, 16, 8)),  # 3 frames; VAE /2 in time, /4 in space, patch 1
}


def _model_grid(family: str, pipe, seen: dict) -> list:
    """Hooks that record the model's own grid into ``seen['model']``; returns the handles to remove."""
    transformer = pipe.transformer

    def cosmos(mod, args, out) -> None:  # the patch embedding's output is (B, T, H, W, C)
        seen.setdefault("model", tuple(out.shape[1:4]))

    def mochi(mod, args) -> None:  # rope(pos_frequencies, num_frames, post_patch_height, post_patch_width)
        seen.setdefault("model", tuple(int(a) for a in args[1:4]))

    def ltx2(mod, args, kwargs) -> None:
        coords = kwargs["video_coords"][0, :, :, 0]  # (3, N): start of each token's patch along t, h, w
        seen.setdefault("coords", coords)
        seen.setdefault("model", tuple(int(axis.unique().numel()) for axis in coords))

    def hunyuan15(mod, args, out) -> None:  # the patch convolution's output is (B, C, T, H, W)
        seen.setdefault("model", tuple(out.shape[2:5]))

    if family == "cosmos":
        return [transformer.patch_embed.register_forward_hook(cosmos)]
    if family == "hunyuan_video15":
        return [transformer.x_embedder.proj.register_forward_hook(hunyuan15)]
    if family == "mochi":
        return [transformer.rope.register_forward_pre_hook(mochi)]
    return [transformer.register_forward_pre_hook(ltx2, with_kwargs=True)]


def _run(family: str, grid_fn=None) -> dict:
    pipe, kwargs = tiny_pipeline(family)
    (height, width), _ = SIZES[family]
    handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64)
    acc = handle.accelerators["transformer"]
    if grid_fn is not None:
        acc.family = dataclasses.replace(acc.family, grid=grid_fn)
    seen: dict = {}
    attend = acc.sites[0].attend

    def spied(q, k, v, *, state, **rest):
        seen.setdefault("layout", state.layout)
        seen.setdefault("tokens", q.shape[-2])
        return attend(q, k, v, state=state, **rest)

    acc.sites[0].attend = spied  # this instance only
    hooks = _model_grid(family, pipe, seen)
    try:
        steps = 2 if family == "mochi" else 1  # Mochi's sigma schedule needs two steps
        call = dict(kwargs, height=height, width=width, num_inference_steps=steps)
        pipe(**call, generator=torch.Generator().manual_seed(0))
    finally:
        for hook in hooks:
            hook.remove()
        handle.remove()
    return seen


def _grid_matches(family: str, seen: dict) -> bool:
    layout = seen["layout"]
    if layout is None or tuple(layout.grid) != seen["model"]:
        return False
    if "coords" in seen:  # the raster order: token n = (f * H + h) * W + w
        f, h, w = layout.grid
        coords = seen["coords"].reshape(3, f, h, w)
        for axis in range(3):
            others = [d for d in range(3) if d != axis]
            if (coords[axis] - coords[axis].amin(dim=others, keepdim=True)).abs().amax() > 0:
                return False
    return True


@pytest.mark.parametrize("family", sorted(SIZES))
def test_grid_is_the_models_patchified_shape(family):
    seen = _run(family)
    assert seen["model"] == SIZES[family][1]
    assert _grid_matches(family, seen), (seen["layout"], seen["model"])


@pytest.mark.parametrize("family", sorted(SIZES))
def test_a_grid_with_rows_and_cols_swapped_fails_the_check(family):
    """The planted bug the check above exists for: same token count, wrong shape."""
    from dit_accel.pipelines.families import find_family

    def swapped(model, bound):
        grid = find_family(model).grid(model, bound)
        return None if grid is None else (grid[0], grid[2], grid[1])

    seen = _run(family, swapped)
    assert not _grid_matches(family, seen)
