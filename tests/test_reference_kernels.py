"""The reference kernels against brute-force masked attention on fresh random inputs."""

import math

import pytest
import torch

from dit_accel import kernels
from dit_accel.kernels import reference


def random_lut(b, h, n, block_m, block_n, rng, allow_empty=True):
    n_q, n_k = math.ceil(n / block_m), math.ceil(n / block_n)
    mask = torch.rand(b, h, n_q, n_k, generator=rng) < torch.rand(b, h, n_q, 1, generator=rng)
    if allow_empty:
        mask[0, 0, 0] = False  # one empty row
    else:
        mask[..., 0] |= ~mask.any(-1)
    idx, cnt = reference.lut_from_mask(mask)
    return mask, idx, cnt


def brute_force(q, k, v, mask, block_m, block_n, scale=None):
    n = q.shape[2]
    token = mask.repeat_interleave(block_m, dim=2)[:, :, :n].repeat_interleave(block_n, dim=3)[..., :n]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~token, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    p = torch.where(torch.isfinite(lse)[..., None], p, 0)
    return (p @ v.double()), lse


@pytest.mark.parametrize(("n", "d", "block_m", "block_n"), [(200, 64, 64, 64), (300, 128, 128, 64), (130, 64, 64, 128)])
def test_block_sparse_matches_brute_force(rng, n, d, block_m, block_n):
    b, h = 2, 2
    q, k, v = (torch.randn(b, h, n, d, generator=rng) for _ in range(3))
    mask, idx, cnt = random_lut(b, h, n, block_m, block_n, rng)
    out, lse = kernels.block_sparse_attention(q, k, v, idx, cnt, block_m=block_m, block_n=block_n)
    ref_out, ref_lse = brute_force(q, k, v, mask, block_m, block_n)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == (b, h, n)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.all(out[0, 0, :block_m] == 0) and torch.all(torch.isneginf(lse[0, 0, :block_m]))


def test_all_blocks_equal_sdpa_and_dense_reference(rng):
    q, k, v = (torch.randn(1, 3, 257, 64, generator=rng) for _ in range(3))
    n_q, n_k = math.ceil(257 / 64), math.ceil(257 / 64)
    mask = torch.ones(1, 3, n_q, n_k, dtype=torch.bool)
    idx, cnt = reference.lut_from_mask(mask)
    out = kernels.block_sparse_attention(q, k, v, idx, cnt, block_m=64, block_n=64, scale=0.2, return_lse=False)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.2)
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=1e-5)
    dense_out, dense_lse = kernels.dense_attention(q, k, v, scale=0.2)
    torch.testing.assert_close(dense_out, sdpa, atol=1e-5, rtol=1e-5)
    s = (q @ k.transpose(-1, -2)) * 0.2
    torch.testing.assert_close(dense_lse, torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)


def test_bad_shapes_and_blocks_are_named(rng):
    q = torch.randn(1, 1, 100, 64, generator=rng)
    idx = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    cnt = torch.ones(1, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_indices"):
        kernels.block_sparse_attention(q, q, q, idx, cnt, block_m=64, block_n=64)
    with pytest.raises(ValueError, match="block_m=32"):
        kernels.block_sparse_attention(q, q, q, idx, cnt, block_m=32, block_n=64)


def test_mean_pool_handles_ragged_tail_and_smoothing(rng):
    x = torch.randn(2, 1, 70, 8, generator=rng)
    pooled = reference.mean_pool(x, 64)
    torch.testing.assert_close(pooled[:, :, 0], x[:, :, :64].mean(2))
    torch.testing.assert_close(pooled[:, :, 1], x[:, :, 64:].mean(2))
    smooth = reference.mean_pool(x, 64, smooth=True)
    torch.testing.assert_close(smooth, pooled - x.mean(2, keepdim=True), atol=1e-6, rtol=1e-6)


def test_lut_from_mask_is_sorted_valid_first(rng):
    mask = torch.rand(2, 3, 5, 9, generator=rng) > 0.5
    idx, cnt = reference.lut_from_mask(mask)
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
    for pos in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(5)):
        b, h, i = pos.tolist()
        expected = torch.nonzero(mask[b, h, i]).flatten().int()
        assert cnt[b, h, i] == expected.numel()
        assert torch.equal(idx[b, h, i, : expected.numel()], expected)


def test_topk_mask_keeps_forced_and_best(rng):
    scores = torch.randn(1, 2, 4, 10, generator=rng)
    forced = torch.zeros(1, 2, 4, 10, dtype=torch.bool)
    forced[..., 3] = True
    mask = reference.topk_mask(scores, 4, forced=forced)
    assert torch.all(mask.sum(-1) == 4) and torch.all(mask[..., 3])
    others = scores.masked_fill(forced, float("-inf"))
    top3 = torch.topk(others, 3, dim=-1).indices
    assert torch.all(mask.gather(-1, top3))
