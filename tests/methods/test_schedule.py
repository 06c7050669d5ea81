"""Schedule and caches on a tiny Wan pipeline: pattern reuse, per-generation reset, CFG branches, memory knobs."""

from __future__ import annotations

import pytest
import torch

import dit_accel
from dit_accel.config import resolve_config
from dit_accel.methods import CacheBudgetError
from dit_accel.testing import tiny_pipeline


@pytest.fixture(scope="module")
def wan():
    pipe, kwargs = tiny_pipeline("wan")
    kwargs["num_inference_steps"] = 4
    return pipe, kwargs


def _run(pipe, kwargs, seed=0):
    return pipe(**kwargs, generator=torch.Generator().manual_seed(seed)).frames


def test_pattern_reused_for_the_configured_steps(wan):
    pipe, kwargs = wan
    with dit_accel.accelerate(pipe, "blocktopk", min_tokens=64, reuse_pattern_every=3) as handle:
        _run(pipe, kwargs)
        stats = handle.stats()
    # 2 sites x 2 CFG branches, 4 steps: built at steps 0 and 3, reused at 1 and 2
    assert stats["overall"]["pattern_builds"] == 8 and stats["overall"]["pattern_reuses"] == 8
    for site in stats["sites"].values():
        assert site["pattern_builds"] == 4 and site["pattern_reuses"] == 4


def test_static_pattern_built_once_per_generation_and_branch(wan):
    pipe, kwargs = wan
    with dit_accel.accelerate(pipe, "window", min_tokens=64) as handle:
        _run(pipe, kwargs)
        _run(pipe, kwargs, seed=1)
        stats = handle.stats()["overall"]
    # reset per generation: 2 generations x 2 sites x 2 branches builds, the other 3 steps reuse
    assert stats["pattern_builds"] == 8 and stats["pattern_reuses"] == 24


def test_cfg_branches_never_share_state(wan):
    pipe, kwargs = wan
    handle = dit_accel.accelerate(pipe, "rettention", min_tokens=64, dense_steps=0, cache_dtype="float32")
    method = next(iter(handle._accelerators.values())).method
    seen: dict[tuple[int, str], list] = {}
    original = method.attend

    def spy(call):
        result = original(call)
        entry = (id(call.cache), call.cache.statistics.residual)
        seen.setdefault((call.site_index, call.state.branch), []).append(entry)
        return result

    method.attend = spy
    try:
        _run(pipe, kwargs)
        stats = handle.stats()["overall"]
    finally:
        handle.remove()
    assert {b for _, b in seen} == {"cond", "uncond"}
    for site in (0, 1):
        cond, uncond = seen[(site, "cond")], seen[(site, "uncond")]
        assert len({c for c, _ in cond}) == 1 and len({c for c, _ in uncond}) == 1  # one cache per branch...
        assert cond[0][0] != uncond[0][0]  # ...never the same one
        assert cond[-1][1] is not uncond[-1][1]
    # layer 0's self-attention runs before any text enters, so only the last layer's residuals must differ
    assert not torch.equal(seen[(1, "cond")][-1][1], seen[(1, "uncond")][-1][1])
    # one refresh per site and branch (refresh_every=5 > 4 steps), the rest sparse; the residual was reported
    assert stats["refresh_calls"] == 4 and stats["sparse_calls"] == 12
    assert stats["cache_bytes_peak"] > 0


def test_cache_dtype_offload_and_budget(wan):
    pipe, kwargs = wan
    peaks = {}
    for dtype in ("float32", "bfloat16"):
        with dit_accel.accelerate(pipe, "rettention", min_tokens=64, cache_dtype=dtype, cache_offload=True) as h:
            _run(pipe, kwargs)
            peaks[dtype] = h.stats()["overall"]["cache_bytes_peak"]
    assert peaks["bfloat16"] < peaks["float32"]
    # residual per site and branch: B x N x C = 1 x 768 x 32 floats
    with dit_accel.accelerate(pipe, "rettention", min_tokens=64, cache_budget_mb=0.15, cache_dtype="float32"):
        with pytest.raises(CacheBudgetError, match="cache_budget_mb=0.15"):
            _run(pipe, kwargs)
    with dit_accel.accelerate(pipe, "rettention", min_tokens=64, cache_budget_mb=1.0, cache_dtype="float32"):
        _run(pipe, kwargs)


@pytest.mark.parametrize(
    "options, words",
    [
        ({"pattern": "diagonal"}, ["pattern", "diagonal", "inward"]),
        ({"compensation": "magic"}, ["compensation", "magic", "reshape"]),
        ({"tau": 0.0}, ["tau", "0.0", "(0, 1]"]),
        ({"negligible": 1.0}, ["negligible", "[0, 1)"]),
        ({"window": (1, 0, 2)}, ["window", "positive"]),
        ({"reuse_pattern_every": 0}, ["reuse_pattern_every", ">= 1"]),
        ({"refresh_every": -1}, ["refresh_every", "non-negative"]),
        ({"vmoba_chunks": ((7,), (6,), (3, 6, 4))}, ["vmoba_chunks", "(rows, cols)"]),
        ({"vmoba_topk": (2, 0, 1)}, ["vmoba_topk"]),
        ({"cache_dtype": "int8"}, ["cache_dtype", "int8", "bfloat16"]),
        ({"cache_budget_mb": -1}, ["cache_budget_mb"]),
        ({"raster_fraction": 0.0}, ["raster_fraction"]),
    ],
)
def test_bad_options_name_parameter_value_and_allowed(options, words):
    with pytest.raises(ValueError) as err:
        resolve_config("sla", **options)
    for word in words:
        assert word in str(err.value)


def test_presets_are_documented():
    from dit_accel.methods import PRESET_DOCS

    for name in dit_accel.METHODS:
        assert name in PRESET_DOCS
        resolve_config(name)
