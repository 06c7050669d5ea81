"""``square_mask_row``: which SDPA masks a family with ``square_padding_mask`` hands on as their first row."""

from __future__ import annotations

import torch

from dit_accel.kernels.masks import key_padding_from_mask
from dit_accel.runtime import square_mask_row


def test_outer_product_mask_gives_its_first_row_as_key_padding():
    valid = torch.tensor([[True] * 6 + [False] * 2, [True] * 5 + [False] * 3])  # video first, padded text last
    square = (valid[:, None, None, :] & valid[:, None, :, None]).contiguous()  # (B, 1, N, N), as HunyuanVideo 1.5
    assert key_padding_from_mask(square, batch=2, heads=2, n_q=8, n_k=8) is None  # not provable from strides
    row = square_mask_row(square)
    assert row.shape == (2, 1, 1, 8)
    assert torch.equal(key_padding_from_mask(row, batch=2, heads=2, n_q=8, n_k=8), valid)


def test_other_masks_pass_through_unchanged():
    float_mask = torch.zeros(1, 1, 8, 8)
    per_head = torch.ones(1, 2, 8, 8, dtype=torch.bool)
    key_padding = torch.ones(1, 1, 1, 8, dtype=torch.bool)
    cross = torch.ones(1, 1, 8, 4, dtype=torch.bool)
    for mask in (None, float_mask, per_head, key_padding, cross):
        assert square_mask_row(mask) is mask
