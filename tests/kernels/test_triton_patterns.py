"""Triton pattern kernels (pooling, selection to a LUT, token gather) against the references."""

from __future__ import annotations

import pytest
import torch

from dit_accel import layout
from dit_accel.kernels import reference
from dit_accel.kernels import triton_block_sparse as tbs


@pytest.mark.parametrize(("n", "d", "block"), [(200, 64, 64), (300, 128, 128), (130, 40, 96)])
def test_mean_pool(rng, device, n, d, block):
    x = torch.randn(2, 2, n, d, generator=rng).to(device)
    for smooth in (False, True):
        torch.testing.assert_close(tbs.mean_pool(x, block, smooth=smooth), reference.mean_pool(x, block, smooth=smooth))
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(tbs.mean_pool(xb, block), reference.mean_pool(xb, block), atol=1e-5, rtol=1e-5)


def test_lut_from_mask_equals_reference(rng, device):
    for n_k in (1, 9, 37, 64):
        mask = (torch.rand(2, 3, 5, n_k, generator=rng) < torch.rand(2, 3, 5, 1, generator=rng)).to(device)
        got, want = tbs.lut_from_mask(mask), reference.lut_from_mask(mask)
        assert got[0].dtype == torch.int32 and got[1].dtype == torch.int32
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("n_k", [7, 37, 130])
def test_topk_mask_equals_reference(rng, device, n_k):
    scores = torch.randn(1, 2, 3, n_k, generator=rng).to(device)
    scores[0, 0, 0, :3] = float("-inf")  # masked candidates still rank (last)
    forced = (torch.rand(1, 2, 3, n_k, generator=rng) < 0.15).to(device)
    forced[0, 1, 1] = True  # more forced blocks than k
    for k in (0, 3, n_k // 2, n_k + 5):
        for f in (None, forced):
            assert torch.equal(tbs.topk_mask(scores, k, forced=f), reference.topk_mask(scores, k, forced=f))


def test_topk_ties_go_to_the_lower_index(device):
    scores = torch.zeros(1, 1, 1, 10, device=device)
    scores[..., 7] = 1.0
    mask = tbs.topk_mask(scores, 3)
    assert mask[0, 0, 0].nonzero().flatten().tolist() == [0, 1, 7]


@pytest.mark.parametrize("n_k", [9, 64, 200])
def test_threshold_mask_equals_reference(rng, device, n_k):
    scores = (torch.randn(1, 2, 3, n_k, generator=rng) * 3).to(device)
    forced = (torch.rand(1, 2, 3, n_k, generator=rng) < 0.1).to(device)
    for tau in (0.0, 0.05, 0.5, 0.9, 0.97, 1.0):
        for f in (None, forced):
            got = tbs.threshold_mask(scores, tau, forced=f)
            assert torch.equal(got, reference.threshold_mask(scores, tau, forced=f)), tau


def test_pooled_topk_lut_equals_reference(rng, device):
    q, k = (torch.randn(1, 2, 300, 64, generator=rng).to(device) for _ in range(2))
    forced = torch.zeros(1, 2, 5, 3, dtype=torch.bool, device=device)
    forced[..., 0] = True
    for bm, bn, kb in ((64, 128, 2), (64, 64, 3), (128, 64, 10)):
        f = forced if (bm, bn) == (64, 128) else None
        got = tbs.pooled_topk_lut(q, k, bm, bn, kb, forced=f)
        want = reference.pooled_topk_lut(q, k, bm, bn, kb, forced=f)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_permute_with_tile_permutation_round_trips(rng, device):
    grid, tile = (3, 5, 7), (2, 4, 4)  # ragged border tiles on every axis
    perm = layout.tile_permutation(grid, tile).to(device)
    x = torch.randn(1, 2, 3 * 5 * 7, 24, generator=rng).to(device).to(torch.float16)
    xt = tbs.permute_tokens(x, perm)
    assert torch.equal(xt, reference.permute_tokens(x, perm))
    assert torch.equal(tbs.unpermute_tokens(xt, perm), x)
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(tbs.permute_tokens(strided, perm), xt)
