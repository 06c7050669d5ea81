"""The fused CPU kernels (dit_accel.kernels.cpu) against the exact references, on random LUTs and paddings."""

from __future__ import annotations

import math

import pytest
import torch

from dit_accel import kernels
from dit_accel.kernels import cpu, reference


def _lut(b: int, h: int, n: int, block_m: int, block_n: int, keep: float, gen: torch.Generator, empty: bool):
    """A random ascending LUT with varying counts (some query blocks keep nothing when ``empty``)."""
    n_qb, n_kb = math.ceil(n / block_m), math.ceil(n / block_n)
    scores = torch.rand(b, h, n_qb, n_kb, generator=gen)
    counts = torch.randint(1, max(2, int(keep * n_kb) + 1), (b, h, n_qb), generator=gen, dtype=torch.int32)
    if empty:
        counts[0, 0, 0] = 0
    order = scores.argsort(-1, descending=True)
    slots = torch.arange(n_kb)
    chosen = torch.where(slots < counts[..., None], order, n_kb)  # unused slots sort last
    idx = chosen.sort(-1).values.clamp(max=n_kb - 1).to(torch.int32)
    return idx, counts


CASES = [  # (n, block_m, block_n, padding, empty query block, dtype)
    (256, 64, 64, False, False, torch.float32),
    (300, 64, 64, False, True, torch.float32),  # a partial last block in both directions
    (300, 64, 128, True, False, torch.float32),
    (200, 128, 64, True, True, torch.float32),
    (256, 64, 64, True, False, torch.bfloat16),
]


@pytest.mark.parametrize(("n", "block_m", "block_n", "padding", "empty", "dtype"), CASES)
def test_block_sparse_matches_reference(n, block_m, block_n, padding, empty, dtype):
    gen = torch.Generator().manual_seed(n + block_m + block_n)
    b, h, d = 2, 3, 32
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(dtype) for _ in range(3))
    idx, counts = _lut(b, h, n, block_m, block_n, 0.5, gen, empty)
    kp = None
    if padding:
        kp = torch.rand(b, n, generator=gen) > 0.3
        kp[1, : block_n + 5] = False  # a whole key block (and a bit) masked for one batch
    kw = dict(block_m=block_m, block_n=block_n, scale=0.3, key_padding=kp)
    out, lse = cpu.block_sparse_attention(q, k, v, idx, counts, **kw)
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, idx, counts, **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))  # empty rows: -inf exactly where the reference has it
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=tol, rtol=tol)
    if empty:
        assert not finite[0, 0, :block_m].any() and (out[0, 0, :block_m] == 0).all()


def test_fully_masked_rows_and_dense_lse():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, 130, 16, generator=gen) for _ in range(3))
    kp = torch.ones(2, 130, dtype=torch.bool)
    kp[1] = False  # batch 1 has no key at all: SDPA's answer is 0, and the LSE is -inf
    out, lse = cpu.dense_attention(q, k, v, key_padding=kp)
    ref_out, ref_lse = reference.dense_attention(q, k, v, key_padding=kp)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()
    torch.testing.assert_close(lse[0], ref_lse[0], atol=1e-5, rtol=1e-5)


def test_pair_matches_reference_pair():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 256, 32, generator=gen) for _ in range(3))
    idx, counts = _lut(1, 2, 256, 64, 64, 0.5, gen, False)
    got = cpu.block_sparse_attention_pair(q, k, v, idx, counts, block_m=64, block_n=64)
    want = reference.block_sparse_attention_pair(q, k, v, idx, counts, block_m=64, block_n=64)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-5)


def test_uncovered_requests_go_to_the_reference(monkeypatch):
    """Masses, token groups and autograd are the reference's: the result equals it exactly."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 128, 16, generator=gen) for _ in range(3))
    idx, counts = _lut(1, 2, 128, 64, 64, 1.0, gen, False)
    kw = dict(block_m=64, block_n=64)
    got = cpu.block_sparse_attention(q, k, v, idx, counts, return_mass=True, **kw)
    want = reference.block_sparse_attention(q, k, v, idx, counts, return_mass=True, **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    qg = q.clone().requires_grad_(True)
    out, _ = cpu.block_sparse_attention(qg, k, v, idx, counts, **kw)
    out.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


def test_auto_backend_on_cpu_is_the_fused_path(monkeypatch):
    monkeypatch.delenv("DIT_ACCEL_KERNELS", raising=False)
    assert kernels.backend_for("cpu") == "cpu"
    calls = []
    monkeypatch.setattr(
        cpu,
        "_flash",
        lambda *a, **kw: calls.append(1) or torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*a, **kw),
    )
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 128, 16, generator=gen) for _ in range(3))
    idx, counts = _lut(1, 1, 128, 64, 64, 1.0, gen, False)
    kernels.block_sparse_attention(q, k, v, idx, counts, block_m=64, block_n=64)
    kernels.dense_attention(q, k, v)
    assert len(calls) == 2
    monkeypatch.setenv("DIT_ACCEL_KERNELS", "reference")
    assert kernels.backend_for("cpu") == "reference"
    kernels.block_sparse_attention(q, k, v, idx, counts, block_m=64, block_n=64)
    assert len(calls) == 2
