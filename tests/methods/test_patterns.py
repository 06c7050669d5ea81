"""Patterns: full coverage is exactly dense; the windows match brute-force key sets, borders included."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _method_helpers import brute_attention, make_call, qkv, run_method, token_mask_from_method

from dit_accel import kernels
from dit_accel.config import resolve_config
from dit_accel.layout import TokenLayout
from dit_accel.methods import build_method
from dit_accel.patterns.geometry import auto_tile, window_extents
from dit_accel.patterns.window import axis_window, raster_block_mask

FULL = {
    "topk": dict(pattern="topk", sparsity=0.0),
    "topk_tiled": dict(pattern="topk", tiled=True, sparsity=0.0),
    "threshold_row": dict(pattern="threshold", tau=1.0),
    "threshold_head": dict(pattern="threshold", threshold_scope="head", tau=1.0),
    "window": dict(pattern="window", window=(99, 99, 99)),
    "inward": dict(pattern="inward", sparsity=0.0),
    "raster": dict(pattern="raster", raster_fraction=1.0),
    "vmoba_topk": dict(pattern="vmoba", vmoba_topk=(99, 99, 99)),
    "vmoba_token_topk": dict(pattern="vmoba", vmoba_gate="token", vmoba_topk=(99, 99, 99)),
    "vmoba_threshold": dict(pattern="vmoba", vmoba_select="threshold", tau=1.0),
}
LAYOUTS = {
    "video": TokenLayout(grid=(3, 8, 12)),
    "joint_text_first": TokenLayout(grid=(3, 6, 8), text_tokens=20, text_first=True),
    "joint_text_last": TokenLayout(grid=(2, 8, 10), text_tokens=12, text_first=False),
}


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("name", list(FULL))
@pytest.mark.parametrize("compensation", ["none", "linear", "reshape"])
def test_full_coverage_is_exactly_dense(rng, name, layout_name, compensation):
    layout = LAYOUTS[layout_name]
    q, k, v = qkv(rng, 1, 2, layout.total_tokens)
    if compensation == "linear" and FULL[name].get("vmoba_gate") == "token":  # refused: see test_paper_vmoba
        with pytest.raises(ValueError, match="vmoba_gate='token'"):
            resolve_config("blocktopk", compensation=compensation, **FULL[name])
        return
    for site in range(3) if name.startswith("vmoba") else (0,):  # all three VMoBA partitions
        _, call, result = run_method(
            "blocktopk", q, k, v, layout=layout, site_index=site, compensation=compensation, refresh_every=2,
            **FULL[name],
        )  # fmt: skip
        assert float(result.density) == 1.0
        reference, _ = brute_attention(q, k, v)
        torch.testing.assert_close(result.out.double(), reference, atol=2e-5, rtol=1e-5)
        if compensation == "reshape":  # the next (sparse) step: rho = 1, R = 0, still dense
            out = build_method(call.config).attend(make_call(q, k, v, call.config, layout=layout, step=1,
                                                             cache=call.cache, site_index=site))  # fmt: skip
            torch.testing.assert_close(out.out.double(), reference, atol=2e-5, rtol=1e-5)


def freeswim_allowed(c: int, c_key: int, d: int, size: int) -> bool:
    """FreeSwim's inward window on one axis, literally (attention_processor_.py, init_mask_flex)."""
    d_b = max(d - c, 0)
    d_u = max(d + c - size + 1, 0)
    return c - d - d_u <= c_key <= c + d + d_b


def test_axis_window_matches_freeswim_formula():
    for size in range(1, 12):
        for d in range(0, 7):
            centers = torch.arange(size)
            lo, hi = axis_window(centers, 2 * d + 1, size, inward=True)
            for c in range(size):
                allowed = [j for j in range(size) if freeswim_allowed(c, j, d, size)]
                assert (int(lo[c]), int(hi[c])) == (allowed[0], allowed[-1]), (size, d, c)
                assert int(hi[c]) - int(lo[c]) + 1 == min(size, 2 * d + 1)
            lo, hi = axis_window(centers, 2 * d + 1, size, inward=False)
            assert torch.equal(lo, (centers - d).clamp(min=0)) and torch.equal(hi, (centers + d).clamp(max=size - 1))


@pytest.mark.parametrize("inward", [True, False])
@pytest.mark.parametrize("text", [0, 24])
def test_window_key_set_matches_brute_force(rng, inward, text):
    layout = TokenLayout(grid=(3, 16, 40), text_tokens=text, text_first=True)  # tiles (1,8,8): 3 x 2 x 5
    extents = (1, 1, 3) if inward else (3, 3, 3)
    q, k, v = qkv(rng, 1, 1, layout.total_tokens)
    cfg = resolve_config("window", pattern="inward" if inward else "window", window=extents, tile=(1, 8, 8))
    method = build_method(cfg)
    call = make_call(q, k, v, cfg, layout=layout)
    result = method.attend(call)
    got = token_mask_from_method(method, call)[0, 0]
    # brute force on tokens: a video query's keys are the video tokens whose tile is in its tile's window
    f, h, w = layout.grid
    coords = torch.tensor(list(itertools.product(range(f), range(h), range(w))))
    tiles = coords // torch.tensor([1, 8, 8])
    sizes = (3, 2, 5)
    want = torch.ones(layout.total_tokens, layout.total_tokens, dtype=torch.bool)  # text rows/cols: all
    video = torch.zeros(layout.video_tokens, layout.video_tokens, dtype=torch.bool)
    for i in range(layout.video_tokens):
        ok = torch.ones(layout.video_tokens, dtype=torch.bool)
        for axis in range(3):
            d = (extents[axis] - 1) // 2
            c = int(tiles[i, axis])
            if inward:
                allowed = torch.tensor([freeswim_allowed(c, j, d, sizes[axis]) for j in range(sizes[axis])])
            else:
                allowed = (torch.arange(sizes[axis]) - c).abs() <= d
            ok &= allowed[tiles[:, axis]]
        video[i] = ok
    s = layout.video_start
    want[s : s + layout.video_tokens, s : s + layout.video_tokens] = video
    if text:  # text-free tiles do not align with blocks here: the block pattern may only add keys
        assert bool((got | ~want).all())
        # query blocks that hold text are dense rows: the text rows see everything
        assert bool(got[layout.text_slice()].all()) and bool(got[:, layout.text_slice()].all())
    else:
        assert torch.equal(got, want)
    reference, _ = brute_attention(q, k, v, got)
    torch.testing.assert_close(result.out.double(), reference, atol=2e-5, rtol=1e-5)


def test_inward_window_keeps_a_constant_key_count(rng):
    layout = TokenLayout(grid=(4, 16, 24))  # tiles (1, 8, 8) -> 4 x 2 x 3
    q, k, v = qkv(rng, 1, 1, layout.total_tokens)
    cfg = resolve_config("window", window=(3, 1, 2), tile=(1, 8, 8))
    method = build_method(cfg)
    call = make_call(q, k, v, cfg, layout=layout)
    method.attend(call)
    counts = token_mask_from_method(method, call)[0, 0].sum(-1)
    assert bool((counts == 3 * 1 * 2 * 64).all())


def test_raster_block_mask_is_the_smallest_block_superset_of_the_band():
    layout = TokenLayout(grid=(3, 10, 13), text_tokens=0)  # 130 tokens per frame, ragged blocks
    fraction = 0.2
    got = raster_block_mask(layout, 64, 64, fraction)
    n = layout.total_tokens
    pos = torch.arange(n) % 130
    half = int(130 * fraction) // 2
    tok = (pos[:, None] - pos[None, :]).abs() <= half
    n_b = math.ceil(n / 64)
    want = torch.zeros(n_b, n_b, dtype=torch.bool)
    for i in range(n_b):
        for j in range(n_b):
            want[i, j] = bool(tok[i * 64 : (i + 1) * 64, j * 64 : (j + 1) * 64].any())
    assert torch.equal(got, want)


def test_topk_keeps_self_and_count(rng):
    layout = TokenLayout(grid=(4, 8, 8))
    q, k, v = qkv(rng, 2, 3, layout.total_tokens)
    method, call, _ = run_method("blocktopk", q, k, v, layout=layout, sparsity=0.5)
    counts = call.cache.pattern.kv_counts
    assert bool((counts == 2).all())
    mask = kernels.reference.selected_block_mask(call.cache.pattern.kv_indices, counts, 4)
    assert bool(mask.diagonal(dim1=-2, dim2=-1).all())


def test_head_threshold_is_the_smallest_global_prefix(rng):
    from dit_accel.patterns.scored import head_threshold_mask

    scores = torch.randn(1, 2, 5, 6, generator=rng) * 2
    tau = 0.6
    mask = head_threshold_mask(scores, tau)
    mass = torch.softmax(scores, -1) / 5
    for h in range(2):
        kept = mass[0, h][mask[0, h]]
        assert float(kept.sum()) >= tau - 1e-6
        assert float(kept.sum() - kept.min()) < tau
        assert float(kept.min()) >= float(torch.cat([mass[0, h][~mask[0, h]], torch.zeros(1)]).max()) - 1e-7


def test_auto_tile_and_window_extents():
    tile = auto_tile((21, 30, 52), 64)
    assert math.prod(tile) == 64 and max(tile) / min(tile) <= 8
    assert auto_tile((4, 16, 16), 64) == (4, 4, 4)
    assert math.prod(auto_tile((3, 16, 16), 128)) == 128
    assert window_extents((4, 4, 4), 1.0) == (4, 4, 4)
    assert window_extents((4, 4, 4), 1 / 64) == (1, 1, 1)
    ext = window_extents((3, 4, 7), 0.25)
    assert abs(math.prod(ext) - 21) <= 2


@pytest.mark.parametrize("grid,density", [((4, 4, 4), 0.15), ((3, 6, 13), 0.1), ((8, 8, 8), 0.02)])
def test_window_extents_never_isolate_tiles_when_the_budget_allows(grid, density):
    # bug: the toy's 4 x 4 x 4 tiles at the window preset's 15 % got (1, 3, 3): each 4-frame slab of tiles saw
    # only itself in time, a hard cut every 4 frames
    ext = window_extents(grid, density)
    assert all(e >= 2 for e, g in zip(ext, grid) if g > 1), ext
    assert abs(math.prod(ext) - density * math.prod(grid)) <= 0.5 * density * math.prod(grid)


def test_topk_lut_is_only_as_wide_as_its_longest_possible_row(rng):
    """A top-k pattern's LUT is cut to k columns (the kernels key their tuning on that width); every selected block
    is still listed, and a pattern with full forced rows (text queries) keeps the full width."""
    q, k, v = qkv(rng, 1, 2, 1024)
    _, call, _ = run_method("blocktopk", q, k, v, sparsity=0.75, min_tokens=0)
    idx, counts = call.cache.pattern.kv_indices, call.cache.pattern.kv_counts
    assert idx.shape[-1] == 4 and int(counts.max()) == 4  # 16 key blocks of 64, a quarter kept
    text = TokenLayout(grid=(2, 16, 16), text_tokens=64, text_first=True)
    q, k, v = qkv(rng, 1, 2, text.total_tokens)
    _, call, _ = run_method("blocktopk", q, k, v, layout=text, sparsity=0.75, min_tokens=0)
    assert call.cache.pattern.kv_indices.shape[-1] == math.ceil(text.total_tokens / 64)


def test_keep_count_rounds_half_up_as_documented():
    # expected values from exact fractions, independent of the code's float formula: floor, banker's rounding
    # (Python's round: 2.5 -> 2) or truncation must fail here
    import math
    from fractions import Fraction

    from dit_accel.patterns.scored import keep_count

    for sparsity in ("0.5", "0.75", "0.85", "0.9", "0.95", "0.96875", "0.0", "0.99"):
        for n_k in (1, 2, 4, 7, 10, 12, 20, 33, 64, 100):
            exact = (1 - Fraction(sparsity)) * n_k
            expected = max(1, min(n_k, math.floor(exact + Fraction(1, 2))))
            assert keep_count(float(sparsity), n_k) == expected, (sparsity, n_k)
    assert keep_count(0.75, 10) == 3 and keep_count(0.85, 10) == 2  # the two half-way cases, spelled out
