"""LUT -> FlashAttention-4 block sparsity (dit_accel.kernels.fa4), checked on the CPU by an interpreter of FA4's rules.

The interpreter below is written from FA4's code (4.0.0b40: ``flash_attn/cute/block_sparsity.py``,
``block_sparse_utils.py``), not from our conversion: per (batch, head, query tile) the kernel visits the tiles of
the partial list, running the ``mask_mod`` on each token, and of the full list, computing every token; each list
is walked from its last entry down and only that first-visited tile gets the sequence-end mask, so a tile
holding keys past ``n`` must be the last (highest) entry of its list. A tile listed twice is computed twice,
so the interpreter counts visits instead of or-ing them.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from dit_accel import kernels
from dit_accel.kernels import fa4, reference


def _interpret(sp: fa4.FA4BlockSparsity, n: int) -> torch.Tensor:
    """int (B, H, n, n): how often FA4 would count key k for query q, from the four tensors and the mask_mod."""
    tile_m, tile_n = sp.tile
    n_qt, n_kt = math.ceil(n / tile_m), math.ceil(n / tile_n)
    b, h = sp.mask_block_cnt.shape[:2]
    lists = ((sp.mask_block_cnt, sp.mask_block_idx, True), (sp.full_block_cnt, sp.full_block_idx, False))
    for cnt, idx, _ in lists:
        assert cnt.dtype == torch.int32 and idx.dtype == torch.int32  # FA4 rejects anything else
        assert tuple(cnt.shape) == (b, h, n_qt) and idx.shape[:3] == (b, h, n_qt) and idx.shape[3] <= n_kt
    visits = torch.zeros(b, h, n_qt * tile_m, n_kt * tile_n, dtype=torch.int32)
    for bi in range(b):
        for hi in range(h):
            for qt in range(n_qt):
                rows = torch.arange(qt * tile_m, (qt + 1) * tile_m)
                for cnt, idx, masked in lists:
                    c = int(cnt[bi, hi, qt])
                    assert 0 <= c <= idx.shape[3]
                    entries = idx[bi, hi, qt, :c].tolist()
                    assert entries == sorted(set(entries)), "FA4 walks each list as ascending and distinct"
                    for pos, kt in enumerate(entries):
                        assert 0 <= kt < n_kt
                        cols = torch.arange(kt * tile_n, (kt + 1) * tile_n)
                        first_visited = pos == c - 1
                        if not first_visited:  # no sequence-end mask here: past-n keys would be read as real
                            assert cols[-1] < n, f"tile {kt} holds keys past n={n} but is not last in its list"
                        keep = torch.ones(tile_m, tile_n, dtype=torch.bool)
                        if masked:  # FA4 clamps the indices it hands the mask_mod to the sequence
                            keep = fa4.lut_mask_mod(
                                sp, torch.tensor(bi), torch.tensor(hi), rows.clamp(max=n - 1)[:, None],
                                cols.clamp(max=n - 1)[None, :],
                            )  # fmt: skip
                        if first_visited:
                            keep = keep & (cols < n)[None, :]
                        visits[bi, hi, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] += keep.int()
    return visits[:, :, :n, :n]


def _lut_dense(idx, counts, n, block_m, block_n, key_padding) -> torch.Tensor:
    """bool (B, H, n, n) of the LUT, slot by slot (independent of the conversion and of reference helpers)."""
    b, h, n_qb = counts.shape
    dense = torch.zeros(b, h, n_qb * block_m, math.ceil(n / block_n) * block_n, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for qb in range(n_qb):
                for slot in range(int(counts[bi, hi, qb])):
                    kb = int(idx[bi, hi, qb, slot])
                    dense[bi, hi, qb * block_m : (qb + 1) * block_m, kb * block_n : (kb + 1) * block_n] = True
    dense = dense[:, :, :n, :n]
    return dense if key_padding is None else dense & key_padding[:, None, None, :]


def _random_lut(b, h, n, block_m, block_n, gen):
    n_qb, n_kb = math.ceil(n / block_m), math.ceil(n / block_n)
    density = torch.rand(b, h, n_qb, 1, generator=gen)  # every density from empty rows to full ones
    mask = torch.rand(b, h, n_qb, n_kb, generator=gen) < density
    mask[0, 0, 0] = False  # an empty query block
    mask[-1, -1, -1] = True  # a full one, the ragged corner included
    idx, counts = reference.lut_from_mask(mask)
    width = max(1, int(counts.max()))  # a narrower LUT, padding slots filled with junk past the count
    junk = torch.randint(0, n_kb, idx.shape, generator=gen, dtype=torch.int32)
    slot = torch.arange(idx.shape[-1])
    idx = torch.where(slot < counts[..., None], idx, junk)[..., :width].contiguous()
    return idx, counts


CASES = [  # n, block_m, block_n, tile
    (256, 64, 64, (128, 128)),
    (200, 64, 64, (128, 128)),  # ragged: last 64-block of 8 tokens, last tile half missing
    (321, 64, 64, (128, 128)),  # odd block count: the last query tile has one query sub-block
    (130, 64, 64, (128, 128)),  # two tokens into a third tile
    (64 * 7 + 1, 64, 64, (256, 128)),  # Blackwell's (q_stage * 128) x 128
    (200, 64, 64, (64, 64)),  # sm90 fitting its tile to our blocks: no merging
    (300, 128, 64, (128, 128)),
    (300, 64, 128, (128, 128)),
    (500, 128, 128, (256, 128)),
]


@pytest.mark.parametrize(("n", "block_m", "block_n", "tile"), CASES)
@pytest.mark.parametrize("padding", [False, True])
def test_interpreted_fa4_mask_equals_the_lut(n, block_m, block_n, tile, padding):
    """Catches: a tile marked full with a sub-block missing or a padded key inside; a skipped tile that has a kept
    block; a tile in both lists (counted twice); the ragged tail dropped (off by one in the tile count) or not
    last in its list; a mask_mod bit order that swaps sub-blocks; key padding ignored."""
    gen = torch.Generator().manual_seed(n * 7 + block_m + tile[0] + padding)
    b, h = 2, 3
    for _ in range(3):
        idx, counts = _random_lut(b, h, n, block_m, block_n, gen)
        kp = None
        if padding:
            kp = torch.rand(b, n, generator=gen) > 0.25
            kp[0, : min(n, 2 * tile[1])] = False  # whole padded-out tiles: must be skipped, not listed
        sp = fa4.fa4_block_sparsity_from_lut(
            idx, counts, n, block_m=block_m, block_n=block_n, tile=tile, key_padding=kp
        )
        want = _lut_dense(idx, counts, n, block_m, block_n, kp)
        got = _interpret(sp, n)
        assert torch.equal(got, want.int())
        if padding:  # a tile with no live key is in no list (it would cost a tile of work for nothing)
            assert not _listed(sp, 0, 0).any()


def _listed(sp: fa4.FA4BlockSparsity, b: int, kt: int) -> torch.Tensor:
    """bool (H, n_qt): whether key tile ``kt`` is in either list of batch ``b``."""
    out = []
    for cnt, idx in ((sp.mask_block_cnt, sp.mask_block_idx), (sp.full_block_cnt, sp.full_block_idx)):
        slot = torch.arange(idx.shape[-1])
        out.append(((idx[b] == kt) & (slot < cnt[b][..., None])).any(-1))
    return out[0] | out[1]


def _masked_attention(q, k, v, visits, scale):
    """Softmax attention weighting each key by how often it is visited (0: left out): output and natural-log LSE."""
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    s = s.masked_fill(visits == 0, float("-inf"))
    lse = torch.logsumexp(s + visits.double().clamp(min=1).log(), dim=-1)
    p = torch.exp(s - lse[..., None].masked_fill(torch.isinf(lse[..., None]), 0.0)) * visits
    out = torch.einsum("bhqk,bhkd->bhqd", p, v.double())
    return out.float(), lse.float()


@pytest.mark.parametrize(("n", "block_m", "block_n", "tile"), [CASES[1], CASES[2], CASES[4], CASES[7]])
def test_attention_under_the_interpreted_mask_equals_the_reference(n, block_m, block_n, tile):
    """Catches what makes FA4's answer differ from ours: any wrong mask entry, a double-counted tile, an LSE in the
    wrong base, an empty row given a finite LSE."""
    gen = torch.Generator().manual_seed(n)
    b, h, d = 2, 2, 16
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    idx, counts = _random_lut(b, h, n, block_m, block_n, gen)
    kp = torch.rand(b, n, generator=gen) > 0.2
    sp = fa4.fa4_block_sparsity_from_lut(idx, counts, n, block_m=block_m, block_n=block_n, tile=tile, key_padding=kp)
    out, lse = _masked_attention(q, k, v, _interpret(sp, n), 0.3)
    ref_out, ref_lse = reference.block_sparse_attention(
        q, k, v, idx, counts, block_m=block_m, block_n=block_n, scale=0.3, key_padding=kp
    )
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)) and torch.isneginf(ref_lse).any()
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)


def test_tile_classification_by_hand():
    """Catches a wrong full / partial / skipped rule on a case worked out on paper (64-blocks into 128-tiles)."""
    n = 64 * 4 + 8  # 5 blocks (the last of 8 tokens), 3 tiles (the last: one query sub-block, keys 256..263)
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    mask[0, 0, 0:2, 0:2] = True  # tile (0, 0): all four -> full
    mask[0, 0, 0:2, 2] = True  # tile (0, 1): left column only -> partial, bits 0b0101
    mask[0, 0, 2:4, 2:4] = True
    mask[0, 0, 3, 3] = False  # tile (1, 1): three of four -> partial, bits 0b0111
    mask[0, 0, 4, 0:2] = True  # tile (2, 0): its only query sub-block keeps both -> full (block 5 does not exist)
    mask[0, 0, 4, 4] = True  # tile (2, 2): the ragged tail, everything there is kept -> still partial
    idx, counts = reference.lut_from_mask(mask)
    sp = fa4.fa4_block_sparsity_from_lut(idx, counts, n, block_m=64, block_n=64)
    full = reference.selected_block_mask(sp.full_block_idx, sp.full_block_cnt, 3)[0, 0]
    part = reference.selected_block_mask(sp.mask_block_idx, sp.mask_block_cnt, 3)[0, 0]
    assert full.nonzero().tolist() == [[0, 0], [2, 0]]
    assert part.nonzero().tolist() == [[0, 1], [1, 1], [2, 2]]
    assert sp.tile_bits[0, 0].tolist() == [[15, 5, 0], [0, 7, 0], [3, 0, 1]]
    assert sp.keys_ok.shape == (1, 384) and sp.keys_ok[0, :n].all() and not sp.keys_ok[0, n:].any()
    kp = torch.ones(1, n, dtype=torch.bool)
    kp[0, 100] = False  # a padded key inside tile column 0: the full tiles there become partial
    sp = fa4.fa4_block_sparsity_from_lut(idx, counts, n, block_m=64, block_n=64, key_padding=kp)
    assert int(sp.full_block_cnt.sum()) == 0 and int(sp.mask_block_cnt.sum()) == 5


def test_the_interpreter_rejects_planted_bugs():
    """The interpreter itself must fail on each planted bug, or the equality tests above prove nothing."""
    n = 200
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(1, 2, 4, 4, generator=gen) < 0.6
    mask[0, 0] = True
    mask[0, 0, 0, 1] = False  # tile (0, 0) of head 0: partial (one sub-block missing)
    idx, counts = reference.lut_from_mask(mask)
    sp = fa4.fa4_block_sparsity_from_lut(idx, counts, n, block_m=64, block_n=64)
    want = _lut_dense(idx, counts, n, 64, 64, None).int()
    assert torch.equal(_interpret(sp, n), want)
    assert sp.mask_block_idx[0, 0, 0, :2].tolist() == [0, 1] and int(sp.mask_block_cnt[0, 0, 0]) == 2

    def bad(**fields):
        return _interpret(sp._replace(**fields), n)

    # 1. the partial tile (0, 0) also listed as full: counted twice and unmasked
    full_cnt, full_idx = sp.full_block_cnt.clone(), sp.full_block_idx.clone()
    full_idx[0, 0, 0, 0], full_cnt[0, 0, 0] = 0, 1
    assert not torch.equal(bad(full_block_cnt=full_cnt, full_block_idx=full_idx), want)
    # 2. a sub-block bit lost from a partial tile (wrong bit order / off by one in the word)
    bits = sp.tile_bits.clone()
    bits[0, 0, 0, 0] &= ~1
    assert not torch.equal(bad(tile_bits=bits), want)
    # 3. the ragged tail tile dropped (n // tile instead of ceil): keys 128..199 of query tile 1 lost
    cnt = sp.mask_block_cnt.clone()
    cnt[0, 0, 1] -= 1
    assert not torch.equal(bad(mask_block_cnt=cnt), want)
    # 4. the lists in descending order: the tail is no longer the tile that gets the sequence-end mask
    desc = sp.mask_block_idx.clone()
    desc[0, 0, 0, :2] = desc[0, 0, 0, :2].flip(0)  # query tile 0 lists the partial tile 0 and the tail 1
    with pytest.raises(AssertionError):
        bad(mask_block_idx=desc)
    # 5. key padding forgotten in the mask_mod
    kp_ok = sp.keys_ok.clone()
    kp_ok[0, 5] = 0
    assert not torch.equal(bad(keys_ok=kp_ok), want)


def test_conversion_traces_without_graph_breaks():
    """torch.compile-friendly: one graph (Dynamo with the eager backend, cheap), same tensors as eager."""
    gen = torch.Generator().manual_seed(3)
    idx, counts = _random_lut(1, 2, 300, 64, 64, gen)
    kp = torch.rand(1, 300, generator=gen) > 0.1

    def convert(idx, counts, kp):
        return tuple(fa4.fa4_block_sparsity_from_lut(idx, counts, 300, block_m=64, block_n=64, key_padding=kp)[:6])

    compiled = torch.compile(convert, backend="eager", fullgraph=True)
    for got, want in zip(compiled(idx, counts, kp), convert(idx, counts, kp)):
        assert torch.equal(got, want)


def test_bad_tiles_are_refused_with_the_parameter_named():
    idx, counts = reference.lut_from_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"tile\[1\]=96 must be a positive multiple of the LUT block \(64\)"):
        fa4.fa4_block_sparsity_from_lut(idx, counts, 128, block_m=64, block_n=64, tile=(128, 96))
    with pytest.raises(ValueError, match="at most 31"):
        fa4.fa4_block_sparsity_from_lut(idx, counts, 128, block_m=64, block_n=64, tile=(512, 512))


def test_wrapper_without_flash_attn_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # as if not installed, whatever this machine has
    q = torch.randn(1, 1, 128, 16)
    idx, counts = reference.lut_from_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ImportError, match=r"'fa4' needs FlashAttention-4: pip install --pre 'flash-attn-4=="):
        fa4.block_sparse_attention(q, q, q, idx, counts, block_m=64, block_n=64)


def test_fa4_forced_without_it_is_a_clear_error_and_auto_leaves_it_out(monkeypatch):
    monkeypatch.setattr(fa4, "fa4_available", lambda: False)
    monkeypatch.setattr(kernels, "_optional_installed", lambda backend: False)
    for name in ("fa4", "flex_flash"):
        with kernels.use_backend(name), pytest.raises(RuntimeError, match=f"kernel_backend='{name}' needs CUDA"):
            kernels.backend_for("cuda")
    assert "fa4" not in kernels.auto_candidates("block_sparse_attention", "cuda")
    monkeypatch.setattr(kernels, "_optional_installed", lambda backend: True)
    assert kernels.auto_candidates("block_sparse_attention", "cuda")[-3:] == ("fa4", "flex_flash", "cudnn_bsa")
    assert "fa4" not in kernels.auto_candidates("block_sparse_attention", "cpu")  # CUDA only
    assert kernels._module("fa4") is fa4


def test_an_installed_but_broken_fa4_is_excluded_with_its_reason(monkeypatch):
    """Under auto, an fa4 that raises (here: flash_attn.cute fails to import) is left out, the reason kept."""
    from dit_accel.kernels import auto

    auto.clear()
    monkeypatch.delenv("DIT_ACCEL_KERNELS", raising=False)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)
    monkeypatch.setitem(kernels._CANDIDATES["cpu"], "block_sparse_attention", ("cpu", "fa4"))
    monkeypatch.setattr(kernels, "_optional_installed", lambda backend: True)
    q = torch.randn(1, 2, 256, 16)
    idx, counts = reference.lut_from_mask(torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5)
    with kernels.use_backend("auto"):
        out, _ = kernels.block_sparse_attention(q, q, q, idx, counts, block_m=64, block_n=64)
    [choice] = auto.choices().values()
    assert "ImportError" in choice.excluded["fa4"] and "flash-attn-4" in choice.excluded["fa4"]
    torch.testing.assert_close(out, reference.block_sparse_attention(q, q, q, idx, counts, block_m=64, block_n=64)[0])
    auto.clear()
