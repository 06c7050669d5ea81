"""Token-level groups inside the listed blocks (VMoBA's per-token chunk gating) on the block-sparse kernels.

``key_groups`` (N,) names each key's group (-1: seen by every query), ``query_groups`` holds each query's groups as
bit words; a key of a listed block is attended only when the query's bit for its group is set. The reference is
checked against brute force, the Triton kernel against the reference (under the interpreter on a CPU).
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_helpers import assert_lse_close, random_key_padding, random_lut, token_mask

from dit_accel import kernels
from dit_accel.kernels import reference
from dit_accel.kernels import triton_block_sparse as tbs

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _groups(b: int, h: int, n: int, n_groups: int, rng: torch.Generator):
    """Contiguous runs of keys per group (ragged, not aligned with blocks), a few ungated keys (-1), and a random
    selection per query token that always holds the query's own group."""
    cuts = torch.sort(torch.randperm(n - 1, generator=rng)[: n_groups - 1] + 1).values
    key_groups = torch.zeros(n, dtype=torch.int32)
    for c in cuts:
        key_groups[int(c) :] += 1
    key_groups[:3] = -1  # e.g. text keys every query sees
    select = torch.rand(b, h, n, n_groups, generator=rng) < 0.3
    own = key_groups.clamp(min=0).long()
    select[..., torch.arange(n), own] = True
    return key_groups, select


def _brute(q, k, v, block_mask, block_m, block_n, key_groups, select, key_padding=None):
    n = q.shape[2]
    tok = token_mask(block_mask, n, block_m, block_n)
    g = key_groups.clamp(min=0).long()
    seen = select[..., g] | (key_groups < 0)  # (B, H, N_q, N_k)
    tok = tok & seen
    if key_padding is not None:
        tok = tok & key_padding[:, None, None, :]
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~tok, float("-inf"))
    lse = torch.logsumexp(s, -1)
    finite = torch.isfinite(lse)[..., None]
    p = torch.where(finite, torch.exp(s - torch.where(finite, lse[..., None], 0)), 0)
    return p @ v.double(), lse


def test_pack_groups_round_trips(rng):
    for g in (1, 63, 64, 65, 72, 130):
        select = torch.rand(2, 3, 5, g, generator=rng) < 0.5
        words = kernels.pack_groups(select)
        assert words.dtype == torch.int64 and words.shape == (2, 3, 5, math.ceil(g / 64))
        assert torch.equal(reference.unpack_groups(words, g), select)
    assert int(kernels.pack_groups(torch.ones(1, 64, dtype=torch.bool))[0, 0]) == -1  # bit 63 is the sign bit


@pytest.mark.parametrize(("n", "block_m", "block_n", "n_groups"), [(200, 64, 64, 5), (300, 128, 64, 100)])
def test_reference_with_groups_is_brute_force(rng, n, block_m, block_n, n_groups):
    b, h, d = 2, 2, 16
    q, k, v = (torch.randn(b, h, n, d, generator=rng) for _ in range(3))
    mask, idx, cnt = random_lut(b, h, n, block_m, block_n, rng)
    key_groups, select = _groups(b, h, n, n_groups, rng)
    words = kernels.pack_groups(select)
    out, lse = reference.block_sparse_attention(
        q, k, v, idx, cnt, block_m=block_m, block_n=block_n, key_groups=key_groups, query_groups=words
    )
    want, want_lse = _brute(q, k, v, mask, block_m, block_n, key_groups, select)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert_lse_close(lse, want_lse, 1e-5)
    kp = random_key_padding(b, n, block_n, rng)
    out, lse = reference.block_sparse_attention(
        q, k, v, idx, cnt, block_m=block_m, block_n=block_n, key_padding=kp, key_groups=key_groups, query_groups=words
    )
    want, want_lse = _brute(q, k, v, mask, block_m, block_n, key_groups, select, kp)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert_lse_close(lse, want_lse, 1e-5)
    # every group selected: the plain block-sparse result
    all_words = kernels.pack_groups(torch.ones_like(select))
    got = reference.block_sparse_attention(
        q, k, v, idx, cnt, block_m=block_m, block_n=block_n, key_groups=key_groups, query_groups=all_words
    )
    plain = reference.block_sparse_attention(q, k, v, idx, cnt, block_m=block_m, block_n=block_n)
    torch.testing.assert_close(got[0], plain[0], atol=1e-6, rtol=1e-6)


def test_groups_are_named_when_wrong(rng):
    q = torch.randn(1, 1, 100, 8, generator=rng)
    _, idx, cnt = random_lut(1, 1, 100, 64, 64, rng)
    words = torch.zeros(1, 1, 100, 1, dtype=torch.int64)
    for kwargs, match in (
        ({"key_groups": torch.zeros(100, dtype=torch.int32)}, "both or neither"),
        ({"key_groups": torch.zeros(99, dtype=torch.int32), "query_groups": words}, r"key_groups must be \(N,\)"),
        ({"key_groups": torch.zeros(100, dtype=torch.int32), "query_groups": words[:, :, :50]}, "query_groups"),
        ({"key_groups": torch.zeros(100), "query_groups": words}, "int32"),
        ({"key_groups": torch.zeros(100, dtype=torch.int32), "query_groups": words.int()}, "int64"),
    ):
        with pytest.raises(ValueError, match=match):
            kernels.block_sparse_attention(q, q, q, idx, cnt, block_m=64, block_n=64, **kwargs)


CASES = [  # (n, d, block_m, block_n, dtype, n_groups, key padding)
    (200, 32, 64, 64, torch.float32, 5, False),
    (300, 32, 128, 128, torch.float16, 100, True),  # 64-key sub-tiles of a 128-key block, two words per query
    (190, 16, 128, 64, torch.float32, 150, True),  # three words: the (row, key) gather
]


@pytest.mark.parametrize(("n", "d", "block_m", "block_n", "dtype", "n_groups", "padded"), CASES)
def test_triton_with_groups_matches_reference(
    rng, device, monkeypatch, n, d, block_m, block_n, dtype, n_groups, padded
):
    b, h = 2, 1
    q, k, v = (torch.randn(b, h, n, d, generator=rng).to(device=device, dtype=dtype) for _ in range(3))
    _, idx, cnt = random_lut(b, h, n, block_m, block_n, rng)
    key_groups, select = _groups(b, h, n, n_groups, rng)
    kp = random_key_padding(b, n, block_n, rng).to(device) if padded else None
    args = (q, k, v, idx.to(device), cnt.to(device))
    groups = dict(key_groups=key_groups.to(device), query_groups=kernels.pack_groups(select).to(device))
    want = reference.block_sparse_attention(
        *args, block_m=block_m, block_n=block_n, return_mass=True, key_padding=kp, **groups
    )
    tol = TOL[dtype]
    configs = tbs._candidates("bsa", block_m, block_n, tbs._pow2(d), dtype == torch.float32, False)
    configs = list({(c["tile_m"], c["tile_n"]): c for c in configs}.values())
    for cfg in configs:
        monkeypatch.setattr(tbs, "_candidates", lambda *a, cfg=cfg: [cfg])
        out, lse, mass = tbs.block_sparse_attention(
            *args, block_m=block_m, block_n=block_n, return_mass=True, key_padding=kp, **groups
        )
        assert torch.isfinite(out).all() and torch.isfinite(mass).all()
        torch.testing.assert_close(out.float(), want[0].float(), atol=tol, rtol=tol)
        assert_lse_close(lse, want[1], 1e-4 if dtype == torch.float32 else 2e-3)
        torch.testing.assert_close(mass, want[2], atol=tol, rtol=tol)
    pair = tbs.block_sparse_attention_pair(*args, block_m=block_m, block_n=block_n, key_padding=kp, **groups)
    want_pair = reference.block_sparse_attention_pair(*args, block_m=block_m, block_n=block_n, key_padding=kp, **groups)
    for i in (0, 2):
        torch.testing.assert_close(pair[i].float(), want_pair[i].float(), atol=tol, rtol=tol)
    for i in (1, 3):
        assert_lse_close(pair[i], want_pair[i], 1e-4 if dtype == torch.float32 else 2e-3)
