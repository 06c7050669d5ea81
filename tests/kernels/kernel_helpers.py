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


def random_key_padding(b: int, n: int, block_n: int, rng: torch.Generator) -> torch.Tensor:
    """bool (B, N), True = attend: batch 0 a padded prompt at the end (a fully masked last block and a partly
    masked one before it), batch 1 scattered masked keys and a fully masked block in the middle, batch 2 (if any)
    every key masked."""
    kp = torch.ones(b, n, dtype=torch.bool)
    tail = (n - 1) // block_n * block_n  # start of the last block
    kp[0, tail - block_n // 3 :] = False
    if b > 1:
        kp[1] = torch.rand(n, generator=rng) < 0.7
        kp[1, block_n : 2 * block_n] = False
    if b > 2:
        kp[2:] = False
    return kp


def brute_force(q, k, v, mask, block_m, block_n, scale=None, key_padding=None):
    """Token-level masked attention in float64: ``(out, lse, probs)``; ``key_padding`` (B, N) masks keys too."""
    n = q.shape[2]
    token = token_mask(mask, n, block_m, block_n)
    if key_padding is not None:
        token = token & key_padding[:, None, None, :]
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
