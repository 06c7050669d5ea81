"""LUT -> cuDNN frontend block-sparse attention (dit_accel.kernels.cudnn_bsa), checked on the CPU by an interpreter
of the documented contract (``cudnn/block_sparse_attention/_interface.py``, 1.32.0): query block i attends to the
first ``q2k_block_nums[b, h, i]`` ids of ``q2k_block_index[b, h, i]``, and inside key block j to its first
``block_sizes[j]`` keys; a block listed twice is counted twice."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from dit_accel import kernels
from dit_accel.kernels import cudnn_bsa, reference


def _interpret(meta: cudnn_bsa.CudnnBSAInputs, n: int, block: int) -> torch.Tensor:
    """int (B, H, n, n): how often cuDNN BSA counts key k for query q."""
    index, nums, sizes = meta
    b, h, n_qb, width = index.shape
    n_kb = math.ceil(n / block)
    assert index.dtype == nums.dtype == sizes.dtype == torch.int32 and tuple(sizes.shape) == (n_kb,)
    assert n_qb == math.ceil(n / block) and tuple(nums.shape) == (b, h, n_qb) and width >= 1
    assert int(index.min()) >= 0 and int(index.max()) < n_kb  # every slot a real block id (the caller contract)
    visits = torch.zeros(b, h, n_qb * block, n_kb * block, dtype=torch.int32)
    for bi in range(b):
        for hi in range(h):
            for qb in range(n_qb):
                assert 0 <= int(nums[bi, hi, qb]) <= width
                for kb in index[bi, hi, qb, : int(nums[bi, hi, qb])].tolist():
                    visits[bi, hi, qb * block : (qb + 1) * block, kb * block : kb * block + int(sizes[kb])] += 1
    assert not visits[..., n:].any(), "keys past n would be read (block_sizes must cut the ragged block)"
    return visits[:, :, :n, :n]


def _random_lut(b, h, n, block, gen):
    n_b = math.ceil(n / block)
    mask = torch.rand(b, h, n_b, n_b, generator=gen) < torch.rand(b, h, n_b, 1, generator=gen)
    mask[0, 0, 0] = False
    mask[-1, -1, -1] = True
    idx, counts = reference.lut_from_mask(mask)
    idx = idx[..., : max(1, int(counts.max()))].clone()
    junk = torch.randint(-5, 3 * n_b, idx.shape, generator=gen, dtype=torch.int32)  # junk past the counts
    idx = torch.where(torch.arange(idx.shape[-1]) < counts[..., None], idx, junk)
    return mask, idx, counts


@pytest.mark.parametrize(("n", "block"), [(256, 64), (200, 64), (321, 64), (300, 128), (130, 128)])
def test_interpreted_cudnn_mask_equals_the_lut_and_attention_the_reference(n, block):
    """Catches: the ragged block given a whole block of keys (reads past n), junk slots passed out of range,
    counts off by one, a wrong LSE base under the interpreted mask."""
    gen = torch.Generator().manual_seed(n + block)
    b, h, d = 2, 3, 16
    mask, idx, counts = _random_lut(b, h, n, block, gen)
    meta = cudnn_bsa.cudnn_bsa_from_lut(idx, counts, n, block=block)
    visits = _interpret(meta, n, block)
    want = mask.repeat_interleave(block, 2).repeat_interleave(block, 3)[:, :, :n, :n]
    assert torch.equal(visits, want.int())
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for _ in range(3))
    s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(visits == 0, float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.nan_to_num(torch.softmax(s, -1)) @ v
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, idx, counts, block_m=block, block_n=block, scale=0.3)
    torch.testing.assert_close(out, ref_out.double(), atol=1e-5, rtol=1e-5)  # the reference runs in float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)) and torch.isneginf(lse).any()
    finite = torch.isfinite(lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite].double(), atol=1e-5, rtol=1e-5)


def test_planted_bugs_are_caught_by_the_interpreter():
    """The interpreter must fail on each planted bug, or the equality test above proves nothing."""
    gen = torch.Generator().manual_seed(0)
    n, block = 200, 64
    mask, idx, counts = _random_lut(1, 2, n, block, gen)
    meta = cudnn_bsa.cudnn_bsa_from_lut(idx, counts, n, block=block)
    want = _interpret(meta, n, block)
    assert bool(mask[..., -1].any())  # some row keeps the ragged block
    with pytest.raises(AssertionError, match="keys past n"):  # the ragged block read as a whole one
        _interpret(meta._replace(block_sizes=torch.full_like(meta.block_sizes, block)), n, block)
    with pytest.raises(AssertionError):  # junk slots past the counts left out of range
        _interpret(meta._replace(q2k_block_index=idx.to(torch.int32)), n, block)
    fewer = (meta.q2k_block_nums - 1).clamp(min=0)  # counts off by one
    assert not torch.equal(_interpret(meta._replace(q2k_block_nums=fewer), n, block), want)


def test_cudnn_bsa_refuses_key_padding_and_names_the_package(monkeypatch):
    q = torch.randn(1, 1, 128, 16)
    idx, counts = reference.lut_from_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool))
    monkeypatch.setitem(sys.modules, "cudnn.block_sparse_attention", None)
    with pytest.raises(ImportError, match=r"needs cuDNN frontend's BSA: pip install 'nvidia-cudnn-frontend=="):
        cudnn_bsa.block_sparse_attention(q, q, q, idx, counts, block_m=64, block_n=64)
    monkeypatch.setattr(cudnn_bsa, "_import_bsa", lambda: None)
    kp = torch.ones(1, 128, dtype=torch.bool)
    with pytest.raises(ValueError, match="cannot apply key_padding"):
        cudnn_bsa.block_sparse_attention(q, q, q, idx, counts, block_m=64, block_n=64, key_padding=kp)
    monkeypatch.setattr(cudnn_bsa, "cudnn_bsa_available", lambda: False)
    with kernels.use_backend("cudnn_bsa"), pytest.raises(RuntimeError, match="kernel_backend='cudnn_bsa' needs CUDA"):
        kernels.backend_for("cuda")
