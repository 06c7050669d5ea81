"""The new reference functions against brute force (token-level masks, SDPA, per-row loops)."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_helpers import brute_force, random_lut, token_mask

from dit_accel import kernels
from dit_accel.kernels import reference


@pytest.mark.parametrize(("n", "block_m", "block_n"), [(200, 64, 64), (300, 128, 64)])
def test_mass_is_block_sum_of_probabilities(rng, n, block_m, block_n):
    b, h, d = 1, 2, 32
    q, k, v = (torch.randn(b, h, n, d, generator=rng) for _ in range(3))
    mask, idx, cnt = random_lut(b, h, n, block_m, block_n, rng)
    _, _, mass = kernels.block_sparse_attention(q, k, v, idx, cnt, block_m=block_m, block_n=block_n, return_mass=True)
    _, _, p = brute_force(q, k, v, mask, block_m, block_n)
    n_q = math.ceil(n / block_m)
    for bi in range(b):
        for hi in range(h):
            for i in range(n_q):
                rows = p[bi, hi, i * block_m : (i + 1) * block_m]
                for s in range(idx.shape[-1]):
                    if s >= cnt[bi, hi, i]:
                        assert mass[bi, hi, i, s] == 0
                        continue
                    j = int(idx[bi, hi, i, s])
                    want = rows[:, j * block_n : (j + 1) * block_n].sum(-1).mean()
                    assert abs(float(mass[bi, hi, i, s]) - float(want)) < 1e-5
    row_total = mass.sum(-1)
    assert torch.allclose(row_total[cnt > 0], torch.ones(()), atol=1e-5)


def test_pair_reference_is_sparse_plus_sdpa(rng):
    q, k, v = (torch.randn(1, 2, 150, 64, generator=rng) for _ in range(3))
    mask, idx, cnt = random_lut(1, 2, 150, 64, 64, rng)
    o_s, lse_s, o_f, lse_f = kernels.block_sparse_attention_pair(q, k, v, idx, cnt, block_m=64, block_n=64)
    ref_s, ref_lse, _ = brute_force(q, k, v, mask, 64, 64)
    torch.testing.assert_close(o_s.double(), ref_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o_f, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    s = (q.double() @ k.double().transpose(-1, -2)) / 8
    torch.testing.assert_close(lse_f.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isneginf(lse_s), torch.isneginf(ref_lse))


@pytest.mark.parametrize("feature_map", ["softmax", "elu"])
def test_sparse_linear_reference_brute_force(rng, feature_map):
    b, h, n, d, bm, bn = 1, 2, 150, 16, 64, 64
    q, k, v = (torch.randn(b, h, n, d, generator=rng) for _ in range(3))
    mask, idx, cnt = random_lut(b, h, n, bm, bn, rng)
    negligible = torch.rand(mask.shape, generator=rng) < 0.3
    o_s, o_l, lse = reference.sparse_linear_attention(
        q, k, v, idx, cnt, block_m=bm, block_n=bn, negligible=negligible, feature_map=feature_map
    )
    ref_s, ref_lse, _ = brute_force(q, k, v, mask, bm, bn)
    torch.testing.assert_close(o_s.double(), ref_s, atol=1e-5, rtol=1e-5)
    phi = (lambda x: torch.softmax(x, -1)) if feature_map == "softmax" else (lambda x: torch.nn.functional.elu(x) + 1)
    marginal = token_mask(~mask & ~negligible, n, bm, bn).double()  # (B, H, N, N)
    pq, pk = phi(q.double()), phi(k.double())
    weights = (pq @ pk.transpose(-1, -2)) * marginal  # token-level linear attention weights
    den = weights.sum(-1, keepdim=True)
    want = torch.where(den > 0, (weights @ v.double()) / torch.where(den > 0, den, 1), 0)
    torch.testing.assert_close(o_l.double(), want, atol=1e-5, rtol=1e-5)


def test_threshold_reference_brute_force(rng):
    scores = torch.randn(2, 3, 4, 11, generator=rng) * 2
    forced = torch.rand(scores.shape, generator=rng) < 0.1
    for tau in (0.2, 0.6, 0.95):
        mask = reference.threshold_mask(scores, tau, forced=forced)
        probs = torch.softmax(scores.double(), -1)
        for row_p, row_m, row_f in zip(probs.view(-1, 11), mask.view(-1, 11), forced.view(-1, 11)):
            order = torch.argsort(row_p, descending=True)
            need = int((torch.cumsum(row_p[order], 0) < tau).sum()) + 1  # fewest top blocks reaching tau
            want = torch.zeros(11, dtype=torch.bool)
            want[order[:need]] = True
            assert torch.equal(row_m, want | row_f)
    assert not reference.threshold_mask(scores, 0.0).any()
    assert reference.threshold_mask(scores, 1.0).all()


def test_pooled_topk_lut_reference_is_composition(rng):
    q, k = (torch.randn(1, 2, 200, 32, generator=rng) for _ in range(2))
    idx, cnt = reference.pooled_topk_lut(q, k, 64, 64, 2)
    pq = q.view(1, 2, -1, 32)[:, :, :192].reshape(1, 2, 3, 64, 32).mean(3)
    pq = torch.cat([pq, q[:, :, 192:].mean(2, keepdim=True)], 2)
    km = k - k.mean(2, keepdim=True)
    pk = torch.cat([km[:, :, :192].reshape(1, 2, 3, 64, 32).mean(3), km[:, :, 192:].mean(2, keepdim=True)], 2)
    scores = pq @ pk.transpose(-1, -2) / math.sqrt(32)
    top = torch.topk(scores, 2, -1).indices.sort(-1).values
    assert torch.all(cnt == 2) and torch.equal(idx[..., :2].long(), top)


def test_permute_reference(rng):
    x = torch.randn(1, 2, 20, 8, generator=rng)
    perm = torch.randperm(20, generator=rng)
    y = reference.permute_tokens(x, perm)
    assert all(torch.equal(y[:, :, i], x[:, :, perm[i]]) for i in range(20))
    assert torch.equal(reference.unpermute_tokens(y, perm), x)
    assert torch.equal(reference.inverse_permutation(perm)[perm], torch.arange(20))


def test_mass_keeps_the_lut_width(rng):
    """A LUT wider than its longest row (lut_from_mask gives full width) still gets a mass slot per LUT slot."""
    q, k, v = (torch.randn(1, 1, 130, 16, generator=rng) for _ in range(3))
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    mask[..., 0] = True
    idx, cnt = reference.lut_from_mask(mask)
    _, _, mass = reference.block_sparse_attention(q, k, v, idx, cnt, block_m=64, block_n=64, return_mass=True)
    assert mass.shape == (1, 1, 3, 3)
    torch.testing.assert_close(mass[..., 0], torch.ones(1, 1, 3))
    assert torch.all(mass[..., 1:] == 0)
