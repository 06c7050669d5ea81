"""FreeSwim (issue 7): the inward window's key sets, the cross-attention override and its cache, equivalence with
plain video-to-video, batch 2 and 50 steps, on a tiny Wan pipeline on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import WanVideoToVideoPipeline

import dit_accel
from dit_accel.layout import TokenLayout
from dit_accel.methods import ComposedMethod, SiteCall
from dit_accel.patterns import build_pattern, plan_for
from dit_accel.patterns.window import axis_window
from dit_accel.pipelines import FreeSwimPipeline
from dit_accel.pipelines.freeswim import Branch, FreeSwimHooks, FreeSwimOptions, maybe_freeswim, upscale_latents
from dit_accel.pipelines.freeswim_window import (
    choose_tile,
    freeswim_scale,
    latent_grid,
    tile_window_mask,
    window_geometry,
)
from dit_accel.site_state import BranchState
from dit_accel.state import DenoiseState
from dit_accel.testing import tiny_pipeline

# tiny Wan: VAE 8x spatial, 4x temporal, patch 1x2x2 -> 256 x 256 x 9 frames is a (3, 16, 16) token grid.
H, W = 256, 256
BASE = 128  # base grid 8 x 8


@pytest.fixture(autouse=True)
def _one_thread():
    # The CPU is shared: two intra-op threads make these tiny matmuls ~20x slower under contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    pipe, kwargs = tiny_pipeline("wan")
    pipe.set_progress_bar_config(disable=True)
    fs = FreeSwimPipeline.from_pipe(pipe)
    fs.set_progress_bar_config(disable=True)
    return pipe, fs, kwargs


def _refiner(pipe) -> WanVideoToVideoPipeline:
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    v2v = WanVideoToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=pipe.vae, scheduler=sched, transformer=pipe.transformer
    )
    v2v.set_progress_bar_config(disable=True)
    return v2v


# ---------------------------------------------------------------------------------------------------------------
# window geometry


def _official_rows(h: int, size: int, d: int) -> set[int]:
    """FreeSwim's init_mask_flex on one axis (peers.md 4.2), clipped to the grid like the mask's key range."""
    d_b = max(d - h, 0)
    d_u = max(d + h - size + 1, 0)
    return {k for k in range(size) if h - d - d_u <= k <= h + d + d_b}


@pytest.mark.parametrize("size", [1, 5, 17, 30, 31, 68])
@pytest.mark.parametrize("d", [0, 2, 15])
def test_shared_inward_axis_window_is_the_official_formula(size: int, d: int) -> None:
    centers = torch.arange(size)
    lo, hi = axis_window(centers, 2 * d + 1, size, inward=True)
    for h in range(size):
        assert set(range(int(lo[h]), int(hi[h]) + 1)) == _official_rows(h, size, d), (size, d, h)


def _brute_keys(grid, tile, extents, q: int) -> set[int]:
    """Key raster indices of query ``q`` under the inward tile window, by explicit loops."""
    f, h, w = grid
    qc = (q // (h * w), q // w % h, q % w)
    bounds = []
    for axis in range(3):
        n_tiles = -(-grid[axis] // tile[axis])
        e = min(extents[axis], n_tiles)
        lo = min(max(qc[axis] // tile[axis] - (e - 1) // 2, 0), n_tiles - e)
        bounds.append((lo, lo + e - 1))
    keys = set()
    for k in range(f * h * w):
        kc = (k // (h * w), k // w % h, k % w)
        if all(bounds[a][0] <= kc[a] // tile[a] <= bounds[a][1] for a in range(3)):
            keys.add(k)
    return keys


@pytest.mark.parametrize(
    "grid,tile,extents",
    [((2, 12, 12), (1, 4, 4), (2, 2, 2)), ((3, 10, 14), (2, 4, 4), (1, 2, 3)), ((2, 9, 7), (1, 2, 3), (2, 3, 2))],
)
def test_tile_window_key_sets_match_brute_force(grid, tile, extents) -> None:
    mask = tile_window_mask(grid, tile, extents)
    n = math.prod(grid)
    for q in range(n):
        assert set(torch.nonzero(mask[q]).flatten().tolist()) == _brute_keys(grid, tile, extents, q), q
    if all(g % t == 0 for g, t in zip(grid, tile)):  # whole tiles: every window holds the same number of keys
        assert bool((mask.sum(1) == math.prod(e * t for e, t in zip(extents, tile))).all())


def _kernel_token_mask(geo, n: int) -> torch.Tensor:
    """The keys the block-sparse kernel computes per query (raster order), from the shared pattern's block mask."""
    cfg = geo.config()
    layout = TokenLayout(geo.grid)
    plan = plan_for(cfg, layout, n, 0, torch.device("cpu"))
    q = torch.zeros(1, 1, n, 8)
    pattern = build_pattern(cfg, plan, q, q, layout, None)
    blocks = pattern.mask[0, 0]
    rows = torch.arange(n) // cfg.block_m
    cols = torch.arange(n) // cfg.block_n
    kernel_order = blocks[rows][:, cols]
    perm = plan.perm if plan.perm is not None else torch.arange(n)
    out = torch.zeros(n, n, dtype=torch.bool)
    out[perm[:, None], perm[None, :]] = kernel_order
    return out


@pytest.mark.parametrize("grid,window", [((2, 24, 24), (12, 12)), ((2, 20, 28), (12, 12)), ((3, 16, 16), (8, 8))])
def test_kernel_key_sets_are_the_window(grid, window) -> None:
    geo = window_geometry(grid, window, block=64, tile=(1, 8, 8))
    n = math.prod(grid)
    reference = tile_window_mask(grid, geo.tile, geo.extents)
    computed = _kernel_token_mask(geo, n)
    assert bool((computed | ~reference).all()), "a key of the window is not computed"
    if all(g % t == 0 for g, t in zip(grid, geo.tile)):  # tiles fill blocks exactly: block-dense, nothing more
        assert torch.equal(computed, reference)


def test_window_output_equals_masked_attention(rng: torch.Generator) -> None:
    grid = (2, 24, 24)
    geo = window_geometry(grid, (12, 12), block=64, tile=(1, 8, 8))
    n = math.prod(grid)
    q, k, v = (torch.randn(2, 2, n, 16, generator=rng) for _ in range(3))
    scale = freeswim_scale(12 * 12, 16)
    layout = TokenLayout(grid)
    state = DenoiseState(step=0, branch="window_cond", layout=layout, active=True)
    method = ComposedMethod(geo.config())
    call = SiteCall(q=q, k=k, v=v, scale=scale, config=method.config, state=state, layout=layout, site_index=0,
                    site_name="attn1", cache=BranchState())  # fmt: skip
    out = method.attend(call).out
    mask = tile_window_mask(grid, geo.tile, geo.extents)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_window_geometry_follows_the_base_grid() -> None:
    # Wan2.1 at 1088 x 1920 from a 480 x 832 base: grid 21 x 68 x 120, window 30 x 52 tokens over all frames.
    grid = latent_grid(1088, 1920, 81)
    assert grid == (21, 68, 120)
    for block in (64, 128):
        geo = window_geometry(grid, (30, 52), block=block)
        assert math.prod(geo.tile) == block
        assert geo.extents[0] * geo.tile[0] >= grid[0]  # all frames
        rows, cols = geo.span[1], geo.span[2]
        assert abs(rows - 30) <= geo.tile[1] // 2 and abs(cols - 52) <= geo.tile[2] // 2
    limited = window_geometry(grid, (30, 52), block=64, window_frames=4, tile=(2, 4, 8))
    assert limited.extents[0] == 2 and limited.span[0] == 4
    assert choose_tile((3, 16, 16), (16, 16), 64) in {(1, 8, 8), (1, 4, 16), (1, 16, 4)}
    # n_base from the base grid, not hard-coded: the 720p (45 x 80) base gives a different scale than 480p
    assert freeswim_scale(30 * 52, 128) == pytest.approx(math.sqrt(math.log(3120) / math.log(1560) / 128))
    assert freeswim_scale(45 * 80, 128) != pytest.approx(freeswim_scale(30 * 52, 128))


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="strength"):
        FreeSwimOptions(strength=0.0)
    with pytest.raises(ValueError, match="cache_every"):
        FreeSwimOptions(cache_every=0)
    with pytest.raises(ValueError, match="upscale"):
        FreeSwimOptions(upscale="pixels")
    with pytest.raises(ValueError, match="block_size"):
        FreeSwimOptions(block_size=32)


# ---------------------------------------------------------------------------------------------------------------
# branches, override and cache


def test_override_and_cache(tiny) -> None:
    pipe, _, kwargs = tiny
    transformer = pipe.transformer
    steps, cache_every = 7, 3
    opts = FreeSwimOptions(base_height=BASE, base_width=BASE, strength=1.0, cache_every=cache_every, tile=(1, 4, 16))
    records: list[tuple[str, int, int, torch.Tensor]] = []
    cross_calls: list[tuple[str, int]] = []
    handles = []
    hooks = FreeSwimHooks(transformer, (8, 8), opts)
    for i, block in enumerate(transformer.blocks):
        handles.append(
            block.attn2.register_forward_hook(
                lambda m, a, o, i=i: records.append((hooks.branch.value, hooks._step, i, o.detach().clone()))
            )
        )
        handles.append(
            block.attn2.to_q.register_forward_hook(
                lambda m, a, o: cross_calls.append((hooks.branch.value, hooks._step))
            )
        )
    latents = torch.randn(1, 16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    try:
        with hooks:
            _refiner(pipe)(
                latents=latents, prompt_embeds=kwargs["prompt_embeds"],
                negative_prompt_embeds=kwargs["negative_prompt_embeds"], height=H, width=W, num_inference_steps=steps,
                strength=1.0, guidance_scale=5.0, output_type="latent",
            )  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    n_blocks = len(transformer.blocks)
    guides = list(range(0, steps, cache_every))
    stats = hooks.stats.as_dict()
    assert stats["guide_steps"] == guides
    # full self-attention and cross-attention computations only on guide steps (F), never on other steps
    assert stats["full_self_attention_calls"] == len(guides) * n_blocks
    assert stats["attn2_computed"] == len(guides) * n_blocks
    assert stats["attn2_reused"] == steps * n_blocks
    assert stats["window_calls"] == 2 * steps * n_blocks  # W, conditional and unconditional
    assert stats["cache_bytes"] == 0  # freed on remove()
    assert stats["cache_bytes_peak"] == n_blocks * 1 * 768 * transformer.config.num_attention_heads * 16 * 4
    assert sorted(set(cross_calls)) == sorted(
        {("full", s) for s in guides} | {("window_uncond", s) for s in range(steps)}
    )
    full = {(s, i): o for b, s, i, o in records if b == "full"}
    cond = {(s, i): o for b, s, i, o in records if b == "window_cond"}
    uncond = {(s, i): o for b, s, i, o in records if b == "window_uncond"}
    assert len(cond) == steps * n_blocks
    for (s, i), out in cond.items():
        guide = max(g for g in guides if g <= s)
        assert torch.equal(out, full[(guide, i)]), (s, i)  # guide steps: F's output; others: the cached one
    # the cache is really reused: F's output changes between guide steps, the conditional W output does not
    assert not torch.equal(full[(0, 0)], full[(guides[1], 0)])
    assert torch.equal(cond[(1, 0)], cond[(2, 0)])
    assert not torch.equal(uncond[(1, 0)], cond[(1, 0)])
    # removed: no hook left, the transformer is stock again
    assert not any(
        name.startswith("dit_accel.freeswim")
        for mod in transformer.modules()
        for name in getattr(getattr(mod, "_diffusers_hook", None), "hooks", {})
    )


def test_cache_every_1_full_window_equals_plain_video_to_video(tiny) -> None:
    pipe, fs, kwargs = tiny
    latents = torch.randn(1, 16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    common = dict(
        height=H, width=W, num_inference_steps=6, prompt_embeds=kwargs["prompt_embeds"],
        negative_prompt_embeds=kwargs["negative_prompt_embeds"], guidance_scale=5.0, output_type="latent",
    )  # fmt: skip
    plain = _refiner(pipe)(latents=latents, strength=0.5, **common)[0]
    full = FreeSwimOptions(
        base_height=BASE, base_width=BASE, strength=0.5, cache_every=1, window_size=(16, 16), attention_scale=False
    )
    ours = fs.refine(latents, full, **common)
    assert fs.last_stats["window_block_density"] == pytest.approx(1.0)
    assert fs.last_stats["full_forwards"] == 3
    torch.testing.assert_close(ours, plain, atol=1e-4, rtol=1e-4)
    # control: the real window (8 x 8 of 16 x 16) changes the result, so the comparison above can fail
    windowed = fs.refine(latents, FreeSwimOptions(base_height=BASE, base_width=BASE, strength=0.5, cache_every=1,
                                                  attention_scale=False, tile=(1, 4, 16)), **common)  # fmt: skip
    assert (windowed - plain).abs().max() > 1e-3


def test_full_call_equals_base_upscale_and_plain_refinement(tiny) -> None:
    pipe, fs, kwargs = tiny
    kw = dict(kwargs, height=128, width=128, num_frames=5, num_inference_steps=4)
    opts = FreeSwimOptions(base_height=64, base_width=64, strength=0.5, cache_every=1, upscale="latents",
                           window_size=(8, 8), attention_scale=False)  # fmt: skip
    ours = fs(**kw, base_height=64, base_width=64, strength=0.5, cache_every=1, upscale="latents",
              window_size=(8, 8), attention_scale=False, generator=torch.Generator().manual_seed(7)).frames  # fmt: skip
    gen = torch.Generator().manual_seed(7)
    base = pipe(**dict(kw, height=64, width=64), generator=gen).frames
    assert base.shape[-2:] == (8, 8)
    v2v = _refiner(pipe)
    noisy = fs.prepare_refinement(base, opts, height=128, width=128, num_inference_steps=4, generator=gen, refiner=v2v)
    ref = v2v(latents=noisy, strength=0.5, height=128, width=128, num_inference_steps=4, guidance_scale=5.0,
              prompt_embeds=kwargs["prompt_embeds"], negative_prompt_embeds=kwargs["negative_prompt_embeds"],
              output_type="latent").frames  # fmt: skip
    assert ours.shape == (1, 16, 2, 16, 16)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert upscale_latents(base, 16, 16).shape == (1, 16, 2, 16, 16)


def test_batch_2_and_50_steps(tiny) -> None:
    pipe, fs, kwargs = tiny
    embeds = torch.cat([kwargs["prompt_embeds"], kwargs["prompt_embeds"].flip(1)])
    negative = kwargs["negative_prompt_embeds"].expand(2, -1, -1)
    latents = torch.randn(2, 16, 2, 16, 32, generator=torch.Generator().manual_seed(9))
    opts = FreeSwimOptions(base_height=64, base_width=128, strength=1.0, cache_every=4, cache_dtype="bfloat16",
                           cache_offload=True)  # fmt: skip
    out = fs.refine(latents, opts, height=128, width=256, num_inference_steps=50, prompt_embeds=embeds,
                    negative_prompt_embeds=negative, output_type="latent")  # fmt: skip
    stats = fs.last_stats
    n_blocks = len(pipe.transformer.blocks)
    assert out.shape == (2, 16, 2, 16, 32) and bool(torch.isfinite(out).all())
    assert stats["steps"] == 50 and stats["guide_steps"] == list(range(0, 50, 4))
    assert stats["full_self_attention_calls"] == 13 * n_blocks
    assert stats["cache_dtype"] == "bfloat16" and stats["cache_device"] == "cpu"
    assert stats["cache_bytes_peak"] == n_blocks * 2 * 256 * 32 * 2
    assert not torch.equal(out[0], out[1])
    # the whole pipeline with a batch of two prompts and the default frame upscale
    video = fs(prompt_embeds=embeds, negative_prompt_embeds=negative, height=128, width=128, num_frames=5,
               num_inference_steps=3, base_height=64, base_width=64, strength=0.7, output_type="pt",
               generator=torch.Generator().manual_seed(1)).frames  # fmt: skip
    assert video.shape == (2, 5, 3, 128, 128)


def test_base_pass_keeps_an_installed_accelerator_and_refinement_bypasses_it(tiny) -> None:
    pipe, fs, kwargs = tiny
    handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=0)
    try:
        fs(**dict(kwargs, height=128, width=128, num_frames=5, num_inference_steps=3), base_height=64,
           base_width=64, upscale="latents", generator=torch.Generator().manual_seed(2))  # fmt: skip
        overall = handle.stats()["overall"]
        n_blocks = len(pipe.transformer.blocks)
        # base pass only: 3 steps x (cond, uncond) x blocks; the refinement's attention never reached the site
        assert overall["sparse_calls"] + overall["dense_calls"] == 3 * 2 * n_blocks
        assert fs.last_stats["window_calls"] > 0
    finally:
        handle.remove()


def test_maybe_freeswim_and_small_targets(tiny) -> None:
    pipe, fs, kwargs = tiny
    same, kw = maybe_freeswim(pipe, dict(height=128, width=128), None, None)
    assert same is pipe and "base_height" not in kw
    same, kw = maybe_freeswim(pipe, dict(height=128, width=128), 128, 128)
    assert same is pipe
    swim, kw = maybe_freeswim(pipe, dict(height=256, width=128), 128, None)
    assert isinstance(swim, FreeSwimPipeline) and kw["base_height"] == 128 and kw["base_width"] == 128
    assert swim.transformer is pipe.transformer
    with pytest.raises(ValueError, match="Wan"):
        maybe_freeswim(object(), dict(height=256, width=256), 128, 128)
    # a target within the base resolution is the plain Wan pass
    kw = dict(kwargs, height=64, width=64, num_frames=5, num_inference_steps=2)
    ours = fs(**kw, base_height=64, base_width=64, generator=torch.Generator().manual_seed(4)).frames
    ref = pipe(**kw, generator=torch.Generator().manual_seed(4)).frames
    torch.testing.assert_close(ours, ref)
    assert fs.last_stats is None


def test_force_branch_for_benchmarks(tiny) -> None:
    pipe, _, kwargs = tiny
    hooks = FreeSwimHooks(pipe.transformer, (8, 8), FreeSwimOptions(tile=(1, 4, 16)))
    hooks.force_branch = Branch.WINDOW_UNCOND
    x = torch.randn(1, 16, 3, 32, 32)
    args = dict(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=kwargs["prompt_embeds"],
                return_dict=False)  # fmt: skip
    with torch.no_grad():
        dense = pipe.transformer(**args)[0]
        with hooks:
            window = pipe.transformer(**args)[0]
        again = pipe.transformer(**args)[0]
    assert hooks.stats.window_calls == len(pipe.transformer.blocks)
    assert not torch.allclose(window, dense, atol=1e-4)
    torch.testing.assert_close(again, dense, atol=0, rtol=0)


def test_cli_render_uses_freeswim_above_the_base(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from dit_accel.cli import app

    out = tmp_path / "hires.gif"
    args = ["render", "--model", "tiny-wan", "--steps", "3", "--frames", "5", "--height", "128", "--width", "128",
            "--no-progress", "--json", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--base-height", "64", "--base-width", "64", "--cache-every", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["frames"] == 5 and out.exists()
    assert summary["freeswim"]["window"] == [2, 4, 4] and summary["freeswim"]["guide_steps"] == [0, 1]
    bad = CliRunner().invoke(app, [*args, "--base-height", "64", "--strength", "0"])
    assert bad.exit_code != 0 and "strength" in bad.output
