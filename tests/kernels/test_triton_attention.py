"""Triton attention kernels against the exact references on fresh random inputs.

On a CPU they run under the Triton interpreter (see conftest.py), so shapes stay small: N of a few hundred,
B * H <= 4. Every case has ragged LUT rows, an empty row, junk past the counts, and N not a multiple of a block.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_helpers import assert_lse_close, random_lut

from dit_accel import kernels
from dit_accel.kernels import reference
from dit_accel.kernels import triton_block_sparse as tbs

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}

CASES = [  # (n, d, block_m, block_n, dtype)
    (200, 64, 64, 64, torch.float32),
    (300, 128, 128, 64, torch.float16),
    (257, 128, 64, 128, torch.bfloat16),
    (256, 64, 128, 128, torch.bfloat16),
    (190, 72, 64, 64, torch.float32),  # head_dim padded to 128 inside the kernel
    (130, 32, 64, 64, torch.float16),
]


def _inputs(b, h, n, d, dtype, rng, device):
    return [torch.randn(b, h, n, d, generator=rng).to(device=device, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(("n", "d", "block_m", "block_n", "dtype"), CASES)
def test_block_sparse_matches_reference(rng, device, n, d, block_m, block_n, dtype):
    b, h = 1, 2
    q, k, v = _inputs(b, h, n, d, dtype, rng, device)
    _, idx, cnt = random_lut(b, h, n, block_m, block_n, rng)
    idx, cnt = idx.to(device), cnt.to(device)
    out, lse, mass = tbs.block_sparse_attention(q, k, v, idx, cnt, block_m=block_m, block_n=block_n, return_mass=True)
    ref_out, ref_lse, ref_mass = reference.block_sparse_attention(
        q, k, v, idx, cnt, block_m=block_m, block_n=block_n, return_mass=True
    )
    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == (b, h, n, d) and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    assert_lse_close(lse, ref_lse, 1e-4 if dtype == torch.float32 else 2e-3)
    torch.testing.assert_close(mass, ref_mass, atol=tol, rtol=tol)
    assert torch.all(out[0, 0, :block_m] == 0)  # the empty row


def test_block_sparse_scale_no_lse_and_strided_inputs(rng, device):
    b, n, h, d = 2, 150, 2, 64
    # (B, S, H, D) as diffusers hands it, viewed as (B, H, S, D): not contiguous
    q, k, v = (torch.randn(b, n, h, d, generator=rng).to(device).transpose(1, 2) for _ in range(3))
    _, idx, cnt = random_lut(b, h, n, 64, 64, rng)
    idx, cnt = idx.to(device), cnt.to(device)
    out = tbs.block_sparse_attention(q, k, v, idx, cnt, block_m=64, block_n=64, scale=0.3, return_lse=False)
    ref = reference.block_sparse_attention(q, k, v, idx, cnt, block_m=64, block_n=64, scale=0.3, return_lse=False)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_tensor_descriptor_path(rng, device, monkeypatch):
    """``DIT_ACCEL_TMA=force`` takes the TMA-descriptor loads (interpreted on a CPU); the result is the same."""
    if tbs.TensorDescriptor is None:
        pytest.skip("this Triton has no host tensor descriptors")
    monkeypatch.setenv("DIT_ACCEL_TMA", "force")
    monkeypatch.setenv("DIT_ACCEL_AUTOTUNE", "0")
    n, d = 200, 64
    q, k, v = _inputs(1, 2, n, d, torch.float16, rng, device)
    _, idx, cnt = random_lut(1, 2, n, 64, 64, rng)
    idx, cnt = idx.to(device), cnt.to(device)
    assert tbs._Prepared(q, k, v, idx, cnt, 64, 64, None).tma_ok
    out, lse = tbs.block_sparse_attention(q, k, v, idx, cnt, block_m=64, block_n=64)
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, idx, cnt, block_m=64, block_n=64)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=4e-3, rtol=4e-3)
    assert_lse_close(lse, ref_lse, 2e-3)
    o_s, lse_s, o_f, lse_f = tbs.block_sparse_attention_pair(q, k, v, idx, cnt, block_m=64, block_n=64)
    torch.testing.assert_close(o_s.float(), ref_out.float(), atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize(("n", "d", "block_m", "block_n", "dtype"), CASES[:3])
def test_pair_matches_sparse_and_dense_reference(rng, device, n, d, block_m, block_n, dtype):
    b, h = 2, 1
    q, k, v = _inputs(b, h, n, d, dtype, rng, device)
    _, idx, cnt = random_lut(b, h, n, block_m, block_n, rng)
    idx, cnt = idx.to(device), cnt.to(device)
    got = tbs.block_sparse_attention_pair(q, k, v, idx, cnt, block_m=block_m, block_n=block_n)
    want = reference.block_sparse_attention_pair(q, k, v, idx, cnt, block_m=block_m, block_n=block_n)
    tol = TOL[dtype]
    for i in (0, 2):
        assert got[i].dtype == dtype
        torch.testing.assert_close(got[i].float(), want[i].float(), atol=tol, rtol=tol)
    for i in (1, 3):
        assert_lse_close(got[i], want[i], 1e-4 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("feature_map", ["softmax", "elu"])
@pytest.mark.parametrize(("n", "d", "block_m", "block_n", "dtype"), [CASES[0], CASES[1], CASES[4]])
def test_sparse_linear_matches_reference(rng, device, feature_map, n, d, block_m, block_n, dtype):
    b, h = 1, 2
    q, k, v = _inputs(b, h, n, d, dtype, rng, device)
    mask, idx, cnt = random_lut(b, h, n, block_m, block_n, rng)
    n_q, n_k = mask.shape[-2:]
    negligible = torch.rand(b, h, n_q, n_k, generator=rng) < 0.4
    negligible[0, 1, 0] = ~mask[0, 1, 0]  # a row whose every unselected block is negligible: no marginal block
    tol = TOL[dtype] * 2
    for neg in (None, negligible.to(device)):
        got = tbs.sparse_linear_attention(
            q, k, v, idx, cnt, block_m=block_m, block_n=block_n, negligible=neg, feature_map=feature_map
        )
        want = reference.sparse_linear_attention(
            q, k, v, idx, cnt, block_m=block_m, block_n=block_n, negligible=neg, feature_map=feature_map
        )
        torch.testing.assert_close(got[0].float(), want[0].float(), atol=tol, rtol=tol)
        torch.testing.assert_close(got[1].float(), want[1].float(), atol=tol, rtol=tol)
        assert_lse_close(got[2], want[2], 1e-4 if dtype == torch.float32 else 2e-3)
    assert torch.all(got[1][0, 1, :block_m] == 0)


def test_sparse_linear_all_selected_gives_zero_linear(rng, device):
    n, d = 130, 64
    q, k, v = _inputs(1, 1, n, d, torch.float32, rng, device)
    mask = torch.ones(1, 1, math.ceil(n / 64), math.ceil(n / 64), dtype=torch.bool)
    idx, cnt = reference.lut_from_mask(mask)
    o_s, o_l, _ = tbs.sparse_linear_attention(q, k, v, idx.to(device), cnt.to(device), block_m=64, block_n=64)
    assert torch.all(o_l == 0)
    torch.testing.assert_close(o_s, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=2e-5)


def test_dispatch_forced_to_triton(rng, device, monkeypatch):
    monkeypatch.setenv("DIT_ACCEL_KERNELS", "triton")
    assert kernels.backend_for(device) == "triton"
    n, d = 130, 64
    q, k, v = _inputs(1, 1, n, d, torch.float32, rng, device)
    _, idx, cnt = random_lut(1, 1, n, 64, 64, rng)
    idx, cnt = idx.to(device), cnt.to(device)
    out, lse = kernels.block_sparse_attention(q, k, v, idx, cnt, block_m=64, block_n=64)
    o_s, o_l, lse2 = kernels.sparse_linear_attention(q, k, v, idx, cnt, block_m=64, block_n=64)
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, idx, cnt, block_m=64, block_n=64)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(o_s, ref_out, atol=2e-5, rtol=2e-5)
    assert_lse_close(lse2, ref_lse, 1e-4)
    monkeypatch.setenv("DIT_ACCEL_KERNELS", "reference")
    assert kernels.backend_for(device) == "reference"


def test_bad_inputs_are_named(device):
    q = torch.randn(1, 1, 100, 64, device=device)
    idx = torch.zeros(1, 1, 2, 1, dtype=torch.int32, device=device)
    cnt = torch.ones(1, 1, 2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="dtype"):
        tbs.block_sparse_attention(q.double(), q.double(), q.double(), idx, cnt, block_m=64, block_n=64)
    with pytest.raises(ValueError, match="feature_map"):
        tbs.sparse_linear_attention(q, q, q, idx, cnt, block_m=64, block_n=64, feature_map="relu")
    with pytest.raises(ValueError, match="negligible"):
        bad = torch.zeros(1, 1, 3, 2, dtype=torch.bool, device=device)
        tbs.sparse_linear_attention(q, q, q, idx, cnt, block_m=64, block_n=64, negligible=bad)


def test_every_tuning_candidate_is_exact(rng, device, monkeypatch):
    """Each launch configuration the autotuner may pick (query tile < block_m, key sub-tiles < block_n, ...)
    gives the reference result, for all three attention kernels (mass included: atomics when tiles split a block)."""
    n, d, dtype = 150, 128, torch.float16
    q, k, v = _inputs(1, 2, n, d, dtype, rng, device)
    _, idx, cnt = random_lut(1, 2, n, 128, 128, rng)
    idx, cnt = idx.to(device), cnt.to(device)
    want = reference.block_sparse_attention(q, k, v, idx, cnt, block_m=128, block_n=128, return_mass=True)
    want_pair = reference.block_sparse_attention_pair(q, k, v, idx, cnt, block_m=128, block_n=128)
    want_sla = reference.sparse_linear_attention(q, k, v, idx, cnt, block_m=128, block_n=128)
    tol = dict(atol=4e-3, rtol=4e-3)
    configs = tbs._candidates("bsa", 128, 128, d, False, tbs._tma_eligible(k, v))
    assert {(c["tile_m"], c["tile_n"]) for c in configs} == {(64, 64), (64, 128), (128, 64), (128, 128)}
    # one config per tile shape (the interpreter ignores warps and stages; on a GPU a candidate that does not
    # compile is skipped by the tuner, so its correctness does not matter)
    configs = list({(c["tile_m"], c["tile_n"], c["tma"]): c for c in configs}.values())
    for cfg in configs:
        monkeypatch.setattr(tbs, "_candidates", lambda *args, cfg=cfg: [cfg])
        out, lse, mass = tbs.block_sparse_attention(q, k, v, idx, cnt, block_m=128, block_n=128, return_mass=True)
        torch.testing.assert_close(out.float(), want[0].float(), **tol)
        assert_lse_close(lse, want[1], 2e-3)
        torch.testing.assert_close(mass, want[2], **tol)
        pair = tbs.block_sparse_attention_pair(q, k, v, idx, cnt, block_m=128, block_n=128)
        torch.testing.assert_close(pair[0].float(), want_pair[0].float(), **tol)
        torch.testing.assert_close(pair[2].float(), want_pair[2].float(), **tol)
        sla = tbs.sparse_linear_attention(q, k, v, idx, cnt, block_m=128, block_n=128)
        torch.testing.assert_close(sla[1].float(), want_sla[1].float(), **tol)


def test_full_width_lut_and_mass(rng, device):
    """The LUT as lut_from_mask builds it (as wide as the mask, unselected columns as padding)."""
    n, d = 200, 64
    q, k, v = _inputs(1, 2, n, d, torch.float32, rng, device)
    mask = (torch.rand(1, 2, 4, 4, generator=rng) < 0.5).to(device)
    idx, cnt = reference.lut_from_mask(mask)
    got = tbs.block_sparse_attention(q, k, v, idx, cnt, block_m=64, block_n=64, return_mass=True)
    want = reference.block_sparse_attention(q, k, v, idx, cnt, block_m=64, block_n=64, return_mass=True)
    assert got[2].shape == want[2].shape == (1, 2, 4, 4)
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got[2], want[2], atol=2e-5, rtol=2e-5)


def test_tuning_key_tells_dense_from_sparse_luts():
    """A 97%-sparse top-k LUT is tuned apart from the dense one (its best launch differs); the pair kernel, which
    visits every block, is not."""
    q = k = v = torch.zeros(1, 2, 4096, 64)
    counts = torch.ones(1, 2, 32, dtype=torch.int32)

    def prepared(width):
        return tbs._Prepared(q, k, v, torch.zeros(1, 2, 32, width, dtype=torch.int32), counts, 128, 128, None)

    dense, sparse = prepared(32).key(), prepared(1).key()
    assert dense[:-1] == sparse[:-1]
    assert (dense[-1], sparse[-1]) == ("w0", "w5")
    assert prepared(32).key(by_sparsity=False) == prepared(1).key(by_sparsity=False)


@pytest.mark.parametrize("selected", [1, 7])
def test_sparse_linear_both_summation_orders(rng, device, selected):
    """Few selected blocks: the linear sums are the totals minus the selected blocks' terms; many selected: the
    marginal blocks are summed directly. Both give the reference."""
    n, d, blocks = 500, 64, 8
    q, k, v = _inputs(1, 2, n, d, torch.float32, rng, device)
    order = torch.rand(1, 2, blocks, blocks, generator=rng).argsort(-1)
    mask = order < selected
    idx, cnt = reference.lut_from_mask(mask)
    args = (q, k, v, idx.to(device), cnt.to(device))
    got = tbs.sparse_linear_attention(*args, block_m=64, block_n=64)
    want = reference.sparse_linear_attention(*args, block_m=64, block_n=64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("n", "d", "block_m", "block_n", "dtype"), [CASES[0], CASES[1], CASES[4]])
@pytest.mark.parametrize("per_head", [False, True])
def test_kept_mass_matches_reference(rng, device, n, d, block_m, block_n, dtype, per_head):
    b, h = 1, 2
    q, k, _ = _inputs(b, h, n, d, dtype, rng, device)
    n_q, n_k = math.ceil(n / block_m), math.ceil(n / block_n)
    outside = torch.rand(b if per_head else 1, h if per_head else 1, n_q, n_k, generator=rng) < 0.5
    outside[..., 0, :] = False  # a query block that skipped nothing keeps all its mass
    lse = torch.randn(b, h, n, generator=rng).to(device) + 3.0
    got = tbs.kept_mass(q, k, lse, outside.to(device), block_m=block_m, block_n=block_n)
    want = reference.kept_mass(q, k, lse, outside.to(device), block_m=block_m, block_n=block_n)
    tol = 1e-4 if dtype == torch.float32 else 5e-3  # 16-bit inputs take TF32 dots when compiled on a GPU
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert torch.all(got[:, :, :block_m] == 1)


def _dense_stand_in(shift: float):
    def call(q, k, v, scale):
        out, lse = reference.dense_attention(q, k, v, scale=scale)
        return out, lse + shift

    return call


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_pair_through_dense_lse_path(rng, device, monkeypatch, shift):
    """Refresh pairs from the dense-with-LSE path (cuDNN on a GPU; a stand-in here) equal the reference; a dense
    LSE that fails the one-time check (shifted by 1) switches the path off and the pair kernel answers instead."""
    from dit_accel.kernels import dense_lse

    monkeypatch.setattr(dense_lse, "_DEVICE_TYPES", (torch.device(device).type,))
    monkeypatch.setattr(dense_lse, "_VERIFIED", {})
    monkeypatch.setattr(dense_lse, "_cudnn_call", _dense_stand_in(shift))
    n, d = 200, 64
    q, k, v = _inputs(1, 2, n, d, torch.float16, rng, device)
    _, idx, cnt = random_lut(1, 2, n, 64, 64, rng)
    idx, cnt = idx.to(device), cnt.to(device)
    if shift:
        with pytest.warns(UserWarning, match="did not match"):
            got = tbs.block_sparse_attention_pair(q, k, v, idx, cnt, block_m=64, block_n=64)
    else:
        got = tbs.block_sparse_attention_pair(q, k, v, idx, cnt, block_m=64, block_n=64)
    assert list(dense_lse._VERIFIED.values()) == [not shift]
    want = reference.block_sparse_attention_pair(q, k, v, idx, cnt, block_m=64, block_n=64)
    for i in (0, 2):
        torch.testing.assert_close(got[i].float(), want[i].float(), atol=4e-3, rtol=4e-3)
    for i in (1, 3):
        assert_lse_close(got[i], want[i], 2e-3)


@pytest.mark.parametrize(("n", "d", "block_m", "block_n", "dtype"), [CASES[0], CASES[2], CASES[4]])
@pytest.mark.parametrize("clamp", [False, True])
def test_reshape_epilogue_matches_the_unfused_formula(rng, device, n, d, block_m, block_n, dtype, clamp):
    """rho_c * O + R in the kernel's epilogue equals the formula applied to the plain kernel's output, on every
    row (the empty query block gets R alone), with a strided residual, for the Triton, CPU and reference paths."""
    from dit_accel.compensation import reshape_output
    from dit_accel.kernels import cpu

    b, h = 1, 2
    q, k, v = _inputs(b, h, n, d, dtype, rng, device)
    _, idx, cnt = random_lut(b, h, n, block_m, block_n, rng)
    idx, cnt = idx.to(device), cnt.to(device)
    rho = torch.rand(b, h, n, generator=rng).to(device) * 1.2  # some rows above 1: the clamp matters
    residual = torch.randn(b, n, h, d, generator=rng).to(device=device, dtype=dtype).transpose(1, 2)
    kw = dict(block_m=block_m, block_n=block_n, scale=0.2)
    plain = reference.block_sparse_attention(q.float(), k.float(), v.float(), idx, cnt, **kw)[0]
    want = reshape_output(plain, rho, residual, ramp=0.05, uses=3, clamp=clamp)
    tol = TOL[dtype]
    for impl in (tbs.block_sparse_attention, cpu.block_sparse_attention, reference.block_sparse_attention):
        out, lse = impl(q, k, v, idx, cnt, **kw, rho=rho, residual=residual, rho_add=0.15, rho_clamp=clamp)
        assert out.dtype == dtype, impl
        torch.testing.assert_close(out.float(), want, atol=3 * tol, rtol=3 * tol)
        assert_lse_close(lse, reference.block_sparse_attention(q, k, v, idx, cnt, **kw)[1], 2e-3)
    torch.testing.assert_close(out[0, 0, :block_m].float(), residual[0, 0, :block_m].float(), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="rho and residual go together"):
        tbs.block_sparse_attention(q, k, v, idx, cnt, **kw, rho=rho)


def test_sparse_linear_helper_luts_are_built_once_per_pattern(rng, device, monkeypatch):
    """With the pattern's helper_cache the helper LUTs are built on the first call only, reused while the negligible
    mask is unchanged (results still equal the reference), and rebuilt after an in-place change to it."""
    n, d, block_m, block_n = 200, 64, 64, 64
    q, k, v = _inputs(1, 2, n, d, torch.float32, rng, device)
    mask, idx, cnt = random_lut(1, 2, n, block_m, block_n, rng)
    negligible = (torch.rand(*mask.shape, generator=rng) < 0.4).to(device)
    built = []
    real = tbs.lut_from_mask
    monkeypatch.setattr(tbs, "lut_from_mask", lambda m: built.append(1) or real(m))
    cache: dict = {}
    kw = dict(block_m=block_m, block_n=block_n, negligible=negligible)
    for call in range(3):
        if call == 2:
            negligible[0, 0] = ~negligible[0, 0]  # in place: the cached LUTs no longer hold
        got = tbs.sparse_linear_attention(q, k, v, idx, cnt, **kw, helper_cache=cache)
        want = reference.sparse_linear_attention(q, k, v, idx, cnt, **kw)
        torch.testing.assert_close(got[1], want[1], atol=4e-5, rtol=4e-5)
        assert len(built) == (2 if call < 2 else 4), (call, len(built))  # two LUTs per build
