"""GPU-only checks at realistic sizes in bfloat16 (skipped without CUDA): the compiled kernels against the
references and SDPA, the TMA path, CUDA-graph capture and the persistent autotuning cache."""

from __future__ import annotations

import json
import math

import pytest
import torch
from kernel_helpers import assert_lse_close

from dit_accel.kernels import reference
from dit_accel.kernels import triton_block_sparse as tbs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BF16_TOL = dict(atol=2e-2, rtol=2e-2)


def _lut(b, h, n, block_m, block_n, density, gen, device="cuda"):
    n_q, n_k = math.ceil(n / block_m), math.ceil(n / block_n)
    mask = torch.rand(b, h, n_q, n_k, generator=gen, device=device) < density
    mask[..., 0] = True  # never an empty row here: SDPA comparisons need one key
    return mask, *reference.lut_from_mask(mask)


def _qkv(b, h, n, d, gen, dtype=torch.bfloat16):
    return [torch.randn(b, h, n, d, generator=gen, device="cuda").to(dtype) for _ in range(3)]


def _assert_pair_close(got, want) -> None:
    """(o_sparse, lse_sparse, o_full, lse_full) tuples equal at bf16 tolerances."""
    for i in (0, 2):
        torch.testing.assert_close(got[i].float(), want[i].float(), **BF16_TOL)
    for i in (1, 3):
        assert_lse_close(got[i], want[i], 1e-2)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(torch.seed() % (1 << 31))


SHAPES = [(8190, 4, 128, 128, 128), (8190, 4, 128, 128, 64), (6000, 6, 64, 64, 64), (6000, 6, 64, 128, 64)]


@pytest.mark.parametrize(("n", "h", "d", "block_m", "block_n"), SHAPES)
@pytest.mark.parametrize("density", [0.1, 0.5])
def test_block_sparse_bf16_matches_reference(gen, n, h, d, block_m, block_n, density):
    q, k, v = _qkv(1, h, n, d, gen)
    _, idx, cnt = _lut(1, h, n, block_m, block_n, density, gen)
    out, lse = tbs.block_sparse_attention(q, k, v, idx, cnt, block_m=block_m, block_n=block_n)
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, idx, cnt, block_m=block_m, block_n=block_n)
    torch.testing.assert_close(out.float(), ref_out.float(), **BF16_TOL)
    assert_lse_close(lse, ref_lse, 1e-2)


@pytest.mark.parametrize("d", [64, 128])
def test_all_blocks_match_sdpa(gen, d):
    n, h = 4096, 8
    q, k, v = _qkv(1, h, n, d, gen)
    mask = torch.ones(1, h, n // 128, n // 128, dtype=torch.bool, device="cuda")
    idx, cnt = reference.lut_from_mask(mask)
    out = tbs.block_sparse_attention(q, k, v, idx, cnt, block_m=128, block_n=128, return_lse=False)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out.float(), sdpa.float(), **BF16_TOL)


def test_mass_pair_and_sla_bf16(gen, monkeypatch):
    monkeypatch.setenv("DIT_ACCEL_DENSE_LSE", "0")  # the pair kernel itself, not cuDNN's dense pass
    n, h, d = 4100, 4, 128
    q, k, v = _qkv(1, h, n, d, gen)
    _, idx, cnt = _lut(1, h, n, 64, 64, 0.2, gen)
    _, _, mass = tbs.block_sparse_attention(q, k, v, idx, cnt, block_m=64, block_n=64, return_mass=True)
    _, _, ref_mass = reference.block_sparse_attention(q, k, v, idx, cnt, block_m=64, block_n=64, return_mass=True)
    torch.testing.assert_close(mass, ref_mass, atol=2e-3, rtol=2e-2)
    got = tbs.block_sparse_attention_pair(q, k, v, idx, cnt, block_m=64, block_n=64)
    want = reference.block_sparse_attention_pair(q, k, v, idx, cnt, block_m=64, block_n=64)
    _assert_pair_close(got, want)
    neg = torch.rand(1, h, math.ceil(n / 64), math.ceil(n / 64), generator=gen, device="cuda") < 0.5
    for negligible in (None, neg):
        o_s, o_l, lse = tbs.sparse_linear_attention(q, k, v, idx, cnt, block_m=64, block_n=64, negligible=negligible)
        r_s, r_l, r_lse = reference.sparse_linear_attention(
            q, k, v, idx, cnt, block_m=64, block_n=64, negligible=negligible
        )
        torch.testing.assert_close(o_s.float(), r_s.float(), **BF16_TOL)
        torch.testing.assert_close(o_l.float(), r_l.float(), **BF16_TOL)


def test_fp32_and_tma_paths(gen, monkeypatch):
    n, h, d = 3000, 2, 128
    q, k, v = _qkv(1, h, n, d, gen, torch.float32)
    _, idx, cnt = _lut(1, h, n, 128, 64, 0.3, gen)
    out, lse = tbs.block_sparse_attention(q, k, v, idx, cnt, block_m=128, block_n=64)
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, idx, cnt, block_m=128, block_n=64)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    if torch.cuda.get_device_capability()[0] < 9 or tbs.TensorDescriptor is None:
        pytest.skip("TMA descriptors need Hopper or newer and Triton >= 3.4")
    monkeypatch.setenv("DIT_ACCEL_TMA", "force")
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    out, lse = tbs.block_sparse_attention(qb, kb, vb, idx, cnt, block_m=128, block_n=64)
    ref_out, _ = reference.block_sparse_attention(qb, kb, vb, idx, cnt, block_m=128, block_n=64)
    torch.testing.assert_close(out.float(), ref_out.float(), **BF16_TOL)


def test_pattern_kernels_at_wan_size(gen):
    b, h, n, d = 1, 12, 32760, 128
    q, k, _ = _qkv(b, h, n, d, gen)
    for smooth in (False, True):
        want = reference.mean_pool(k, 64, smooth=smooth)
        torch.testing.assert_close(tbs.mean_pool(k, 64, smooth=smooth), want, atol=1e-4, rtol=1e-4)
    scores = torch.randn(b, h, 512, 512, generator=gen, device="cuda")
    forced = torch.zeros_like(scores, dtype=torch.bool)
    forced[..., 0] = True
    assert torch.equal(tbs.topk_mask(scores, 26, forced=forced), reference.topk_mask(scores, 26, forced=forced))
    assert torch.equal(tbs.threshold_mask(scores * 4, 0.9), reference.threshold_mask(scores * 4, 0.9))
    mask = scores > 1.0
    got, want = tbs.lut_from_mask(mask), reference.lut_from_mask(mask)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    perm = torch.randperm(n, device="cuda")
    assert torch.equal(tbs.unpermute_tokens(tbs.permute_tokens(q, perm), perm), q)


def test_cuda_graph_capture_and_replay(gen):
    n, h, d = 4096, 4, 128
    q, k, v = _qkv(1, h, n, d, gen)
    _, idx, cnt = _lut(1, h, n, 128, 128, 0.25, gen)
    tbs.block_sparse_attention(q, k, v, idx, cnt, block_m=128, block_n=128)  # compile (and tune) outside capture
    tbs.pooled_topk_lut(q, k, 128, 128, 8)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        lut, counts = tbs.pooled_topk_lut(q, k, 128, 128, 8)
        out, lse = tbs.block_sparse_attention(q, k, v, lut, counts, block_m=128, block_n=128)
    torch.cuda.current_stream().wait_stream(stream)
    for x in (q, k, v):
        x.copy_(torch.randn(x.shape, generator=gen, device="cuda").bfloat16())
    graph.replay()
    torch.cuda.synchronize()
    ref_lut, ref_counts = reference.pooled_topk_lut(q, k, 128, 128, 8)
    ref_out, _ = reference.block_sparse_attention(q, k, v, ref_lut, ref_counts, block_m=128, block_n=128)
    torch.testing.assert_close(out.float(), ref_out.float(), **BF16_TOL)


def test_autotune_writes_a_persistent_cache(gen, monkeypatch, tmp_path):
    monkeypatch.setenv("DIT_ACCEL_AUTOTUNE", "1")
    monkeypatch.setenv("DIT_ACCEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tbs, "_CACHE", None)
    full = tbs._candidates
    monkeypatch.setattr(tbs, "_candidates", lambda *args: full(*args)[:3])  # three compiles keep the test short
    n, h, d = 2048, 2, 64
    q, k, v = _qkv(1, h, n, d, gen)
    _, idx, cnt = _lut(1, h, n, 128, 64, 0.5, gen)
    out, _ = tbs.block_sparse_attention(q, k, v, idx, cnt, block_m=128, block_n=64)
    ref_out, _ = reference.block_sparse_attention(q, k, v, idx, cnt, block_m=128, block_n=64)
    torch.testing.assert_close(out.float(), ref_out.float(), **BF16_TOL)
    entries = json.loads((tmp_path / "autotune.json").read_text())
    assert any("|bsa|" in key for key in entries), entries
    monkeypatch.setattr(tbs, "_CACHE", None)  # a new process would read the file back
    assert tbs._load_cache() == entries


@pytest.mark.parametrize("d", [64, 128])
def test_cudnn_dense_lse_path_is_taken_and_exact(gen, d):
    """On a GPU with cuDNN attention the refresh pair comes from cuDNN's dense pass plus the sparse kernel; its
    LSE passes the one-time check and the pair equals the reference."""
    from dit_accel.kernels import dense_lse

    n, h = 4100, 4
    q, k, v = _qkv(1, h, n, d, gen)
    dense = dense_lse.dense_with_lse(q, k, v)
    assert dense is not None, dense_lse._VERIFIED
    _, idx, cnt = _lut(1, h, n, 64, 64, 0.2, gen)
    got = tbs.block_sparse_attention_pair(q, k, v, idx, cnt, block_m=64, block_n=64)
    want = reference.block_sparse_attention_pair(q, k, v, idx, cnt, block_m=64, block_n=64)
    _assert_pair_close(got, want)


def test_flex_backend_compiled_matches_reference():
    """The FlexAttention backend compiled on CUDA (full and partial blocks from the LUT) against the reference."""
    from dit_accel.kernels import flex

    gen = torch.Generator(device="cuda").manual_seed(11)
    n = 4096 + 100  # a partial last block
    q, k, v = _qkv(1, 4, n, 64, gen)
    _, idx, cnt = _lut(1, 4, n, 64, 64, 0.15, gen)
    out, lse = flex.block_sparse_attention(q, k, v, idx, cnt, block_m=64, block_n=64)
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, idx, cnt, block_m=64, block_n=64)
    torch.testing.assert_close(out.float(), ref_out.float(), **BF16_TOL)
    assert_lse_close(lse, ref_lse, 1e-2)


def _fa4_or_skip():
    from dit_accel.kernels import fa4

    if not fa4.fa4_available():
        pytest.skip(f"needs FlashAttention-4 ({fa4.FA4_PACKAGE}, scripts/stage_fa4.sh)")
    return fa4


@pytest.mark.parametrize("tile", [None, (64, 64)])
@pytest.mark.parametrize(("n", "d", "padding"), [(4096 + 100, 64, False), (6000, 128, True)])
def test_fa4_backend_matches_reference(n, d, padding, tile):
    """FA4's block sparsity from the LUT (merged 128-tiles with the CuTe mask_mod on partial ones, or on sm90 our
    64-blocks as they are) against the reference: output, natural-log LSE, empty rows 0 / -inf."""
    fa4 = _fa4_or_skip()
    if tile is not None and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("64 x 64 tiles: sm90 only")
    gen = torch.Generator(device="cuda").manual_seed(n + d)
    q, k, v = _qkv(1, 4, n, d, gen)
    mask, idx, cnt = _lut(1, 4, n, 64, 64, 0.2, gen)
    mask[0, 1, 3] = False  # an empty query block
    idx, cnt = reference.lut_from_mask(mask)
    kp = (torch.rand(1, n, generator=gen, device="cuda") > 0.1) if padding else None
    kw = dict(block_m=64, block_n=64, key_padding=kp)
    out, lse = fa4.block_sparse_attention(q, k, v, idx, cnt, tile=tile, **kw)
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, idx, cnt, **kw)
    torch.testing.assert_close(out.float(), ref_out.float(), **BF16_TOL)
    assert_lse_close(lse, ref_lse, 1e-2)
    assert (out[0, 1, 192:256] == 0).all() and torch.isneginf(lse[0, 1, 192:256]).all()


def test_flex_flash_backend_matches_reference():
    """FlexAttention's FLASH backend (FA4 through Inductor) on the same BlockMask as the flex backend."""
    from dit_accel.kernels import flex, flex_flash

    if not flex.flash_backend_available():
        pytest.skip("needs torch >= 2.11 and FlashAttention-4")
    gen = torch.Generator(device="cuda").manual_seed(12)
    n = 4096 + 100
    q, k, v = _qkv(1, 4, n, 64, gen)
    _, idx, cnt = _lut(1, 4, n, 64, 64, 0.15, gen)
    out, lse = flex_flash.block_sparse_attention(q, k, v, idx, cnt, block_m=64, block_n=64)
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, idx, cnt, block_m=64, block_n=64)
    torch.testing.assert_close(out.float(), ref_out.float(), **BF16_TOL)
    assert_lse_close(lse, ref_lse, 1e-2)


@pytest.mark.parametrize(("n", "d", "block"), [(4096 + 100, 64, 64), (6000, 128, 128)])
def test_cudnn_bsa_backend_matches_reference(n, d, block):
    """cuDNN frontend's block-sparse attention from the LUT (ragged tail through block_sizes, query rows padded to
    whole blocks) against the reference, empty rows included."""
    from dit_accel.kernels import cudnn_bsa

    if not cudnn_bsa.cudnn_bsa_available():
        pytest.skip(f"needs {cudnn_bsa.CUDNN_PACKAGE} (scripts/stage_fa4.sh)")
    gen = torch.Generator(device="cuda").manual_seed(n + block)
    q, k, v = _qkv(1, 4, n, d, gen)
    mask, _, _ = _lut(1, 4, n, block, block, 0.2, gen)
    mask[0, 1, 2] = False
    idx, cnt = reference.lut_from_mask(mask)
    out, lse = cudnn_bsa.block_sparse_attention(q, k, v, idx, cnt, block_m=block, block_n=block)
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, idx, cnt, block_m=block, block_n=block)
    torch.testing.assert_close(out.float(), ref_out.float(), **BF16_TOL)
    assert_lse_close(lse, ref_lse, 1e-2)
