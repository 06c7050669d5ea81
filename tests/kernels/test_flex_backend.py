"""FlexAttention from the LUT (dit_accel.kernels.flex) against the reference, on the CPU (eager FlexAttention)."""

from __future__ import annotations

import warnings

import pytest
import torch

from dit_accel import kernels
from dit_accel.kernels import flex, reference

pytest.importorskip("torch.nn.attention.flex_attention")


def _lut(b, h, n_qb, n_kb, gen):
    counts = torch.randint(0, n_kb + 1, (b, h, n_qb), generator=gen, dtype=torch.int32)
    counts[0, 0, 0] = 0  # an empty query block
    order = torch.rand(b, h, n_qb, n_kb, generator=gen).argsort(-1)
    chosen = torch.where(torch.arange(n_kb) < counts[..., None], order, n_kb).sort(-1).values
    return chosen.clamp(max=n_kb - 1).to(torch.int32), counts


@pytest.mark.parametrize(("n", "block_m", "block_n", "padding"), [(256, 64, 64, False), (200, 64, 128, True)])
def test_flex_matches_reference(n, block_m, block_n, padding):
    gen = torch.Generator().manual_seed(n)
    b, h, d = 2, 2, 16
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    idx, counts = _lut(b, h, -(-n // block_m), -(-n // block_n), gen)
    kp = (torch.rand(b, n, generator=gen) > 0.3) if padding else None
    kw = dict(block_m=block_m, block_n=block_n, scale=0.4, key_padding=kp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is not compiled
        out, lse = flex.block_sparse_attention(q, k, v, idx, counts, **kw)
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, idx, counts, **kw)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and (out[0, 0, :block_m] == 0).all()
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)


def test_block_mask_lists_whole_blocks_as_full_and_masked_ones_as_partial():
    idx = torch.tensor([[[[0, 3, 0, 0], [1, 2, 3, 0], [0, 0, 0, 0], [2, 0, 0, 0]]]], dtype=torch.int32)
    counts = torch.tensor([[[2, 3, 0, 1]]], dtype=torch.int32)
    n = 64 * 3 + 10  # the last key block is a padded tail: partial
    kp = torch.ones(1, n, dtype=torch.bool)
    kp[0, 70] = False  # one masked key in block 1: partial
    mask = flex.block_mask_from_lut(idx, counts, n, block_m=64, block_n=64, key_padding=kp)
    full = reference.selected_block_mask(mask.full_kv_indices, mask.full_kv_num_blocks, 4)
    part = reference.selected_block_mask(mask.kv_indices, mask.kv_num_blocks, 4)
    assert full[0, 0].nonzero().tolist() == [[0, 0], [1, 2], [3, 2]]
    assert part[0, 0].nonzero().tolist() == [[0, 3], [1, 1], [1, 3]]  # the tail block, the block with a masked key


def test_flex_backend_is_chosen_only_when_forced(monkeypatch):
    monkeypatch.delenv("DIT_ACCEL_KERNELS", raising=False)
    assert kernels.backend_for("cpu") == "cpu"
    monkeypatch.setenv("DIT_ACCEL_KERNELS", "flex")
    assert kernels.backend_for("cpu") == "flex"
    assert kernels._impl("block_sparse_attention", torch.device("cpu")) is flex.block_sparse_attention
    assert kernels._impl("mean_pool", torch.device("cpu")) is reference.mean_pool  # not FlexAttention's job
