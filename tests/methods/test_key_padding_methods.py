"""The composed methods with a key-padding mask (``SiteCall.key_padding``), as HunyuanVideo's padded prompt gives.

Layout as HunyuanVideo's: video tokens first, then the text, whose tail is padding. Batch 0 has a fully masked last
key block and a partly masked one, batch 1 a shorter padding and masked video tokens, batch 2 every key masked
(SDPA answers 0).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _method_helpers import make_call, qkv, run_method

from dit_accel import kernels
from dit_accel.config import resolve_config
from dit_accel.layout import TokenLayout
from dit_accel.methods import build_method

LAYOUT = TokenLayout(grid=(2, 8, 24), text_tokens=100, text_first=False)  # 384 video + 100 text = 484 tokens
FULL = {
    "topk": dict(pattern="topk", sparsity=0.0),
    "threshold_row": dict(pattern="threshold", tau=1.0),
    "inward": dict(pattern="inward", sparsity=0.0),
    "raster": dict(pattern="raster", raster_fraction=1.0),
    "vmoba_topk": dict(pattern="vmoba", vmoba_topk=(99, 99, 99)),
    "vmoba_token_topk": dict(pattern="vmoba", vmoba_gate="token", vmoba_topk=(99, 99, 99)),
}


def padding(n: int) -> torch.Tensor:
    kp = torch.ones(3, n, dtype=torch.bool)
    kp[0, 384 + 20 :] = False  # 20 real text tokens: block 6 (384..447) partly, block 7 (448..483) fully masked
    kp[1, 384 + 90 :] = False
    kp[1, :40] = False  # masked video tokens in a block that stays (the pooled key mean must skip them)
    kp[2] = False
    return kp


def masked_sdpa(q, k, v, kp):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=kp[:, None, None, :])


def attend(method_name, q, k, v, kp, *, step=0, cache=None, site_index=0, **options):
    cfg = resolve_config(method_name, **options)
    call = make_call(q, k, v, cfg, layout=LAYOUT, step=step, cache=cache, site_index=site_index)
    call.key_padding = kp
    return call, build_method(cfg).attend(call)


@pytest.mark.parametrize("name", list(FULL))
@pytest.mark.parametrize("compensation", ["none", "linear", "reshape"])
def test_full_coverage_with_key_padding_is_masked_sdpa(rng, name, compensation):
    """Every live block kept: the sparse path must be SDPA with the boolean mask, fully masked rows (0) included;
    the fully masked key block is out of the pattern (density below 1), and SLA's kept mass counts no masked key."""
    q, k, v = qkv(rng, 3, 2, LAYOUT.total_tokens)
    kp = padding(LAYOUT.total_tokens)
    want = masked_sdpa(q, k, v, kp)
    if compensation == "linear" and FULL[name].get("vmoba_gate") == "token":  # refused: see test_paper_vmoba
        with pytest.raises(ValueError, match="vmoba_gate='token'"):
            resolve_config("blocktopk", compensation=compensation, **FULL[name])
        return
    for site in range(3) if name.startswith("vmoba") else (0,):
        refresh = 2 if compensation == "reshape" else 0
        call, result = attend(
            "blocktopk", q, k, v, kp, site_index=site, compensation=compensation, refresh_every=refresh, **FULL[name]
        )
        assert result.kind == ("refresh" if refresh else "sparse")
        torch.testing.assert_close(result.out.double(), want, atol=2e-5, rtol=1e-5)
        alive = kernels.key_blocks_alive(kp, call.config.block_n)  # (B, n_k)
        if not refresh:  # a refresh reports density 1
            assert float(result.density) == pytest.approx(float(alive.float().mean()))
        listed = kernels.reference.selected_block_mask(call.cache.pattern.kv_indices, call.cache.pattern.kv_counts, 8)
        assert not (listed & ~alive[:, None, None, :]).any()
        if compensation == "reshape":  # the sparse step after the refresh: rho = 1, R = 0
            nxt = make_call(q, k, v, call.config, layout=LAYOUT, step=1, cache=call.cache, site_index=site)
            nxt.key_padding = kp
            out = build_method(call.config).attend(nxt)
            assert out.kind == "sparse"
            torch.testing.assert_close(out.out.double(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("blocktopk", dict(sparsity=0.5)),
        ("sla", dict(sparsity=0.5)),  # tiled top-k, linear branch weighted by the estimated kept mass
        ("sla", dict(sparsity=0.5, refresh_every=2)),  # the kept mass measured at a refresh instead
        ("sla-paper", dict(sparsity=0.5, negligible=0.25)),
        ("rettention", dict(sparsity=0.5, refresh_every=2)),
        ("vmoba", dict(sparsity=0.5, refresh_every=2)),
    ],
)
def test_masked_keys_do_not_matter(rng, method, options):
    """Whatever the masked keys hold, the output is the same: patterns (pooled means, chunk means), the sparse
    kernel, the linear branch, the kept mass and the refresh statistics all ignore them."""
    q, k, v = qkv(rng, 3, 2, LAYOUT.total_tokens)
    kp = padding(LAYOUT.total_tokens)
    k2, v2 = k.clone(), v.clone()
    hidden = ~kp[:, None, :, None].expand_as(k)
    k2[hidden] = torch.randn(int(hidden.sum()), generator=rng) * 30.0
    v2[hidden] = torch.randn(int(hidden.sum()), generator=rng) * 30.0
    outs = []
    for kk, vv in ((k, v), (k2, v2)):
        call, first = attend(method, q, kk, vv, kp, **options)
        nxt = make_call(q, kk, vv, call.config, layout=LAYOUT, step=1, cache=call.cache)
        nxt.key_padding = kp
        second = build_method(call.config).attend(nxt)
        assert second.kind == "sparse"
        outs.append((first.out, second.out))
    for a, b in zip(*outs):
        assert torch.isfinite(a).all()
        assert torch.all(a[2] == 0)  # every key masked
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_key_padding_follows_the_tile_permutation(rng):
    """A tiled pattern reorders the tokens; the key padding must be reordered with them (a padded video token is
    masked wherever the tile order puts it)."""
    layout = TokenLayout(grid=(2, 8, 12))
    n = layout.total_tokens
    q, k, v = qkv(rng, 1, 2, n)
    kp = torch.rand(1, n, generator=rng) < 0.8
    cfg = resolve_config("blocktopk", pattern="topk", tiled=True, sparsity=0.0)
    call = make_call(q, k, v, cfg, layout=layout)
    call.key_padding = kp
    method = build_method(cfg)
    assert method.plan(call).perm is not None
    out = method.attend(call).out
    torch.testing.assert_close(out.double(), masked_sdpa(q, k, v, kp), atol=2e-5, rtol=1e-5)
    assert math.isfinite(float(out.abs().sum()))


def test_without_key_padding_nothing_changes(rng):
    q, k, v = qkv(rng, 1, 2, LAYOUT.total_tokens)
    _, _, plain = run_method("blocktopk", q, k, v, layout=LAYOUT, sparsity=0.5)
    _, masked = attend("blocktopk", q, k, v, torch.ones(1, LAYOUT.total_tokens, dtype=torch.bool), sparsity=0.5)
    torch.testing.assert_close(masked.out, plain.out, atol=1e-6, rtol=1e-6)
