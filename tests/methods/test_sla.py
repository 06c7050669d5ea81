"""SLA: critical / marginal / negligible sets and the linear branch against brute force."""

from __future__ import annotations

import math

import pytest
import torch
from _method_helpers import brute_attention, qkv, run_method

from dit_accel import kernels
from dit_accel.compensation import combine_linear
from dit_accel.layout import TokenLayout
from dit_accel.patterns.scored import negligible_mask

LAYOUT = TokenLayout(grid=(4, 8, 8))


def brute_linear(q, k, v, key_mask, feature_map="softmax"):
    """phi(Q) (phi(K)^T V) / (phi(Q) sum phi(K)) restricted per query to ``key_mask`` (N, N) tokens."""
    if feature_map == "softmax":
        pq, pk = torch.softmax(q.double(), -1), torch.softmax(k.double(), -1)
    else:
        pq, pk = torch.nn.functional.elu(q.double()) + 1, torch.nn.functional.elu(k.double()) + 1
    w = torch.matmul(pq, pk.transpose(-1, -2)) * key_mask
    return torch.matmul(w, v.double()) / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("weight", ["proj", "mass"])
def test_all_critical_is_dense(rng, weight):
    q, k, v = qkv(rng, 1, 2, LAYOUT.total_tokens)
    _, _, result = run_method("sla", q, k, v, layout=LAYOUT, sparsity=0.0, linear_weight=weight)
    torch.testing.assert_close(result.out.double(), brute_attention(q, k, v)[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("feature_map", ["softmax", "elu"])
def test_no_critical_block_is_pure_linear_attention(rng, feature_map):
    q, k, v = qkv(rng, 1, 2, 200)
    n_q = math.ceil(200 / 64)
    idx = torch.zeros(1, 2, n_q, 4, dtype=torch.int32)
    counts = torch.zeros(1, 2, n_q, dtype=torch.int32)
    o_s, o_l, _ = kernels.sparse_linear_attention(q, k, v, idx, counts, block_m=64, block_n=64, feature_map=feature_map)
    want = brute_linear(q, k, v, torch.ones(200, 200), feature_map)
    torch.testing.assert_close(o_l.double(), want, atol=1e-5, rtol=1e-5)
    # with alpha = 0 (no kept mass) the combination is the linear branch alone
    out = combine_linear(o_s, o_l, None, torch.zeros(1, 2, 200))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_marginal_set_is_complement_of_critical_and_negligible(rng):
    q, k, v = qkv(rng, 1, 2, LAYOUT.total_tokens)
    _, call, result = run_method("sla-paper", q, k, v, layout=LAYOUT, sparsity=0.5, negligible=0.25, tiled=False)
    cache = call.cache
    n_k = 4
    critical = kernels.reference.selected_block_mask(cache.pattern.kv_indices, cache.pattern.kv_counts, n_k)
    negligible = cache.pattern.negligible
    assert int(negligible.sum(-1).max()) == 1 and not bool((critical & negligible).any())
    marginal = ~critical & ~negligible
    assert bool((critical | negligible | marginal).all())
    # the linear branch covers exactly the marginal keys
    token = torch.arange(LAYOUT.total_tokens) // 64
    o_s, o_l, _ = kernels.sparse_linear_attention(
        q, k, v, cache.pattern.kv_indices, cache.pattern.kv_counts, block_m=64, block_n=64, negligible=negligible
    )
    for h in range(2):
        key_mask = marginal[0, h][token][:, token].double()
        want = brute_linear(q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1], key_mask)
        rows = key_mask.sum(-1) > 0
        torch.testing.assert_close(o_l[0, h][rows].double(), want[0, 0][rows], atol=1e-5, rtol=1e-5)
        crit = critical[0, h][token][:, token]
        torch.testing.assert_close(o_s[0, h].double(), brute_attention(q[:, h], k[:, h], v[:, h], crit)[0][0],
                                   atol=2e-5, rtol=1e-5)  # fmt: skip
    # paper weighting with a zero proj: exactly the sparse branch
    torch.testing.assert_close(result.out, o_s.float(), atol=1e-6, rtol=1e-6)


def test_negligible_mask_takes_the_lowest_unselected():
    scores = torch.tensor([[[[5.0, 1.0, -3.0, 0.0, -1.0]]]])
    selected = torch.tensor([[[[True, False, True, False, False]]]])
    got = negligible_mask(scores, selected, 0.4)  # floor(2) blocks
    assert got[0, 0, 0].tolist() == [False, False, False, True, True]


def test_mass_estimate_tracks_the_true_kept_mass(rng):
    q, k, v = qkv(rng, 1, 2, LAYOUT.total_tokens, sharp=1.0)
    _, call, _ = run_method("sla", q, k, v, layout=LAYOUT, sparsity=0.5, tiled=False)
    cache = call.cache
    o_s, lse_s = kernels.block_sparse_attention(
        q, k, v, cache.pattern.kv_indices, cache.pattern.kv_counts, block_m=64, block_n=64
    )
    _, lse_full = brute_attention(q, k, v)
    true = torch.exp(lse_s.double() - lse_full)
    est = kernels.kept_mass(q, k, lse_s, cache.pattern.outside, block_m=64, block_n=64).double()
    assert float((est - true).abs().mean()) < 0.05
    assert bool((est > 0).all()) and bool((est <= 1).all())
