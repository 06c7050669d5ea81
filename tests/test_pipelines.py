"""Every supported family on a tiny random-weight pipeline: dense is exact, block top-k runs at the asked density."""

import json
import math

import pytest
import torch

import dit_accel
from dit_accel.testing import tiny_pipeline

FAMILIES = [
    "wan", "wan_i2v", "cogvideox", "hunyuan_video", "ltx_video", "pixart", "flux", "cosmos", "mochi", "ltx2_video",
    "hunyuan_video15",
]  # fmt: skip
EXPECTED_SITES = {
    "wan": 2, "wan_i2v": 2, "cogvideox": 2, "hunyuan_video": 2, "ltx_video": 2, "pixart": 2, "flux": 2,
    "cosmos": 2, "mochi": 2, "ltx2_video": 2, "hunyuan_video15": 2,
}  # fmt: skip
JOINT = ("cogvideox", "hunyuan_video", "flux", "mochi", "hunyuan_video15", "flux2", "minimax_h3")
# Wan 2.2 (two experts), Wan VACE, Wan Animate, SkyReels-V2 (plain and diffusion forcing), Flux 2
FAMILIES += ["wan22", "wan_vace", "wan_animate", "skyreels_v2", "skyreels_v2_df", "flux2"]
EXPECTED_SITES.update(wan22=4, wan_vace=4, wan_animate=2, skyreels_v2=2, skyreels_v2_df=2, flux2=2)
# MiniMax-H3: its modular pipeline's fl2va denoise chain (text, a keyframe and audio before the target video)
FAMILIES += ["minimax_h3"]
EXPECTED_SITES.update(minimax_h3=2)
#: the self-attention modules each newer family hooks, by name: VACE's control blocks too, never Animate's face
#: adapter (cross-attention to motion tokens) nor any attn2
SITE_NAMES = {
    "wan22": [f"{c}.blocks.{i}.attn1" for c in ("transformer", "transformer_2") for i in range(2)],
    "wan_vace": [f"transformer.{b}.{i}.attn1" for b in ("blocks", "vace_blocks") for i in range(2)],
    "wan_animate": ["transformer.blocks.0.attn1", "transformer.blocks.1.attn1"],
    "skyreels_v2": ["transformer.blocks.0.attn1", "transformer.blocks.1.attn1"],
    "skyreels_v2_df": ["transformer.blocks.0.attn1", "transformer.blocks.1.attn1"],
    "flux2": ["transformer.transformer_blocks.0.attn", "transformer.single_transformer_blocks.0.attn"],
    # the blocks' attn, never the text token refiner's (token_refiner.refiner_blocks.*.attn)
    "minimax_h3": ["transformer.transformer_blocks.0.attn", "transformer.transformer_blocks.1.attn"],
}


def run(pipe, kwargs, seed=0):
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(seed))
    if isinstance(out, torch.Tensor):  # a modular pipeline's output="latents" (MiniMax-H3)
        return out
    return out.frames if hasattr(out, "frames") else out.images


@pytest.fixture(scope="module", params=FAMILIES)
def family_pipe(request):
    pipe, kwargs = tiny_pipeline(request.param)
    return request.param, pipe, kwargs, run(pipe, kwargs)


def test_dense_is_exact_and_remove_restores(family_pipe):
    family, pipe, kwargs, base = family_pipe
    with dit_accel.accelerate(pipe, "dense", min_tokens=64) as handle:
        out = run(pipe, kwargs)
        stats = handle.stats()
    assert torch.equal(out, base)  # tolerance: bit-exact, the dense path calls the same SDPA
    assert len(stats["sites"]) == EXPECTED_SITES[family]
    assert stats["overall"]["dense_reasons"] == {"method": stats["overall"]["dense_calls"]}
    assert stats["overall"]["dense_calls"] > 0 and stats["overall"]["sparse_calls"] == 0
    assert stats["overall"]["skipped_calls"] == 0  # every site runs in every forward when no step cache skips
    assert not handle.active
    assert torch.equal(run(pipe, kwargs), base)


def test_blocktopk_runs_at_requested_density(family_pipe):
    family, pipe, kwargs, base = family_pipe
    handle = dit_accel.accelerate(pipe, "blocktopk", sparsity=0.75, min_tokens=64)
    out = run(pipe, kwargs)
    stats = handle.stats()
    handle.remove()
    json.dumps(stats)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, base)
    overall = stats["overall"]
    assert overall["dense_calls"] == 0 and overall["sparse_calls"] > 0
    video = overall["video_block_density"]
    # video query blocks keep round(0.25 * n_k) of n_k key blocks (text columns count among them)
    assert video == pytest.approx(0.25, abs=0.05)
    if family in JOINT:
        assert overall["block_density"] > video  # text rows stay dense
    if family in SITE_NAMES:
        assert list(stats["sites"]) == SITE_NAMES[family]
        assert all(site["sparse_calls"] > 0 for site in stats["sites"].values())  # each reached the interception
    assert torch.equal(run(pipe, kwargs), base)


def test_timestep_scale_gives_the_schedulers_timesteps(family_pipe):
    """The step is found by matching the forward's timestep (times the family's scale) against
    ``scheduler.timesteps`` when no cache context names it (Cosmos opens none): every forward must match one.
    MiniMax-H3 passes one timestep per noise level: the family's ``step_timestep`` (the target video's) is read."""
    from dit_accel.pipelines.families import find_family

    family, pipe, kwargs, base = family_pipe
    adapter = find_family(pipe.transformer)
    pick = adapter.step_timestep or (lambda kw: kw["timestep"])
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(float(pick(kw).flatten()[0]) * adapter.timestep_scale), with_kwargs=True
    )
    try:
        run(pipe, kwargs)
    finally:
        hook.remove()
    timesteps = pipe.scheduler.timesteps.tolist()
    assert seen and all(min(abs(t - s) for s in timesteps) <= 1e-3 * max(1.0, abs(t)) for t in seen), (seen, timesteps)


def test_only_self_attention_is_intercepted():
    pipe, kwargs = tiny_pipeline("wan")
    handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64)
    names = list(handle.stats()["sites"])
    handle.remove()
    assert names == ["transformer.blocks.0.attn1", "transformer.blocks.1.attn1"]


def test_step_schedule_counts_and_branches():
    pipe, kwargs = tiny_pipeline("wan")
    handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64, dense_steps=1, dense_layers="1")
    run(pipe, kwargs)
    stats = handle.stats()
    handle.remove()
    steps, layers, branches = kwargs["num_inference_steps"], 2, 2
    reasons = stats["overall"]["dense_reasons"]
    # layer 1 is dense at every step; layer 0 is dense at step 0 only (the layer reason is checked first)
    assert reasons == {"dense_layer": steps * branches, "dense_step": 1 * branches}
    assert stats["overall"]["sparse_calls"] == (steps - 1) * branches * (layers - 1)
    per_site = stats["sites"]
    assert per_site["transformer.blocks.1.attn1"]["sparse_calls"] == 0


@pytest.mark.parametrize("method", ["blocktopk", "sla", "rettention"])
def test_attention_work_counts_dense_calls_density_and_the_extra_work(method):
    # the measure: dense and refresh calls 1, sparse calls their block density, plus pattern building and
    # the linear branch; a planted "work = block density" (the old effective density) fails for sla
    pipe, kwargs = tiny_pipeline("wan")
    handle = dit_accel.accelerate(pipe, method, min_tokens=64, dense_steps=1)
    run(pipe, kwargs)
    overall = handle.stats()["overall"]
    sites = handle.stats()["sites"].values()
    handle.remove()
    dense, sparse, refresh = overall["dense_calls"], overall["sparse_calls"], overall["refresh_calls"]
    base = (dense + overall["block_density"] * (sparse + refresh)) / (dense + sparse + refresh)
    work = overall["attention_work"]
    assert all(s["attention_work"] is not None for s in sites)
    if method == "sla":  # the linear branch of every sparse call is counted on top of the kept blocks
        assert work > base + 1e-4
    else:
        assert base <= work < base + 0.01
    assert work <= 1.0


def test_min_tokens_keeps_short_sequences_dense():
    pipe, kwargs = tiny_pipeline("wan")
    with dit_accel.accelerate(pipe, "blocktopk", min_tokens=10_000) as handle:
        run(pipe, kwargs)
        reasons = handle.stats()["overall"]["dense_reasons"]
    assert set(reasons) == {"min_tokens"}


def test_density_scales_with_sparsity():
    pipe, kwargs = tiny_pipeline("wan")
    densities = []
    for sparsity in (0.5, 0.9):
        with dit_accel.accelerate(pipe, "blocktopk", sparsity=sparsity, min_tokens=64) as handle:
            run(pipe, kwargs)
            densities.append(handle.stats()["overall"]["block_density"])
    n_k = math.ceil(768 / 64)
    assert densities[0] == pytest.approx(round(0.5 * n_k) / n_k)
    assert densities[1] == pytest.approx(max(1, round(0.1 * n_k)) / n_k)


@pytest.mark.parametrize("family", JOINT)
def test_joint_attention_without_a_layout_stays_dense(family):
    # bug: with no token layout the text tokens of joint attention were sparsified like video tokens
    import dataclasses

    pipe, kwargs = tiny_pipeline(family)
    handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64)
    acc = handle.accelerators["transformer"]
    acc.family = dataclasses.replace(acc.family, grid=lambda model, bound: None)  # the grid cannot be read
    run(pipe, kwargs)
    stats = handle.stats()
    handle.remove()
    assert stats["overall"]["sparse_calls"] == 0
    assert set(stats["overall"]["dense_reasons"]) == {"no_layout"}


def test_mochi_samples_keep_their_own_pattern():
    """Mochi calls SDPA once per sample (779 and 771 tokens here): each call order keeps its own per-branch state.
    Before, the two shared one and every call refreshed for the shape change, so no call ever reused a pattern."""
    pipe, kwargs = tiny_pipeline("mochi")
    with dit_accel.accelerate(pipe, "rettention", min_tokens=64, dense_steps=1) as handle:
        run(pipe, dict(kwargs, num_inference_steps=6))
        overall = handle.stats()["overall"]
    calls_per_step = 2 * 2  # sites x samples
    assert overall["dense_calls"] == calls_per_step  # step 0
    assert overall["refresh_calls"] == calls_per_step  # step 1: each (site, sample) builds its pattern once
    assert overall["sparse_calls"] == 4 * calls_per_step  # steps 2-5 reuse it
