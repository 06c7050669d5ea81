"""Every supported family on a tiny random-weight pipeline: dense is exact, block top-k runs at the asked density."""

import json
import math

import pytest
import torch

import dit_accel
from dit_accel.testing import tiny_pipeline

FAMILIES = ["wan", "wan_i2v", "cogvideox", "hunyuan_video", "ltx_video", "pixart", "flux"]
EXPECTED_SITES = {"wan": 2, "wan_i2v": 2, "cogvideox": 2, "hunyuan_video": 2, "ltx_video": 2, "pixart": 2, "flux": 2}


def run(pipe, kwargs, seed=0):
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(seed))
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
    if family in ("cogvideox", "hunyuan_video", "flux"):
        assert overall["block_density"] > video  # text rows stay dense
    assert torch.equal(run(pipe, kwargs), base)


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


@pytest.mark.parametrize("family", ["cogvideox", "hunyuan_video", "flux"])
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
