"""Key-padding masks (SDPA's boolean (B, 1, 1, N) masks, e.g. HunyuanVideo's padded prompt) on the sparse path.

The references are checked against brute force and SDPA on the CPU; the Triton kernels against the references
(under the interpreter on a CPU, so the shapes stay tiny). Every key padding has a fully masked key block, a
partly masked one and, with three batches, a batch whose every key is masked (rows with nothing to attend).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import assert_lse_close, brute_force, random_key_padding, random_lut, token_mask

from dit_accel import kernels
from dit_accel.kernels import reference
from dit_accel.kernels import triton_block_sparse as tbs

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _inputs(b, h, n, d, rng, dtype=torch.float32, device="cpu"):
    return [torch.randn(b, h, n, d, generator=rng).to(device=device, dtype=dtype) for _ in range(3)]


def _linear_brute_force(q, k, v, marginal_blocks, key_padding, block_m, block_n, phi):
    """Token-level linear attention over the marginal blocks' kept keys, float64; 0 where no key is left."""
    n = q.shape[2]
    marginal = token_mask(marginal_blocks, n, block_m, block_n) & key_padding[:, None, None, :]
    weights = (phi(q.double()) @ phi(k.double()).transpose(-1, -2)) * marginal.double()
    den = weights.sum(-1, keepdim=True)
    return torch.where(den > 0, (weights @ v.double()) / torch.where(den > 0, den, 1), 0)


# ---------------------------------------------------------------------------------------------------------------
# reading the mask SDPA receives
# ---------------------------------------------------------------------------------------------------------------


def test_key_padding_from_mask_accepts_only_structural_key_padding():
    b, h, n = 2, 3, 10
    kp = torch.rand(b, n) < 0.6
    read = kernels.key_padding_from_mask
    dims = dict(batch=b, heads=h, n_q=n, n_k=n)
    assert torch.equal(read(kp[:, None, None, :], **dims), kp)  # HunyuanVideo's (B, 1, 1, N)
    assert torch.equal(read(kp[:, None, None, :].expand(b, h, n, n), **dims), kp)  # expand(): stride 0 rows
    assert torch.equal(read(kp[:1, None, None, :], **dims), kp[:1].expand(b, n))  # one mask for every batch
    assert torch.equal(read(kp[0], **dims), kp[0].expand(b, n))  # (N,) broadcasts like SDPA
    assert torch.equal(read(kp[0][None], **dims), kp[0].expand(b, n))  # (1, N)
    equal_rows = kp[:, None, None, :].repeat(1, 1, n, 1)  # rows equal in value, but that needs a sync to prove
    assert read(equal_rows, **dims) is None
    per_head = torch.rand(b, h, 1, n) < 0.5
    assert read(per_head, **dims) is None
    assert read(kp[:, None, :, None].expand(b, 1, n, 1), **dims) is None  # one value per query row
    assert read(torch.zeros(b, 1, 1, n), **dims) is None  # additive float mask
    assert read(kp[:, None, None, :4], **dims) is None  # not broadcastable
    with pytest.raises(ValueError, match="mask"):
        read(None, **dims)


def test_key_padding_from_mask_reads_no_values():
    """On the meta device a tensor has no values: any host read (``bool()``, ``.all()``, ``.item()``) would raise."""
    mask = torch.ones(2, 1, 1, 16, dtype=torch.bool, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        bool(mask.all())  # what the old check did
    kp = kernels.key_padding_from_mask(mask, batch=2, heads=4, n_q=16, n_k=16)
    assert kp is not None and kp.shape == (2, 16) and kp.device.type == "meta"
    expanded = mask.expand(2, 4, 16, 16)
    assert kernels.key_padding_from_mask(expanded, batch=2, heads=4, n_q=16, n_k=16).shape == (2, 16)


# ---------------------------------------------------------------------------------------------------------------
# references against brute force and SDPA
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "block_m", "block_n"), [(200, 64, 64), (300, 128, 64)])
def test_block_sparse_reference_with_key_padding(rng, n, block_m, block_n):
    b, h, d = 3, 2, 16
    q, k, v = _inputs(b, h, n, d, rng)
    mask, idx, cnt = random_lut(b, h, n, block_m, block_n, rng)
    kp = random_key_padding(b, n, block_n, rng)
    out, lse, mass = reference.block_sparse_attention(
        q, k, v, idx, cnt, block_m=block_m, block_n=block_n, return_mass=True, key_padding=kp
    )
    want, want_lse, p = brute_force(q, k, v, mask, block_m, block_n, key_padding=kp)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert_lse_close(lse, want_lse, 1e-5)
    assert torch.all(out[2] == 0) and torch.all(torch.isneginf(lse[2]))  # every key masked: SDPA's 0
    for bi, hi, i in [(0, 0, 1), (1, 1, 0), (0, 1, math.ceil(n / block_m) - 1)]:
        rows = p[bi, hi, i * block_m : (i + 1) * block_m]
        for s in range(int(cnt[bi, hi, i])):
            j = int(idx[bi, hi, i, s])
            want_mass = rows[:, j * block_n : (j + 1) * block_n].sum(-1).mean()
            assert abs(float(mass[bi, hi, i, s]) - float(want_mass)) < 1e-5


def test_dense_and_pair_reference_match_sdpa_with_a_boolean_mask(rng):
    b, h, n, d = 3, 2, 150, 16
    q, k, v = _inputs(b, h, n, d, rng)
    kp = random_key_padding(b, n, 64, rng)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=kp[:, None, None, :])
    assert torch.all(sdpa[2] == 0)  # SDPA's answer for rows with every key masked
    out, lse = reference.dense_attention(q, k, v, key_padding=kp)
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=1e-5)
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    want_lse = torch.logsumexp(s.masked_fill(~kp[:, None, None, :], float("-inf")), -1)
    assert_lse_close(lse, want_lse, 1e-5)
    mask, idx, cnt = random_lut(b, h, n, 64, 64, rng)
    o_s, lse_s, o_f, lse_f = kernels.block_sparse_attention_pair(
        q, k, v, idx, cnt, block_m=64, block_n=64, key_padding=kp
    )
    torch.testing.assert_close(o_f, sdpa, atol=1e-5, rtol=1e-5)
    assert_lse_close(lse_f, want_lse, 1e-5)
    want_s, want_lse_s, _ = brute_force(q, k, v, mask, 64, 64, key_padding=kp)
    torch.testing.assert_close(o_s.double(), want_s, atol=1e-5, rtol=1e-5)
    assert_lse_close(lse_s, want_lse_s, 1e-5)


@pytest.mark.parametrize("feature_map", ["softmax", "elu"])
def test_sparse_linear_reference_excludes_masked_keys(rng, feature_map):
    b, h, n, d, bm, bn = 3, 2, 200, 16, 64, 64
    q, k, v = _inputs(b, h, n, d, rng)
    mask, idx, cnt = random_lut(b, h, n, bm, bn, rng)
    negligible = torch.rand(mask.shape, generator=rng) < 0.2
    kp = random_key_padding(b, n, bn, rng)
    o_s, o_l, lse = reference.sparse_linear_attention(
        q, k, v, idx, cnt, block_m=bm, block_n=bn, negligible=negligible, feature_map=feature_map, key_padding=kp
    )
    want_s, _, _ = brute_force(q, k, v, mask, bm, bn, key_padding=kp)
    torch.testing.assert_close(o_s.double(), want_s, atol=1e-5, rtol=1e-5)
    phi = (lambda x: torch.softmax(x, -1)) if feature_map == "softmax" else (lambda x: F.elu(x) + 1)
    want_l = _linear_brute_force(q, k, v, ~mask & ~negligible, kp, bm, bn, phi)
    torch.testing.assert_close(o_l.double(), want_l, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(o_l).all() and torch.all(o_l[2] == 0)


def test_kept_mass_reference_uses_kept_keys_only(rng):
    b, h, n, d, bm, bn = 3, 1, 200, 8, 64, 64
    q, k, _ = _inputs(b, h, n, d, rng)
    kp = random_key_padding(b, n, bn, rng)
    n_q, n_k = math.ceil(n / bm), math.ceil(n / bn)
    outside = torch.rand(b, h, n_q, n_k, generator=rng) < 0.5
    outside[0, 0, 0] = False
    outside[0, 0, 0, n_k - 1] = True  # the only skipped block of this row is fully masked: all mass kept
    lse = torch.randn(b, h, n, generator=rng) + 2.0
    lse[2] = float("-inf")  # nothing to attend and nothing skipped holds a key
    alpha = reference.kept_mass(q, k, lse, outside, block_m=bm, block_n=bn, key_padding=kp)
    assert torch.isfinite(alpha).all()
    assert torch.all(alpha[0, 0, :bm] == 1) and torch.all(alpha[2] == 1)
    s = 1 / math.sqrt(d)
    for bi, i, row in [(0, 1, 70), (1, 2, 140), (1, 0, 5)]:
        total = 0.0
        for j in range(n_k):
            keys = k[bi, 0, j * bn : (j + 1) * bn][kp[bi, j * bn : (j + 1) * bn]].double()
            if not outside[bi, 0, i, j] or keys.numel() == 0:
                continue
            mean, var = keys.mean(0), keys.var(0, unbiased=False)
            qr = q[bi, 0, row].double()
            total += keys.shape[0] * math.exp(s * float(qr @ mean) + 0.5 * s * s * float(qr.pow(2) @ var))
        kept = math.exp(float(lse[bi, 0, row]))
        want = kept / (kept + total) if total > 0 else 1.0
        assert abs(float(alpha[bi, 0, row]) - want) < 1e-5


@pytest.mark.parametrize("smooth", [False, True])
def test_mean_pool_and_pooled_scores_ignore_masked_keys(rng, smooth):
    b, h, n, d, block = 2, 2, 200, 8, 64
    x = torch.randn(b, h, n, d, generator=rng)
    kp = random_key_padding(b, n, block, rng)
    got = reference.mean_pool(x, block, smooth=smooth, key_padding=kp)
    for bi in range(b):
        kept = x[bi][:, kp[bi]]
        centre = kept.mean(1) if smooth else torch.zeros(h, d)
        for j in range(math.ceil(n / block)):
            keep = kp[bi, j * block : (j + 1) * block]
            if not keep.any():
                assert torch.all(got[bi, :, j] == 0)
                continue
            want = x[bi, :, j * block : (j + 1) * block][:, keep].mean(1) - centre
            torch.testing.assert_close(got[bi, :, j], want, atol=1e-5, rtol=1e-5)
    q = torch.randn(b, h, n, d, generator=rng)
    scores = reference.pooled_scores(q, x, 64, block, key_padding=kp)
    alive = reference.key_blocks_alive(kp, block)
    assert torch.equal(torch.isneginf(scores), (~alive)[:, None, None, :].expand_as(scores))
    forced = torch.zeros(scores.shape[-2:], dtype=torch.bool)
    forced[:, -1] = True  # a forced block that is fully masked in batch 0 still leaves the LUT
    idx, cnt = reference.pooled_topk_lut(q, x, 64, block, 3, forced=forced, key_padding=kp)
    listed = reference.selected_block_mask(idx, cnt, scores.shape[-1])
    assert not (listed & ~alive[:, None, None, :]).any()
    assert torch.all(cnt[0] == 3)  # batch 0: 3 of its 3 live blocks; the forced dead one dropped


def test_bad_key_padding_is_named():
    q = torch.randn(1, 1, 100, 16)
    idx = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    cnt = torch.ones(1, 1, 2, dtype=torch.int32)
    for bad in (torch.ones(1, 99, dtype=torch.bool), torch.ones(1, 100)):
        with pytest.raises(ValueError, match="key_padding"):
            kernels.block_sparse_attention(q, q, q, idx, cnt, block_m=64, block_n=64, key_padding=bad)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels against the references
# ---------------------------------------------------------------------------------------------------------------

CASES = [  # (n, d, block_m, block_n, dtype)
    (200, 64, 64, 64, torch.float32),
    (300, 32, 128, 128, torch.float16),  # 64-key sub-tiles of a 128-key block: a fully masked sub-tile first
]


@pytest.mark.parametrize(("n", "d", "block_m", "block_n", "dtype"), CASES)
def test_triton_block_sparse_and_pair_with_key_padding(rng, device, monkeypatch, n, d, block_m, block_n, dtype):
    b, h = 3, 1
    q, k, v = _inputs(b, h, n, d, rng, dtype, device)
    _, idx, cnt = random_lut(b, h, n, block_m, block_n, rng)
    kp = random_key_padding(b, n, block_n, rng)
    kp[1, :64] = False  # a 128-key block whose first 64-key sub-tile is fully masked
    idx, cnt, kp = idx.to(device), cnt.to(device), kp.to(device)
    tol = TOL[dtype]
    want = reference.block_sparse_attention(
        q, k, v, idx, cnt, block_m=block_m, block_n=block_n, return_mass=True, key_padding=kp
    )
    want_pair = reference.block_sparse_attention_pair(
        q, k, v, idx, cnt, block_m=block_m, block_n=block_n, key_padding=kp
    )
    configs = tbs._candidates("bsa", block_m, block_n, tbs._pow2(d), dtype == torch.float32, False)
    configs = list({(c["tile_m"], c["tile_n"]): c for c in configs}.values())
    for cfg in configs:
        monkeypatch.setattr(tbs, "_candidates", lambda *args, cfg=cfg: [cfg])
        out, lse, mass = tbs.block_sparse_attention(
            q, k, v, idx, cnt, block_m=block_m, block_n=block_n, return_mass=True, key_padding=kp
        )
        assert torch.isfinite(out).all() and torch.isfinite(mass).all()
        torch.testing.assert_close(out.float(), want[0].float(), atol=tol, rtol=tol)
        assert_lse_close(lse, want[1], 1e-4 if dtype == torch.float32 else 2e-3)
        torch.testing.assert_close(mass, want[2], atol=tol, rtol=tol)
        pair = tbs.block_sparse_attention_pair(q, k, v, idx, cnt, block_m=block_m, block_n=block_n, key_padding=kp)
        for i in (0, 2):
            assert torch.isfinite(pair[i]).all()
            torch.testing.assert_close(pair[i].float(), want_pair[i].float(), atol=tol, rtol=tol)
        for i in (1, 3):
            assert_lse_close(pair[i], want_pair[i], 1e-4 if dtype == torch.float32 else 2e-3)
    assert torch.all(out[2] == 0)


@pytest.mark.parametrize("selected", [1, 3])
def test_triton_sparse_linear_with_key_padding(rng, device, selected):
    """Few selected blocks: totals minus the selected ones; many: the marginal blocks directly (both orders)."""
    b, h, n, d, blocks = 3, 1, 300, 32, 5
    q, k, v = _inputs(b, h, n, d, rng, torch.float32, device)
    mask = torch.rand(b, h, blocks, blocks, generator=rng).argsort(-1) < selected
    idx, cnt = reference.lut_from_mask(mask)
    kp = random_key_padding(b, n, 64, rng).to(device)
    args = (q, k, v, idx.to(device), cnt.to(device))
    got = tbs.sparse_linear_attention(*args, block_m=64, block_n=64, key_padding=kp)
    want = reference.sparse_linear_attention(*args, block_m=64, block_n=64, key_padding=kp)
    for g, w in zip(got[:2], want[:2]):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert_lse_close(got[2], want[2], 1e-4)


def test_triton_kept_mass_and_pooling_with_key_padding(rng, device):
    b, h, n, d, bm, bn = 3, 2, 200, 32, 64, 64
    q, k, _ = _inputs(b, h, n, d, rng, torch.float32, device)
    kp = random_key_padding(b, n, bn, rng).to(device)
    n_q, n_k = math.ceil(n / bm), math.ceil(n / bn)
    outside = (torch.rand(b, h, n_q, n_k, generator=rng) < 0.5).to(device)
    lse = (torch.randn(b, h, n, generator=rng) + 3.0).to(device)
    lse[2] = float("-inf")
    got = tbs.kept_mass(q, k, lse, outside, block_m=bm, block_n=bn, key_padding=kp)
    want = reference.kept_mass(q, k, lse, outside, block_m=bm, block_n=bn, key_padding=kp)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for smooth in (False, True):
        got_pool = tbs.mean_pool(k, bn, smooth=smooth, key_padding=kp)
        torch.testing.assert_close(got_pool, reference.mean_pool(k, bn, smooth=smooth, key_padding=kp))
    forced = torch.zeros(n_q, n_k, dtype=torch.bool, device=device)
    forced[:, -1] = True
    got_lut = tbs.pooled_topk_lut(q, k, bm, bn, 2, forced=forced, key_padding=kp)
    want_lut = reference.pooled_topk_lut(q, k, bm, bn, 2, forced=forced, key_padding=kp)
    assert torch.equal(got_lut[1], want_lut[1])
    for got_m, want_m in zip(
        reference.selected_block_mask(*got_lut, n_k).unbind(), reference.selected_block_mask(*want_lut, n_k).unbind()
    ):
        assert torch.equal(got_m, want_m)
