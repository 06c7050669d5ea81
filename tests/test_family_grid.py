"""The latent grid each family adapter reads, against the tokens the model really builds.

Wan-style models (Wan 2.2's two experts, VACE, Animate, SkyReels-V2) patchify with a Conv3d, ``patch_embedding``,
whose output (B, C, frames, rows, cols) is flattened in that order into the tokens: the layout's grid must be that
shape. Flux 2 gets packed tokens and a (T, H, W, L) position id per token: token i must sit at row i // cols,
column i % cols of the layout's grid. The tiny pipelines are not square, so a grid with rows and columns swapped
fails here (the second test plants that bug).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dit_accel
from dit_accel.testing import tiny_pipeline

WAN_LIKE = ("wan22", "wan_vace", "wan_animate", "skyreels_v2", "skyreels_v2_df")
FAMILIES = (*WAN_LIKE, "flux2")


def _swapped(grid_fn):
    def grid(model, bound):
        g = grid_fn(model, bound)
        return None if g is None else (g[0], g[2], g[1])

    return grid


def _layouts_and_truth(family: str, swap: bool = False) -> list[tuple[object, object]]:
    """(layout the adapter gave, what the model built) for the first self-attention call of each transformer."""
    pipe, kwargs = tiny_pipeline(family)
    handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64)
    seen: dict[str, list] = {}
    hooks = []
    for component, acc in handle.accelerators.items():
        if swap:
            acc.family = dataclasses.replace(acc.family, grid=_swapped(acc.family.grid))
        site = acc.sites[0]
        attend = site.attend
        record = seen.setdefault(component, [])

        def spied(q, k, v, *, state, attend=attend, record=record, **rest):
            record.append(("layout", state.layout, q.shape[2]))
            return attend(q, k, v, state=state, **rest)

        site.attend = spied  # this instance only
        model = acc.transformer
        if family in WAN_LIKE:
            hooks.append(
                model.patch_embedding.register_forward_hook(
                    lambda m, i, out, record=record: record.append(("truth", tuple(out.shape[2:]), None))
                )
            )
        else:
            hooks.append(
                model.register_forward_pre_hook(
                    lambda m, a, kw, record=record: record.append(("truth", kw["img_ids"][0].clone(), None)),
                    with_kwargs=True,
                )
            )
    try:
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    finally:
        for hook in hooks:
            hook.remove()
        handle.remove()
    out = []
    for component, record in seen.items():
        truth = next(value for kind, value, _ in record if kind == "truth")
        _, layout, tokens = next(item for item in record if item[0] == "layout")
        out.append((component, layout, truth, tokens))
    assert {c for c, *_ in out} == set(handle.accelerators)  # every expert ran and was checked
    return out


def _matches(family: str, layout, truth, tokens: int) -> bool:
    grid = layout.grid
    if family in WAN_LIKE:
        return grid == truth and grid[0] * grid[1] * grid[2] == tokens
    ids = truth  # (N, 4): T, H, W, L per image token, in token order
    frames, rows, cols = grid
    index = torch.arange(ids.shape[0])
    return (
        frames == 1
        and rows * cols == ids.shape[0] == tokens - layout.text_tokens
        and torch.equal(ids[:, 1].long(), index // cols)
        and torch.equal(ids[:, 2].long(), index % cols)
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_the_grid_is_the_models_patchified_shape(family):
    for component, layout, truth, tokens in _layouts_and_truth(family):
        assert layout is not None, component
        assert _matches(family, layout, truth, tokens), (component, layout.grid, truth if family in WAN_LIKE else "")
        assert layout.grid[1] != layout.grid[2]  # not square: the check below can tell rows from columns


@pytest.mark.parametrize("family", ["wan_vace", "flux2"])
def test_a_grid_with_rows_and_columns_swapped_fails_the_check(family):
    """The planted bug the check above exists for."""
    for _, layout, truth, tokens in _layouts_and_truth(family, swap=True):
        assert not _matches(family, layout, truth, tokens)
