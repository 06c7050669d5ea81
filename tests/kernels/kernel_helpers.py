"""Random LUTs and brute-force token-level attention shared by the kernel tests."""

from __future__ import annotations

import math

import torch

from dit_accel.kernels import reference

IN_PROCESS = True  # set by conftest.py: whether the Triton kernels can run in this pytest process


def random_mask(b: int, h: int, n_q: int, n_k: int, rng: torch.Generator, empty_row: bool = True) -> torch.Tensor:
    """A block mask with a different density per row (0 to 1), one empty row and one full row."""
    mask = torch.rand(b, h, n_q, n_k, generator=rng) < torch.rand(b, h, n_q, 1, generator=rng)
    if empty_row:
        mask[0, 0, 0] = False
    mask[-1, -1, -1] = True
    return mask


def random_lut(b, h, n, block_m, block_n, rng, *, empty_row=True, garbage=True):
    """``(mask, kv_indices, kv_counts)``; the LUT is trimmed to the widest row, and with ``garbage`` the slots
    past each count hold junk (also out of range) that the kernels must never read as blocks."""
    n_q, n_k = math.ceil(n / block_m), math.ceil(n / block_n)
    mask = random_mask(b, h, n_q, n_k, rng, empty_row)
    idx, cnt = reference.lut_from_mask(mask)
    idx = idx[..., : max(1, int(cnt.max()))].contiguous()
    if garbage:
        slot = torch.arange(idx.shape[-1])
        junk = torch.randint(-3, n_k + 3, idx.shape, generator=rng, dtype=torch.int32)
        idx = torch.where(slot < cnt[..., None], idx, junk)
    return mask, idx, cnt


def token_mask(mask: torch.Tensor, n: int, block_m: int, block_n: int) -> torch.Tensor:
    return mask.repeat_interleave(block_m, dim=2)[:, :, :n].repeat_interleave(block_n, dim=3)[..., :n]


def brute_force(q, k, v, mask, block_m, block_n, scale=None):
    """Token-level masked attention in float64: ``(out, lse, probs)``."""
    n = q.shape[2]
    token = token_mask(mask, n, block_m, block_n)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~token, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    p = torch.where(torch.isfinite(lse)[..., None], p, 0)
    return p @ v.double(), lse, p


def assert_lse_close(lse: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    """Equal -inf pattern (empty rows) and close finite values."""
    ref = ref.to(lse.device, torch.float64)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(lse.double()[finite], ref[finite], atol=atol, rtol=atol)
