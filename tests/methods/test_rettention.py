"""Re-ttention's statistical reshape against a brute-force masked-softmax computation."""

from __future__ import annotations

import pytest
import torch
from _method_helpers import brute_attention, make_call, qkv, token_mask_from_method

from dit_accel.config import resolve_config
from dit_accel.layout import TokenLayout
from dit_accel.methods import build_method
from dit_accel.schedule import resolve_drift
from dit_accel.site_state import BranchState

LAYOUT = TokenLayout(grid=(4, 8, 8))


def _steps(rng, **options):
    options.setdefault("pattern", "inward")
    cfg = resolve_config("rettention", min_tokens=0, **options)
    method = build_method(cfg)
    cache = BranchState()
    inputs = [qkv(rng, 2, 2, LAYOUT.total_tokens) for _ in range(4)]
    results = []
    for step, (q, k, v) in enumerate(inputs):
        call = make_call(q, k, v, cfg, layout=LAYOUT, step=step, cache=cache)
        results.append(method.attend(call))
        resolve_drift(cfg, [cache])  # what the site group does once per transformer forward
    return method, call, inputs, results, cache


def test_refresh_is_dense_and_rho_in_unit_interval(rng):
    _, _, inputs, results, cache = _steps(rng, refresh_every=5, pattern="inward", window=(1, 1, 2), tile=(1, 8, 8))
    q, k, v = inputs[0]
    reference, _ = brute_attention(q, k, v)
    assert results[0].kind == "refresh" and results[0].pattern_built
    torch.testing.assert_close(results[0].out.double(), reference, atol=2e-5, rtol=1e-5)
    rho = cache.statistics.rho
    assert bool((rho > 0).all()) and bool((rho <= 1).all()) and float(rho.min()) < 0.99
    assert [r.kind for r in results] == ["refresh", "sparse", "sparse", "sparse"]
    assert [r.pattern_built for r in results] == [True, False, False, False]


def _brute_force_rettention(method, call, inputs, ramp, clamp, update="none"):
    """rho and R from the refresh inputs with an explicit token mask; then O_c = rho_c softmax_S V + R_c, with
    R_c = R (``update`` none) or R + (1 - rho) (mean V_c - mean V_0) (``update`` mean)."""
    mask = token_mask_from_method(method, call)
    q0, k0, v0 = inputs[0]
    o_full, lse_full = brute_attention(q0, k0, v0)
    o_s0, lse_s0 = brute_attention(q0, k0, v0, mask)
    rho = torch.exp(lse_s0 - lse_full)
    residual = o_full - rho[..., None] * o_s0
    outs = []
    for uses, (q, k, v) in enumerate(inputs[1:]):
        o_s, _ = brute_attention(q, k, v, mask)
        rho_c = rho + ramp * uses
        if clamp:
            rho_c = rho_c.clamp(max=1.0)
        shift = (1 - rho)[..., None] * (v.double().mean(2) - v0.double().mean(2))[:, :, None, :]
        outs.append(rho_c[..., None] * o_s + residual + (shift if update == "mean" else 0))
    return outs


@pytest.mark.parametrize("update", ["none", "mean"])
def test_sparse_steps_match_brute_force_with_ramp_and_no_clamp(rng, update):
    method, call, inputs, results, _ = _steps(
        rng, refresh_every=9, window=(1, 1, 2), tile=(1, 8, 8), ramp=0.3, rho_clamp=False, cache_dtype="float32",
        residual_update=update,
    )  # fmt: skip
    want = _brute_force_rettention(method, call, inputs, ramp=0.3, clamp=False, update=update)
    for got, ref in zip(results[1:], want):
        torch.testing.assert_close(got.out.double(), ref, atol=2e-5, rtol=1e-5)


def test_mean_update_follows_values_that_shift_after_the_refresh(rng):
    # bug: the cached residual kept the refresh step's values; on the toy model every sparse step came out
    # brighter than dense. Values shifted by a constant c move exact attention by exactly c (softmax rows sum to
    # 1); the stale residual adds only rho * c, the mean update the rest (1 - rho) * c.
    q, k, v = qkv(rng, 1, 2, LAYOUT.total_tokens)
    c = torch.randn(1, 2, 1, v.shape[-1], generator=rng) * 3
    exact = brute_attention(q, k, v + c)[0]
    for update, exact_expected in (("mean", True), ("none", False)):
        cfg = resolve_config(
            "rettention", min_tokens=0, pattern="inward", window=(1, 1, 2), tile=(1, 8, 8), refresh_every=9,
            residual_update=update, cache_dtype="float32",
        )  # fmt: skip
        method, cache = build_method(cfg), BranchState()
        method.attend(make_call(q, k, v, cfg, layout=LAYOUT, step=0, cache=cache))
        got = method.attend(make_call(q, k, v + c, cfg, layout=LAYOUT, step=1, cache=cache))
        assert got.kind == "sparse"
        err = float((got.out.double() - exact).abs().max())
        assert (err < 1e-4) == exact_expected, (update, err)


def test_mean_update_ignores_padded_keys(rng):
    # a padded key's value must not move the mean: shifting only padded values changes nothing
    from dit_accel.methods.composed import value_mean

    v = torch.randn(2, 2, 8, 4, generator=rng)
    kp = torch.ones(2, 8, dtype=torch.bool)
    kp[:, 6:] = False
    moved = v.clone()
    moved[:, :, 6:] += 100.0
    torch.testing.assert_close(value_mean(moved, kp), value_mean(v, kp))
    torch.testing.assert_close(value_mean(v, kp), v[:, :, :6].mean(2))


def test_clamp_caps_the_ramped_rho_at_one(rng):
    method, call, inputs, results, _ = _steps(
        rng,
        refresh_every=9,
        window=(1, 1, 2),
        tile=(1, 8, 8),
        ramp=0.3,
        rho_clamp=True,
        cache_dtype="float32",
        residual_update="none",
    )
    want = _brute_force_rettention(method, call, inputs, ramp=0.3, clamp=True)
    unclamped = _brute_force_rettention(method, call, inputs, ramp=0.3, clamp=False)
    for got, ref in zip(results[1:], want):
        torch.testing.assert_close(got.out.double(), ref, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(want[-1], unclamped[-1])  # the clamp was active by the third sparse step


def test_raster_paper_preset_matches_brute_force(rng):
    layout = TokenLayout(grid=(2, 8, 16), text_tokens=16, text_first=True)
    cfg = resolve_config("rettention-paper", raster_fraction=0.25, cache_dtype="float32")
    method = build_method(cfg)
    cache = BranchState()
    inputs = [qkv(rng, 1, 2, layout.total_tokens) for _ in range(3)]
    outs = []
    for step, (q, k, v) in enumerate(inputs):
        call = make_call(q, k, v, cfg, layout=layout, step=step, cache=cache)
        outs.append(method.attend(call))
    want = _brute_force_rettention(method, call, inputs, ramp=0.04, clamp=False)
    for got, ref in zip(outs[1:], want):
        torch.testing.assert_close(got.out.double(), ref, atol=2e-5, rtol=1e-5)


def test_refresh_schedule_and_adaptive_refresh(rng):
    _, _, _, results, _ = _steps(rng, refresh_every=2, window=(1, 1, 2), tile=(1, 8, 8))
    assert [r.kind for r in results] == ["refresh", "sparse", "refresh", "sparse"]
    # random inputs every step drift a lot: a small threshold refreshes at the next call (the drift measured on
    # the device at a sparse call is read once per forward, so a refresh follows every sparse call)
    _, _, _, results, _ = _steps(rng, refresh_every=50, refresh_drift=1e-3, window=(1, 1, 2), tile=(1, 8, 8))
    assert [r.kind for r in results] == ["refresh", "sparse", "refresh", "sparse"]
    assert [r.adaptive for r in results] == [False, False, True, False]
    _, _, _, results, _ = _steps(rng, refresh_every=50, refresh_drift=1e3, window=(1, 1, 2), tile=(1, 8, 8))
    assert [r.kind for r in results] == ["refresh", "sparse", "sparse", "sparse"]


def test_statistics_of_another_shape_force_a_refresh(rng):
    # bug: rho and R of a batch-1 refresh were broadcast onto a batch-2 call of the same branch
    config = resolve_config("rettention", refresh_every=50, min_tokens=0)
    method = build_method(config)
    cache = BranchState()
    q, k, v = qkv(rng, 1, 2, 256)
    assert method.attend(make_call(q, k, v, config, step=1, cache=cache)).kind == "refresh"
    q2, k2, v2 = qkv(rng, 2, 2, 256)
    result = method.attend(make_call(q2, k2, v2, config, step=2, cache=cache))
    assert result.kind == "refresh"
    torch.testing.assert_close(result.out.double(), brute_attention(q2, k2, v2)[0], atol=1e-4, rtol=1e-4)
    q3, k3, v3 = qkv(rng, 2, 2, 192)  # another token count at the same batch
    assert method.attend(make_call(q3, k3, v3, config, step=3, cache=cache)).kind == "refresh"
    assert method.attend(make_call(q3, k3, v3, config, step=4, cache=cache)).kind == "sparse"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory needs CUDA")
def test_offloaded_residual_is_pinned_and_reused():
    # bug: cache_offload copied through pageable memory (every copy waited for the stream)
    config = resolve_config("rettention", refresh_every=1, min_tokens=0, cache_offload=True)
    method = build_method(config)
    cache = BranchState()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 64, device="cuda", generator=g) for _ in range(3))
    method.attend(make_call(q, k, v, config, step=1, cache=cache))
    first = cache.statistics.residual
    assert first.device.type == "cpu" and first.is_pinned()
    method.attend(make_call(q, k, v, config, step=2, cache=cache))
    assert cache.statistics.residual is first  # the next refresh writes into the same pinned buffer
    method.attend(make_call(q, k, v, config, step=2, cache=cache))  # a reshape step reads it back
    torch.cuda.synchronize()
