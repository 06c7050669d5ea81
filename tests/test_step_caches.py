"""dit_accel stacked with diffusers' step caches (``transformer.enable_cache``) on one pipeline, in both orders.

FirstBlockCache skips whole blocks (hooks on the blocks), PyramidAttentionBroadcast reuses attention outputs
(hooks on the very attention modules our sites hook). Removing either leaves the other working, and
``stats()`` counts the attention calls the cache skipped (``skipped_calls``).
"""

import pytest
import torch
from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

import dit_accel
from dit_accel.testing import tiny_pipeline

STEPS = 4
FORWARDS = 2 * STEPS  # CFG: a cond and an uncond forward per step


def run(pipe, kwargs):
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames


def cache_config(kind, pipe):
    if kind == "first_block":
        return FirstBlockCacheConfig(threshold=1e9)  # must skip: every step after each branch's first
    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 10_000),
        current_timestep_callback=lambda: pipe.current_timestep,
    )


@pytest.fixture(scope="module")
def wan():
    pipe, kwargs = tiny_pipeline("wan")
    kwargs["num_inference_steps"] = STEPS
    base = run(pipe, kwargs)
    sparse = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64)
    accelerated = run(pipe, kwargs)
    sparse.remove()
    cached = {}
    for kind in ("first_block", "pyramid"):
        pipe.transformer.enable_cache(cache_config(kind, pipe))
        cached[kind] = run(pipe, kwargs)
        pipe.transformer.disable_cache()
    assert torch.equal(run(pipe, kwargs), base)
    return pipe, kwargs, base, accelerated, cached


@pytest.mark.parametrize("kind", ["first_block", "pyramid"])
def test_dense_under_a_cache_is_exact_and_counts_the_skipped_calls(wan, kind):
    pipe, kwargs, base, _, cached = wan
    assert not torch.equal(cached[kind], base)  # the cache does skip work
    pipe.transformer.enable_cache(cache_config(kind, pipe))
    with dit_accel.accelerate(pipe, "dense", min_tokens=64) as handle:
        out = run(pipe, kwargs)
        stats = handle.stats()
        pipe.transformer.disable_cache()
        assert torch.equal(run(pipe, kwargs), base)  # our sites still see every call without the cache
        after = handle.stats()["overall"]
    assert torch.equal(out, cached[kind])  # tolerance: bit-exact, dense through the plugin
    overall, sites = stats["overall"], stats["sites"]
    assert overall["dense_calls"] + overall["skipped_calls"] == FORWARDS * len(sites)
    if kind == "first_block":  # block 0 always runs; block 1 only at each branch's first step
        assert sites["transformer.blocks.0.attn1"]["skipped_calls"] == 0
        assert sites["transformer.blocks.1.attn1"]["skipped_calls"] == FORWARDS - 2
    else:  # every second call of each attention module is broadcast
        assert overall["skipped_calls"] == FORWARDS * len(sites) // 2
    assert after["skipped_calls"] == overall["skipped_calls"]  # nothing skipped without the cache
    assert after["dense_calls"] == overall["dense_calls"] + FORWARDS * len(sites)


@pytest.mark.parametrize("kind", ["first_block", "pyramid"])
@pytest.mark.parametrize("order", ["cache_first", "accelerate_first"])
def test_either_can_be_removed_and_the_other_keeps_working(wan, kind, order):
    pipe, kwargs, base, accelerated, cached = wan
    if order == "cache_first":
        pipe.transformer.enable_cache(cache_config(kind, pipe))
        handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64)
    else:
        handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64)
        pipe.transformer.enable_cache(cache_config(kind, pipe))
    both = run(pipe, kwargs)
    assert handle.stats()["overall"]["skipped_calls"] > 0 and handle.stats()["overall"]["sparse_calls"] > 0
    assert not torch.equal(both, cached[kind]) and not torch.equal(both, accelerated)
    pipe.transformer.disable_cache()
    assert torch.equal(run(pipe, kwargs), accelerated)  # the sparse attention alone
    pipe.transformer.enable_cache(cache_config(kind, pipe))
    assert torch.equal(run(pipe, kwargs), both)
    handle.remove()
    assert torch.equal(run(pipe, kwargs), cached[kind])  # the cache alone
    pipe.transformer.disable_cache()
    assert torch.equal(run(pipe, kwargs), base)
