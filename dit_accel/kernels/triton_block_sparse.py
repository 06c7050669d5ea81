"""Triton kernels: block-sparse attention (+ per-block mass, + sparse/full pair), fused sparse-linear attention
(SLA), and the on-device pattern kernels (pooling, top-k / cumulative-threshold selection to a LUT, token gather).

Every public function has the signature and semantics of its namesake in :mod:`dit_accel.kernels.reference`,
which is the oracle in the tests. Design points (see docs/kernels.md):

* grid = (query tile, batch x head) with the query tile fastest, so the tiles of one head run together and share
  its K/V in L2;
* online softmax in base 2 with ``scale * log2(e)`` folded into one multiply, float32 accumulation, natural-log LSE;
* K/V come through TMA tensor descriptors where Triton has them and the card is Hopper or newer (an autotuned
  choice), else through plain pointer loads; the same source runs on Triton 3.6 and 3.9;
* launch configurations are autotuned per card and shape and kept in ``~/.cache/dit_accel/autotune.json``; no
  launch reads a device value on the host, so every call is CUDA-graph capturable (tune once before capturing);
* a ``key_padding`` mask travels as a float32 (B, N) key bias (0 kept, -inf masked) added to the scaled scores
  (one FMA with the scale), under a ``HAS_KPAD`` constant so calls without a mask compile the code they had;
* token-level groups (VMoBA's chunk gating: ``key_groups`` (N,) and the queries' bit words ``query_groups``) mask
  each key tile per query row (the rows' one or two int64 bit words, selected per key), under ``HAS_GROUPS``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import triton
import triton.language as tl

from . import dense_lse, reference

try:  # host-side TMA descriptors (Triton >= 3.4); absent on older Triton: pointer loads only
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_pair",
    "inverse_permutation",
    "kept_mass",
    "lut_from_mask",
    "mean_pool",
    "permute_tokens",
    "pooled_topk_lut",
    "sparse_linear_attention",
    "threshold_mask",
    "topk_mask",
    "unpermute_tokens",
]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_MAX_SELECT_WIDTH = 16384  # widest LUT row the one-tile selection kernel handles; wider rows use torch ops

_FEATURE_MAPS = {"softmax": 0, "elu": 1}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# The interpreter (numpy) computes tl.dot on bfloat16 operands wrongly (Triton 3.9); under it, 16-bit operands
# are widened to float32 first, which is what the tensor cores' float32 accumulation gives anyway.
_EMULATE_LOWP_DOT = tl.constexpr(_interpreting())

# ----------------------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(
    base,
    desc,
    off_b,
    off_h,
    start,
    n_rows,
    stride_n,
    d_real,
    BLOCK: tl.constexpr,
    HEAD: tl.constexpr,
    USE_TMA: tl.constexpr,
    MASKED: tl.constexpr,
):
    """A (BLOCK, HEAD) tile of rows ``start..start+BLOCK`` of one head; rows >= n_rows and columns >= d_real are 0."""
    if USE_TMA:
        tile = tl.reshape(desc.load([off_b.to(tl.int32), off_h.to(tl.int32), start, 0]), (BLOCK, HEAD))
    else:
        offs = start + tl.arange(0, BLOCK)
        cols = tl.arange(0, HEAD)
        ptrs = base + offs[:, None].to(tl.int64) * stride_n + cols[None, :]
        if MASKED:
            tile = tl.load(ptrs, mask=(offs[:, None] < n_rows) & (cols[None, :] < d_real), other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _query_tile(H, BLOCK_M: tl.constexpr, LUT_BLOCK_M: tl.constexpr):
    """This program's query tile on the (query tile, batch x head) grid: (bh, batch, head as int64, first row, LUT row
    (query block), row offsets)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    return pid_bh, off_b, off_h, start_m, start_m // LUT_BLOCK_M, start_m + tl.arange(0, BLOCK_M)


@triton.jit
def _mm(a, b, FP32: tl.constexpr):
    """a @ b with float32 accumulation: exact IEEE for float32 inputs, tensor cores for 16-bit ones."""
    if FP32:
        out = tl.dot(a, b, input_precision="ieee")
    elif _EMULATE_LOWP_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _mm_acc(a, b, acc, FP32: tl.constexpr):
    """acc + a @ b, accumulated inside the MMA (no separate product tile: fewer live registers)."""
    if FP32:
        out = tl.dot(a, b, acc, input_precision="ieee")
    elif _EMULATE_LOWP_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _scores(q, k, start_n, N, qk_scale, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, FP32: tl.constexpr):
    """Scores in log2 units, ``q k^T * scale * log2(e)``; keys past N are -inf."""
    qk = _mm(q, tl.trans(k), FP32) * qk_scale
    if MASK_N:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        qk = tl.where(offs_n[None, :] < N, qk, float("-inf"))
    return qk


@triton.jit
def _key_bias(kp_base, start_n, N, TILE_N: tl.constexpr):
    """The key bias of keys ``start_n..start_n+TILE_N`` (log2 units are the same: 0 or -inf); -inf past N."""
    offs_n = start_n + tl.arange(0, TILE_N)
    return tl.load(kp_base + offs_n, mask=offs_n < N, other=float("-inf"))


@triton.jit
def _group_mask(qk, kg_base, qg_base, offs_m, start_n, N, sqg_n, TILE_N: tl.constexpr, GROUP_WORDS: tl.constexpr):
    """``qk`` with -inf where a query row does not see a key's group: key ``j`` of group ``g >= 0`` is seen by row
    ``i`` when bit ``g % 64`` of the row's int64 word ``g // 64`` is set; group -1 (and rows past N) is seen.

    Up to 128 groups (one or two words, e.g. VMoBA's 72 chunks at 480p) the row's words are loaded once and
    selected per key; more groups take a (row, key) gather, which spills registers at 128 x 128 tiles."""
    offs_n = start_n + tl.arange(0, TILE_N)
    kg = tl.load(kg_base + offs_n, mask=offs_n < N, other=-1)
    rows = qg_base + offs_m.to(tl.int64) * sqg_n
    row_ok = offs_m < N
    half = ((kg >> 5) & 1)[None, :] != 0  # which 32-bit half of its word a key's bit is in
    if GROUP_WORDS > 0:  # one or two words (0: the gather); bits tested on 32-bit halves (int64 tiles: 2x registers)
        w0 = tl.load(rows, mask=row_ok, other=-1)
        words = tl.where(half, (w0 >> 32).to(tl.int32)[:, None], w0.to(tl.int32)[:, None])
        if GROUP_WORDS == 2:
            w1 = tl.load(rows + 1, mask=row_ok, other=-1)
            upper = tl.where(half, (w1 >> 32).to(tl.int32)[:, None], w1.to(tl.int32)[:, None])
            words = tl.where((kg >= 64)[None, :], upper, words)
    else:
        ptrs = rows[:, None] + (tl.maximum(kg, 0) >> 6)[None, :]
        wide = tl.load(ptrs, mask=row_ok[:, None] & (kg >= 0)[None, :], other=-1)
        words = tl.where(half, (wide >> 32).to(tl.int32), wide.to(tl.int32))
    seen = ((words >> (kg & 31)[None, :]) & 1) != 0
    return tl.where(seen | (kg < 0)[None, :], qk, float("-inf"))


@triton.jit
def _safe_max(m_new, HAS_KPAD: tl.constexpr):
    """The softmax reference for a tile: the running max, or 0 while a row has seen only masked keys (so that
    exp2(-inf - -inf) never makes a NaN). Without key padding (or groups) every visited tile holds a real key per
    row."""
    if HAS_KPAD:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    return m_ref


@triton.jit
def _pv(p, v, FP32: tl.constexpr):
    return _mm(p.to(v.dtype), v, FP32)


@triton.jit
def _feature_map(x, valid_cols, PHI: tl.constexpr):
    """phi over the head dimension of a float32 tile: 0 = softmax, 1 = elu + 1; padded columns give 0."""
    if PHI == 0:
        x = tl.where(valid_cols[None, :], x, float("-inf"))
        e = tl.math.exp2((x - tl.max(x, 1)[:, None]) * 1.4426950408889634)
        out = e / tl.sum(e, 1)[:, None]
    else:
        out = tl.where(x > 0, x + 1.0, tl.math.exp2(tl.minimum(x, 0.0) * 1.4426950408889634))
        out = tl.where(valid_cols[None, :], out, 0.0)
    return out


@triton.jit
def _online_tile(
    q, k_base, v_base, k_desc, v_desc, kp_base, kg_base, qg_base, offs_m, sqg_n, kb, sub, m_i, l_i, acc, off_b,
    off_h, N, stride_kn, stride_vn, D, DV, qk_scale, BLOCK_N: tl.constexpr, TILE_N: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, USE_TMA: tl.constexpr, MASK_N: tl.constexpr,
    MASKED_LOADS: tl.constexpr, FP32: tl.constexpr, HAS_KPAD: tl.constexpr, HAS_GROUPS: tl.constexpr,
    GROUP_WORDS: tl.constexpr,
):  # fmt: skip
    """One key tile of the online softmax: (m, l, acc) updated in log2 units."""
    start_n = kb * BLOCK_N + sub * TILE_N
    k = _load_rows(k_base, k_desc, off_b, off_h, start_n, N, stride_kn, D, TILE_N, HEAD_D, USE_TMA, MASKED_LOADS)
    qk = _scores(q, k, start_n, N, qk_scale, TILE_N, MASK_N, FP32)
    if HAS_KPAD:
        qk = qk + _key_bias(kp_base, start_n, N, TILE_N)[None, :]
    if HAS_GROUPS:
        qk = _group_mask(qk, kg_base, qg_base, offs_m, start_n, N, sqg_n, TILE_N, GROUP_WORDS)
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_ref = _safe_max(m_new, HAS_KPAD or HAS_GROUPS)
    alpha = tl.math.exp2(m_i - m_ref)
    p = tl.math.exp2(qk - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(v_base, v_desc, off_b, off_h, start_n, N, stride_vn, DV, TILE_N, HEAD_DV, USE_TMA, MASKED_LOADS)
    acc = _mm_acc(p.to(v.dtype), v, acc * alpha[:, None], FP32)
    return m_new, l_i, acc


@triton.jit
def _attend_lut(
    q,
    k_base,
    v_base,
    k_desc,
    v_desc,
    kp_base,
    kg_base,
    qg_base,
    offs_m,
    sqg_n,
    lut_row,
    count,
    off_b,
    off_h,
    N,
    n_kb,
    stride_kn,
    stride_vn,
    D,
    DV,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILE_N: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    USE_TMA: tl.constexpr,
    MASK_N: tl.constexpr,
    MASK_KV: tl.constexpr,
    PAD_D: tl.constexpr,
    FP32: tl.constexpr,
    HAS_KPAD: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    GROUP_WORDS: tl.constexpr,
):
    """Online softmax over the ``count`` key blocks listed in ``lut_row``, each in BLOCK_N / TILE_N key tiles;
    returns (m, l, acc) in log2 units. (A 64-key tile keeps a 128 x 128 head-dim-128 program out of spills.)

    The LUT row is ascending, so only its last entry can be the sequence's partial tail block: every other tile
    runs without the key mask (whose select would also stop the scale multiply fusing into the exp2 argument's
    FMA), and the tail block alone runs masked."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DV], tl.float32)
    SUBS: tl.constexpr = BLOCK_N // TILE_N
    n_tiles = count * SUBS
    n_plain = n_tiles
    hi = n_kb - 1
    if MASK_N:
        last = tl.load(lut_row + tl.maximum(count - 1, 0))
        n_plain = tl.where((count > 0) & (last >= n_kb - 1), n_tiles - SUBS, n_tiles)
        hi = tl.maximum(n_kb - 2, 0)  # a plain tile never reaches the tail block, even on a LUT out of contract
    for t in range(0, n_plain):  # one flat loop over key tiles: one body for the software pipeliner
        kb = tl.minimum(tl.maximum(tl.load(lut_row + t // SUBS), 0), hi)
        m_i, l_i, acc = _online_tile(
            q, k_base, v_base, k_desc, v_desc, kp_base, kg_base, qg_base, offs_m, sqg_n, kb, t % SUBS, m_i, l_i, acc,
            off_b, off_h, N, stride_kn, stride_vn, D, DV, qk_scale, BLOCK_N, TILE_N, HEAD_D, HEAD_DV, USE_TMA, False,
            PAD_D, FP32, HAS_KPAD, HAS_GROUPS, GROUP_WORDS,
        )  # fmt: skip
    if MASK_N:
        for t in range(n_plain, n_tiles):
            kb = tl.minimum(tl.maximum(tl.load(lut_row + t // SUBS), 0), n_kb - 1)
            m_i, l_i, acc = _online_tile(
                q, k_base, v_base, k_desc, v_desc, kp_base, kg_base, qg_base, offs_m, sqg_n, kb, t % SUBS, m_i, l_i,
                acc, off_b, off_h, N, stride_kn, stride_vn, D, DV, qk_scale, BLOCK_N, TILE_N, HEAD_D, HEAD_DV, USE_TMA,
                True, MASK_KV, FP32, HAS_KPAD, HAS_GROUPS, GROUP_WORDS,
            )  # fmt: skip
    return m_i, l_i, acc


@triton.jit
def _store_out_lse(
    O, LSE, o_base, lse_base, acc, m_i, l_i, offs_m, N, stride_on, DV, HEAD_DV: tl.constexpr, WRITE_LSE: tl.constexpr
):
    """out = acc / l (0 for an empty row), natural-log lse (-inf for an empty row)."""
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    cols = tl.arange(0, HEAD_DV)
    ptrs = o_base + offs_m[:, None].to(tl.int64) * stride_on + cols[None, :]
    tl.store(ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < N) & (cols[None, :] < DV))
    if WRITE_LSE:
        lse = tl.where(has, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(lse_base + offs_m, lse, mask=offs_m < N)


@triton.jit
def _reshape_scale(acc, rho_base, offs_m, N, rho_add, RHO_CLAMP: tl.constexpr):
    """Re-ttention's reshape, first half: the accumulator times rho_c = rho + rho_add (clamped at 1 on request),
    so the stored row is rho_c * O (0 for an empty row)."""
    rho = tl.load(rho_base + offs_m, mask=offs_m < N, other=0.0).to(tl.float32) + rho_add
    if RHO_CLAMP:
        rho = tl.minimum(rho, 1.0)
    return acc * rho[:, None]


@triton.jit
def _add_residual(o_base, res_base, offs_m, N, stride_on, srn, DV, HEAD_DV: tl.constexpr, CHUNK: tl.constexpr):
    """Second half: O += R on the rows this program just stored, ``CHUNK`` columns at a time (the accumulator is
    dead by then, so the residual never needs a second full tile of registers)."""
    rows = offs_m < N
    for c in tl.static_range(HEAD_DV // CHUNK):
        cols = c * CHUNK + tl.arange(0, CHUNK)
        keep = rows[:, None] & (cols[None, :] < DV)
        o_ptrs = o_base + offs_m[:, None].to(tl.int64) * stride_on + cols[None, :]
        r_ptrs = res_base + offs_m[:, None].to(tl.int64) * srn + cols[None, :]
        o = tl.load(o_ptrs, mask=keep, other=0.0).to(tl.float32)
        r = tl.load(r_ptrs, mask=keep, other=0.0).to(tl.float32)
        tl.store(o_ptrs, (o + r).to(o_base.dtype.element_ty), mask=keep)


# ----------------------------------------------------------------------------------------------------------------
# block-sparse attention (+ mass)
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _bsa_fwd(
    Q,
    K,
    V,
    O,
    LSE,
    MASS,
    LUT,
    CNT,
    KPAD,
    KGRP,
    QGRP,
    k_desc,
    v_desc,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sob,
    soh,
    son,
    slb,
    slh,
    slq,
    scb,
    sch,
    smb,
    smh,
    smq,
    sgb,
    sgh,
    sgn,
    H,
    N,
    n_kb,
    D,
    DV,
    qk_scale,
    BLOCK_M: tl.constexpr,
    LUT_BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILE_N: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    USE_TMA: tl.constexpr,
    MASK_N: tl.constexpr,
    MASK_KV: tl.constexpr,
    PAD_D: tl.constexpr,
    FP32: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    WRITE_MASS: tl.constexpr,
    MASS_ATOMIC: tl.constexpr,
    HAS_KPAD: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    GROUP_WORDS: tl.constexpr,
    RHO,
    RES,
    srb,
    srh,
    srn,
    rho_add,
    HAS_RESHAPE: tl.constexpr,
    RHO_CLAMP: tl.constexpr,
    RES_CHUNK: tl.constexpr,
):
    pid_bh, off_b, off_h, start_m, qb, offs_m = _query_tile(H, BLOCK_M, LUT_BLOCK_M)
    q_base = Q + off_b * sqb + off_h * sqh
    k_base = K + off_b * skb + off_h * skh
    v_base = V + off_b * svb + off_h * svh
    kp_base = KPAD + off_b * N
    qg_base = QGRP + off_b * sgb + off_h * sgh
    lut_row = LUT + off_b * slb + off_h * slh + qb * slq
    count = tl.load(CNT + off_b * scb + off_h * sch + qb)

    q = _load_rows(q_base, q_base, off_b, off_h, start_m, N, sqn, D, BLOCK_M, HEAD_D, False, True)
    m_i, l_i, acc = _attend_lut(
        q, k_base, v_base, k_desc, v_desc, kp_base, KGRP, qg_base, offs_m, sgn, lut_row, count, off_b, off_h, N,
        n_kb, skn, svn, D, DV, qk_scale, BLOCK_M, BLOCK_N, TILE_N, HEAD_D, HEAD_DV, USE_TMA, MASK_N, MASK_KV, PAD_D,
        FP32, HAS_KPAD, HAS_GROUPS, GROUP_WORDS,
    )  # fmt: skip
    if HAS_RESHAPE:  # Re-ttention's rho_c * O + R as the epilogue: no float32 temporaries outside the kernel
        acc = _reshape_scale(acc, RHO + pid_bh.to(tl.int64) * N, offs_m, N, rho_add, RHO_CLAMP)
    _store_out_lse(
        O, LSE, O + off_b * sob + off_h * soh, LSE + pid_bh.to(tl.int64) * N, acc, m_i, l_i, offs_m, N, son, DV,
        HEAD_DV, WRITE_LSE,
    )  # fmt: skip
    if HAS_RESHAPE:
        tl.debug_barrier()  # the rows just stored are read back by other threads of this program
        _add_residual(O + off_b * sob + off_h * soh, RES + off_b * srb + off_h * srh, offs_m, N, son, srn, DV,
                      HEAD_DV, RES_CHUNK)  # fmt: skip

    if WRITE_MASS:
        # Second pass over the row with the final (m, l): exact per-block probability mass, QK^T recomputed.
        has = l_i > 0
        weight = tl.where(has & (offs_m < N), 1.0 / tl.where(has, l_i, 1.0), 0.0)
        m_safe = tl.where(has, m_i, 0.0)  # a row with no kept key (m = -inf) weighs 0, not NaN
        rows_real = tl.minimum(N - qb * LUT_BLOCK_M, LUT_BLOCK_M).to(tl.float32)
        mass_row = MASS + off_b * smb + off_h * smh + qb * smq
        for i in range(0, count):
            kb = tl.minimum(tl.maximum(tl.load(lut_row + i), 0), n_kb - 1)
            blk = 0.0
            for sub in tl.static_range(BLOCK_N // TILE_N):
                start_n = kb * BLOCK_N + sub * TILE_N
                k = _load_rows(k_base, k_desc, off_b, off_h, start_n, N, skn, D, TILE_N, HEAD_D, USE_TMA, MASK_KV)
                qk = _scores(q, k, start_n, N, qk_scale, TILE_N, MASK_N, FP32)
                if HAS_KPAD:
                    qk = qk + _key_bias(kp_base, start_n, N, TILE_N)[None, :]
                if HAS_GROUPS:
                    qk = _group_mask(qk, KGRP, qg_base, offs_m, start_n, N, sgn, TILE_N, GROUP_WORDS)
                p = tl.math.exp2(qk - m_safe[:, None]) * weight[:, None]
                blk += tl.sum(tl.sum(p, 1), 0)
            blk = blk / rows_real
            if MASS_ATOMIC:
                tl.atomic_add(mass_row + i, blk)
            else:
                tl.store(mass_row + i, blk)


# ----------------------------------------------------------------------------------------------------------------
# sparse + full pair (Re-ttention refresh)
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _pair_fwd(
    Q,
    K,
    V,
    OS,
    LSES,
    OF,
    LSEF,
    LUT,
    CNT,
    KPAD,
    k_desc,
    v_desc,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sob,
    soh,
    son,
    slb,
    slh,
    slq,
    scb,
    sch,
    H,
    N,
    n_kb,
    max_blocks,
    D,
    DV,
    qk_scale,
    BLOCK_M: tl.constexpr,
    LUT_BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILE_N: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    USE_TMA: tl.constexpr,
    MASK_N: tl.constexpr,
    MASK_KV: tl.constexpr,
    PAD_D: tl.constexpr,
    FP32: tl.constexpr,
    HAS_KPAD: tl.constexpr,
):
    """One pass over all key blocks; the sparse state shares the full state's running max, so a selected block's
    p and p @ V are computed once and added to both accumulators."""
    pid_bh, off_b, off_h, start_m, qb, offs_m = _query_tile(H, BLOCK_M, LUT_BLOCK_M)
    kp_base = KPAD + off_b * N
    q_base = Q + off_b * sqb + off_h * sqh
    k_base = K + off_b * skb + off_h * skh
    v_base = V + off_b * svb + off_h * svh
    lut_row = LUT + off_b * slb + off_h * slh + qb * slq
    count = tl.load(CNT + off_b * scb + off_h * sch + qb)

    q = _load_rows(q_base, q_base, off_b, off_h, start_m, N, sqn, D, BLOCK_M, HEAD_D, False, True)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_f = tl.zeros([BLOCK_M], tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    acc_f = tl.zeros([BLOCK_M, HEAD_DV], tl.float32)
    acc_s = tl.zeros([BLOCK_M, HEAD_DV], tl.float32)
    ptr = tl.full([], 0, tl.int32)
    nxt = tl.load(lut_row)
    SUBS: tl.constexpr = BLOCK_N // TILE_N
    for t in range(0, n_kb * SUBS):  # key tiles in order; the LUT pointer moves after a block's last tile
        j = t // SUBS
        sel = (ptr < count) & (nxt == j)
        w = sel.to(tl.float32)
        start_n = t * TILE_N
        k = _load_rows(k_base, k_desc, off_b, off_h, start_n, N, skn, D, TILE_N, HEAD_D, USE_TMA, MASK_KV)
        qk = _scores(q, k, start_n, N, qk_scale, TILE_N, MASK_N, FP32)
        if HAS_KPAD:
            qk = qk + _key_bias(kp_base, start_n, N, TILE_N)[None, :]
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_ref = _safe_max(m_new, HAS_KPAD)
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(qk - m_ref[:, None])
        v = _load_rows(v_base, v_desc, off_b, off_h, start_n, N, svn, DV, TILE_N, HEAD_DV, USE_TMA, MASK_KV)
        pv = _pv(p, v, FP32)
        row = tl.sum(p, 1)
        acc_f = acc_f * alpha[:, None] + pv
        l_f = l_f * alpha + row
        acc_s = acc_s * alpha[:, None] + pv * w
        l_s = l_s * alpha + row * w
        m_i = m_new
        ptr += (sel & (t % SUBS == SUBS - 1)).to(tl.int32)
        nxt = tl.load(lut_row + tl.minimum(ptr, max_blocks - 1))
    lse_off = pid_bh.to(tl.int64) * N
    _store_out_lse(OS, LSES, OS + off_b * sob + off_h * soh, LSES + lse_off, acc_s, m_i, l_s, offs_m, N, son, DV,
                   HEAD_DV, True)  # fmt: skip
    _store_out_lse(OF, LSEF, OF + off_b * sob + off_h * soh, LSEF + lse_off, acc_f, m_i, l_f, offs_m, N, son, DV,
                   HEAD_DV, True)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# sparse-linear attention (SLA)
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _kv_stats(
    K,
    V,
    PHIK,
    S,
    Z,
    KPAD,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    H,
    N,
    n_chunks,
    D,
    DV,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    PHI: tl.constexpr,
    FP32: tl.constexpr,
    HAS_KPAD: tl.constexpr,
):
    """phi(K) for ``CHUNK`` keys (stored in the input dtype, (B, H, N, D) contiguous) and the chunk's partial sums
    S_c = phi(K_c)^T V_c, Z_c = sum of phi(K_c) rows (float32, from the stored values, so that the linear branch's
    per-block terms and the totals agree), tail rows and masked keys (stored as 0) excluded."""
    c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    cols = tl.arange(0, HEAD_D)
    s = tl.zeros([HEAD_D, HEAD_DV], tl.float32)
    z = tl.zeros([HEAD_D], tl.float32)
    phik_base = PHIK + pid_bh.to(tl.int64) * N * D
    for t in range(0, CHUNK // BLOCK_N):
        start_n = c * CHUNK + t * BLOCK_N
        rows = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K + off_b * skb + off_h * skh, K, off_b, off_h, start_n, N, skn, D, BLOCK_N, HEAD_D, False, True)
        v = _load_rows(V + off_b * svb + off_h * svh, V, off_b, off_h, start_n, N, svn, DV, BLOCK_N, HEAD_DV, False,
                       True)  # fmt: skip
        phik = _feature_map(k.to(tl.float32), cols < D, PHI)
        keep = rows < N
        if HAS_KPAD:
            keep = keep & (tl.load(KPAD + off_b * N + rows, mask=rows < N, other=float("-inf")) == 0.0)
        phik = tl.where(keep[:, None], phik, 0.0).to(k.dtype)
        tl.store(phik_base + rows[:, None].to(tl.int64) * D + cols[None, :], phik,
                 mask=(rows[:, None] < N) & (cols[None, :] < D))  # fmt: skip
        s = _mm_acc(tl.trans(phik), v, s, FP32)
        z += tl.sum(phik.to(tl.float32), 0)
    part = pid_bh.to(tl.int64) * n_chunks + c
    cols_v = tl.arange(0, HEAD_DV)
    tl.store(S + part * (HEAD_D * HEAD_DV) + cols[:, None] * HEAD_DV + cols_v[None, :], s)
    tl.store(Z + part * HEAD_D + cols, z)


@triton.jit
def _linear_blocks(
    num, den, phiq, phik_base, v_base, blocks, n_blocks, sign, N, n_kb, D, DV, stride_vn,
    BLOCK_N: tl.constexpr, TILE_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, FP32: tl.constexpr,
):  # fmt: skip
    """num += sign * sum_j (phi(Q) phi(K_j)^T) V_j, den += sign * sum_j rowsum(phi(Q) phi(K_j)^T) over the
    ``n_blocks`` key blocks listed at ``blocks``: the same tensor-core work as an attention block without the
    softmax, reading phi(K_j) and V_j tiles (K/V-sized) instead of a D x DV float32 state per block."""
    SUBS: tl.constexpr = BLOCK_N // TILE_N
    for t in range(0, n_blocks * SUBS):
        kb = tl.minimum(tl.maximum(tl.load(blocks + t // SUBS), 0), n_kb - 1)
        start_n = kb * BLOCK_N + (t % SUBS) * TILE_N
        phik = _load_rows(phik_base, phik_base, 0, 0, start_n, N, D, D, TILE_N, HEAD_D, False, True)
        v = _load_rows(v_base, v_base, 0, 0, start_n, N, stride_vn, DV, TILE_N, HEAD_DV, False, True)
        a = _mm(phiq, tl.trans(phik), FP32)
        num = _mm_acc((a * sign).to(v.dtype), v, num, FP32)
        den += sign * tl.sum(a, 1)
    return num, den


@triton.jit
def _sla_fwd(
    Q,
    K,
    V,
    O,
    OL,
    LSE,
    LUT,
    CNT,
    NLUT,
    NCNT,
    MLUT,
    MCNT,
    PHIK,
    STOT,
    ZTOT,
    KPAD,
    k_desc,
    v_desc,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sob,
    soh,
    son,
    slb,
    slh,
    slq,
    scb,
    sch,
    H,
    N,
    n_qb,
    n_kb,
    D,
    DV,
    qk_scale,
    BLOCK_M: tl.constexpr,
    LUT_BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILE_N: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    USE_TMA: tl.constexpr,
    MASK_N: tl.constexpr,
    MASK_KV: tl.constexpr,
    PAD_D: tl.constexpr,
    FP32: tl.constexpr,
    PHI: tl.constexpr,
    HAS_KPAD: tl.constexpr,
):
    """Sparse FlashAttention over the LUT, then linear attention over the marginal blocks. The linear sums come
    either from the global sums minus the selected and negligible blocks (SLA's pre-aggregation) or, when fewer
    blocks are marginal than excluded, straight from the marginal blocks: whichever loads fewer S_j tiles."""
    pid_bh, off_b, off_h, start_m, qb, offs_m = _query_tile(H, BLOCK_M, LUT_BLOCK_M)
    q_base = Q + off_b * sqb + off_h * sqh
    k_base = K + off_b * skb + off_h * skh
    v_base = V + off_b * svb + off_h * svh
    lut_row = LUT + off_b * slb + off_h * slh + qb * slq
    count = tl.load(CNT + off_b * scb + off_h * sch + qb)

    q = _load_rows(q_base, q_base, off_b, off_h, start_m, N, sqn, D, BLOCK_M, HEAD_D, False, True)
    m_i, l_i, acc = _attend_lut(
        q, k_base, v_base, k_desc, v_desc, KPAD + off_b * N, KPAD, KPAD, offs_m, 0, lut_row, count, off_b, off_h, N,
        n_kb, skn, svn, D, DV, qk_scale, BLOCK_M, BLOCK_N, TILE_N, HEAD_D, HEAD_DV, USE_TMA, MASK_N, MASK_KV, PAD_D,
        FP32, HAS_KPAD, False, 1,
    )  # fmt: skip
    _store_out_lse(
        O, LSE, O + off_b * sob + off_h * soh, LSE + pid_bh.to(tl.int64) * N, acc, m_i, l_i, offs_m, N, son, DV,
        HEAD_DV, True,
    )  # fmt: skip

    # Linear branch. Rows of the helper LUTs are contiguous (B*H*n_qb, n_kb).
    row = pid_bh.to(tl.int64) * n_qb + qb
    neg_cnt = tl.load(NCNT + row)
    marg_cnt = tl.load(MCNT + row)
    cols = tl.arange(0, HEAD_D)
    phiq32 = _feature_map(q.to(tl.float32), cols < D, PHI)
    phiq = phiq32.to(q.dtype)
    phik_base = PHIK + pid_bh.to(tl.int64) * N * D
    num = tl.zeros([BLOCK_M, HEAD_DV], tl.float32)
    den = tl.zeros([BLOCK_M], tl.float32)
    if marg_cnt <= count + neg_cnt:  # few marginal blocks: sum them directly
        num, den = _linear_blocks(
            num, den, phiq, phik_base, v_base, MLUT + row * n_kb, marg_cnt, 1.0, N, n_kb, D, DV, svn, BLOCK_N,
            TILE_N, HEAD_D, HEAD_DV, FP32,
        )  # fmt: skip
    else:  # SLA's pre-aggregation: the totals minus the selected and the negligible blocks
        cols_v = tl.arange(0, HEAD_DV)
        s_tot = tl.load(STOT + pid_bh.to(tl.int64) * (HEAD_D * HEAD_DV) + cols[:, None] * HEAD_DV + cols_v[None, :])
        z_tot = tl.load(ZTOT + pid_bh.to(tl.int64) * HEAD_D + cols)
        num = _mm(phiq32, s_tot, FP32)
        den = tl.sum(phiq32 * z_tot[None, :], 1)
        num, den = _linear_blocks(
            num, den, phiq, phik_base, v_base, lut_row, count, -1.0, N, n_kb, D, DV, svn, BLOCK_N, TILE_N, HEAD_D,
            HEAD_DV, FP32,
        )  # fmt: skip
        num, den = _linear_blocks(
            num, den, phiq, phik_base, v_base, NLUT + row * n_kb, neg_cnt, -1.0, N, n_kb, D, DV, svn, BLOCK_N,
            TILE_N, HEAD_D, HEAD_DV, FP32,
        )  # fmt: skip
    ok = (den > 0) & (marg_cnt > 0)
    ol = tl.where(ok[:, None], num / tl.where(ok, den, 1.0)[:, None], 0.0)
    cols_v = tl.arange(0, HEAD_DV)
    ptrs = OL + off_b * sob + off_h * soh + offs_m[:, None].to(tl.int64) * son + cols_v[None, :]
    tl.store(ptrs, ol.to(OL.dtype.element_ty), mask=(offs_m[:, None] < N) & (cols_v[None, :] < DV))


@triton.jit
def _kept_mass_fwd(
    Q, LSE, MEAN, VAR, LOGC, OUTSIDE, ALPHA, sqb, sqh, sqn, sob, soh, soq, slcb, H, N, n_kb, D, scale,
    BLOCK_M: tl.constexpr, LUT_BLOCK_M: tl.constexpr, KB: tl.constexpr, HEAD_D: tl.constexpr, FP32: tl.constexpr,
):  # fmt: skip
    """alpha = sigmoid(lse_sparse - log sum over the skipped key blocks j of n_j exp(s q.mean_j + s^2/2 q^2.var_j)),
    an online log-sum-exp over KB key blocks at a time (the block moments stay in L2; no N x n_k logits in memory)."""
    pid_bh, off_b, off_h, start_m, qb, offs_m = _query_tile(H, BLOCK_M, LUT_BLOCK_M)
    q_base = Q + off_b * sqb + off_h * sqh
    q = _load_rows(q_base, q_base, off_b, off_h, start_m, N, sqn, D, BLOCK_M, HEAD_D, False, True).to(tl.float32)
    q2 = q * q
    cols = tl.arange(0, HEAD_D)
    mom = pid_bh.to(tl.int64) * n_kb * HEAD_D
    out_row = OUTSIDE + off_b * sob + off_h * soh + qb * soq
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, n_kb, KB):
        js = j0 + tl.arange(0, KB)
        ok = js < n_kb
        offs = mom + js[:, None].to(tl.int64) * HEAD_D + cols[None, :]
        mean = tl.load(MEAN + offs, mask=ok[:, None], other=0.0)
        var = tl.load(VAR + offs, mask=ok[:, None], other=0.0)
        logc = tl.load(LOGC + off_b * slcb + js, mask=ok, other=0.0)  # -inf for a block with no kept key
        skipped = tl.load(out_row + js, mask=ok, other=0) != 0
        logits = scale * _mm(q, tl.trans(mean), FP32) + (0.5 * scale * scale) * _mm(q2, tl.trans(var), FP32)
        logits = tl.where(skipped[None, :], logits + logc[None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-kept chunk leaves (m, l) as they were
        l_i = l_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(logits - m_ref[:, None]), 1)
        m_i = m_new
    log_out = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)
    none_out = log_out == float("-inf")  # nothing skipped holds a key: all the mass is kept (also for lse -inf)
    alpha = tl.where(none_out, 1.0, 1.0 / (1.0 + tl.exp(tl.where(none_out, 0.0, log_out) - lse)))
    tl.store(ALPHA + pid_bh.to(tl.int64) * N + offs_m, alpha, mask=offs_m < N)


# ----------------------------------------------------------------------------------------------------------------
# pattern kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _pool_mean(
    X, OUT, KPAD, sxb, sxh, sxn, H, N, n_blocks, D, POOL: tl.constexpr, TILE: tl.constexpr, HEAD_D: tl.constexpr,
    HAS_KPAD: tl.constexpr,
):  # fmt: skip
    """Mean of one block of ``POOL`` tokens (ragged last block: its real tokens; with key padding its kept tokens,
    0 for none), in tiles of TILE rows."""
    j = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    base = X + off_b * sxb + off_h * sxh
    cols = tl.arange(0, HEAD_D)
    total = tl.zeros([HEAD_D], tl.float32)
    kept = tl.zeros([TILE], tl.float32)
    start = j * POOL
    for t in tl.static_range(0, POOL, TILE):
        rows = start + t + tl.arange(0, TILE)
        in_row = (rows < N) & (rows < start + POOL)
        if HAS_KPAD:
            in_row = in_row & (tl.load(KPAD + off_b * N + rows, mask=rows < N, other=float("-inf")) == 0.0)
            kept += in_row.to(tl.float32)
        ok = in_row[:, None] & (cols[None, :] < D)
        x = tl.load(base + rows[:, None].to(tl.int64) * sxn + cols[None, :], mask=ok, other=0.0)
        total += tl.sum(x.to(tl.float32), 0)
    if HAS_KPAD:
        real = tl.maximum(tl.sum(kept, 0), 1.0)
    else:
        real = tl.minimum(N - start, POOL).to(tl.float32)
    tl.store(OUT + (pid_bh.to(tl.int64) * n_blocks + j) * D + cols, total / real, mask=cols < D)


@triton.jit
def _select_lut(
    SCORES,
    MASK_IN,
    FORCED,
    MASK_OUT,
    LUT,
    CNT,
    n_k,
    k_sel,
    tau,
    MODE: tl.constexpr,
    HAS_FORCED: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    WRITE_LUT: tl.constexpr,
    WIDTH: tl.constexpr,
):
    """One row of a block-score matrix to a selection and its LUT, with no sort and no host sync.

    MODE 0: the selection is MASK_IN. MODE 1: top ``k_sel`` (forced blocks count first). MODE 2: the smallest set
    of highest blocks whose softmax mass reaches ``tau``, plus forced. Selection is by a radix search on
    order-preserving integer keys: 32 counting passes over the row find the threshold key, ties go to the lower
    index (an inclusive prefix count over the tied entries). The LUT lists selected columns ascending, then the
    unselected ones ascending (as :func:`reference.lut_from_mask`).
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, WIDTH)
    valid = offs < n_k
    if MODE == 0:
        sel = tl.load(MASK_IN + row * n_k + offs, mask=valid, other=0) != 0
    else:
        s = tl.load(SCORES + row * n_k + offs, mask=valid, other=float("-inf")).to(tl.float32)
        bits = s.to(tl.int32, bitcast=True)
        skey = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        ukey = skey.to(tl.int64) + 2147483648  # in [0, 2^32), same order as the floats
        if HAS_FORCED:
            forced = tl.load(FORCED + row * n_k + offs, mask=valid, other=0) != 0
        else:
            forced = offs < 0
        if MODE == 1:
            ukey = tl.where(forced, 4294967296, ukey)  # forced blocks rank above every score
            ukey = tl.where(valid, ukey, -1)
            t = tl.zeros([], tl.int64)
            for step in tl.static_range(33):  # bits 32 (the forced rank) down to 0
                cand = t + (1 << (32 - step))
                c = tl.sum((ukey >= cand).to(tl.int32), 0)
                t = tl.where(c >= k_sel, cand, t)
            gt = ukey > t
            need = k_sel - tl.sum(gt.to(tl.int32), 0)
            eq = ukey == t
            rank = tl.cumsum(eq.to(tl.int32), 0)
            sel = gt | (eq & (rank <= need))
        else:
            ukey = tl.where(valid, ukey, -1)
            e = tl.where(valid, tl.math.exp2((s - tl.max(s, 0)) * 1.4426950408889634), 0.0)
            target = tau * tl.sum(e, 0)
            t = tl.zeros([], tl.int64)
            for step in tl.static_range(32):  # bits 31 down to 0
                cand = t + (1 << (31 - step))
                mass = tl.sum(tl.where(ukey >= cand, e, 0.0), 0)
                t = tl.where(mass >= target, cand, t)
            gt = ukey > t
            mass_gt = tl.sum(tl.where(gt, e, 0.0), 0)
            eq = ukey == t
            e_eq = tl.where(eq, e, 0.0)
            before = mass_gt + tl.cumsum(e_eq, 0) - e_eq
            sel = gt | (eq & (before < target))
        sel = (sel | forced) & valid
    sel_i = sel.to(tl.int32)
    cnt = tl.sum(sel_i, 0)
    if WRITE_MASK:
        tl.store(MASK_OUT + row * n_k + offs, sel.to(tl.int8), mask=valid)
    if WRITE_LUT:
        csum = tl.cumsum(sel_i, 0)
        pos = tl.where(sel, csum - 1, cnt + offs - csum)
        tl.store(LUT + row * n_k + pos, offs, mask=valid)
        tl.store(CNT + row, cnt)


@triton.jit
def _gather_tokens(X, OUT, IDX, sxb, sxh, sxn, sob, soh, son, H, N, D, TILE: tl.constexpr, HEAD_D: tl.constexpr):
    """out[b, h, i] = x[b, h, idx[i]] for a tile of TILE tokens."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    rows = pid * TILE + tl.arange(0, TILE)
    cols = tl.arange(0, HEAD_D)
    ok_r = rows < N
    src = tl.load(IDX + rows, mask=ok_r, other=0).to(tl.int64)
    ok = ok_r[:, None] & (cols[None, :] < D)
    x = tl.load(X + off_b * sxb + off_h * sxh + src[:, None] * sxn + cols[None, :], mask=ok)
    tl.store(OUT + off_b * sob + off_h * soh + rows[:, None].to(tl.int64) * son + cols[None, :], x, mask=ok)


# ----------------------------------------------------------------------------------------------------------------
# launch configuration: heuristics, autotuning with a persistent per-card cache
# ----------------------------------------------------------------------------------------------------------------


class _Config(dict):
    """Launch choices of the attention kernels: tile_m, num_warps, num_stages, tma."""


def _cache_path() -> Path:
    root = os.environ.get("DIT_ACCEL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dit_accel")
    return Path(root) / "autotune.json"


_CACHE_LOCK = threading.Lock()
_CACHE: dict[str, dict] | None = None


def _load_cache() -> dict[str, dict]:
    global _CACHE
    if _CACHE is None:
        try:
            _CACHE = json.loads(_cache_path().read_text())
        except (OSError, ValueError):
            _CACHE = {}
    return _CACHE


def _save_cache(cache: dict[str, dict]) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as fh:
            json.dump(cache, fh, indent=1, sort_keys=True)
        os.replace(fh.name, path)
    except OSError:  # a read-only home still runs, it just retunes next time
        pass


@functools.cache
def _card(device_index: int) -> str:
    props = torch.cuda.get_device_properties(device_index)
    return f"{props.name}|sm{props.major}{props.minor}|triton{triton.__version__}"


def _tma_mode() -> str:
    """``DIT_ACCEL_TMA``: ``auto`` (a tuning candidate on Hopper+), ``0`` (never), ``force`` (always where the
    layout allows, also under the interpreter: how the tests cover the descriptor path on a CPU)."""
    return os.environ.get("DIT_ACCEL_TMA", "auto").strip().lower()


def _tma_eligible(*tensors: torch.Tensor) -> bool:
    mode = _tma_mode()
    if TensorDescriptor is None or mode == "0":
        return False
    if mode != "force" and (
        _interpreting() or not tensors[0].is_cuda or torch.cuda.get_device_capability(tensors[0].device)[0] < 9
    ):
        return False
    for t in tensors:
        d = t.shape[-1]
        if d & (d - 1) or d < 16 or t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((s * t.element_size()) % 16 for s in t.stride()[:-1]):
            return False
    return True


def _default_config(kind: str, block_m: int, block_n: int, head_d: int, fp32: bool) -> _Config:
    """The launch without benchmarking, chosen from ptxas register counts for sm_90 (Triton 3.9): 128 x 64 tiles
    with 8 warps for block-sparse attention at head_dim 128 (128 x 128 at 64), no spills; 64 x 64 tiles for the
    pair kernel (two accumulators) and SLA (plus a D x DV float32 state), 8 warps at head_dim > 64; pointer
    loads. Float32 inputs take IEEE (non-tensor-core) dots: exact, slow, spilling."""
    wide = head_d > 64
    tile_m = min(block_m, 64 if (fp32 or kind != "bsa") else 128)
    tile_n = min(block_n, 64 if (wide or fp32 or kind != "bsa") else 128)
    warps = 8 if (tile_m == 128 or (kind != "bsa" and wide)) else 4
    return _Config(tile_m=tile_m, tile_n=tile_n, num_warps=warps, num_stages=1 if fp32 else 2, tma=False)


def _candidates(kind: str, block_m: int, block_n: int, head_d: int, fp32: bool, tma_ok: bool) -> list[_Config]:
    """The default first, then query tile x key tile x warps (8 for 128-row tiles, 4 or 8 for 64) x TMA; pipeline
    stages 2 or 3 only with TMA (ptxas shows the pointer path's indirect loads are not multi-buffered anyway)."""
    out = [_default_config(kind, block_m, block_n, head_d, fp32)]
    if tma_ok and _tma_mode() == "force":
        out = [_Config(out[0], tma=True)]
    tiles_m = [t for t in (64, 128) if t <= block_m and not (fp32 and t > 64)]
    tiles_n = [t for t in (64, 128) if t <= block_n and not (fp32 and t > 64)]
    for tile_m in tiles_m:
        for tile_n in tiles_n:
            for warps in (4, 8) if tile_m == 64 else (8,):
                for tma, stages in [(False, 1 if fp32 else 2)] + ([(True, 2), (True, 3)] if tma_ok else []):
                    cfg = _Config(tile_m=tile_m, tile_n=tile_n, num_warps=warps, num_stages=stages, tma=tma)
                    if cfg not in out:
                        out.append(cfg)
    return out


def _tuned(
    name: str,
    key: tuple,
    device: torch.device,
    candidates: Sequence[_Config],
    launch: Callable[[_Config], None],
) -> _Config:
    """The configuration to launch with: cached, else benchmarked now (never while capturing a CUDA graph)."""
    if _interpreting() or device.type != "cuda" or os.environ.get("DIT_ACCEL_AUTOTUNE", "1") == "0":
        return candidates[0]
    full_key = f"{_card(device.index if device.index is not None else torch.cuda.current_device())}|{name}|{key}"
    with _CACHE_LOCK:
        cache = _load_cache()
        hit = cache.get(full_key)
    if hit is not None:
        return _Config(hit)
    if torch.cuda.is_current_stream_capturing():
        return candidates[0]
    from triton.testing import do_bench

    best, best_ms = candidates[0], float("inf")
    for cfg in candidates:
        try:
            ms = do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=20)
        except Exception:  # a candidate that does not compile or fit on this card is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    with _CACHE_LOCK:
        cache = _load_cache()
        cache[full_key] = dict(best)
        _save_cache(cache)
    return best


# ----------------------------------------------------------------------------------------------------------------
# host wrappers
# ----------------------------------------------------------------------------------------------------------------


def _pow2(x: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(int(x)))


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_inputs(q, k, v, kv_indices, kv_counts, block_m: int, block_n: int) -> None:
    """Shapes (as the reference checks them) and dtypes the kernels take; host-side only."""
    reference._check_block_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q.dtype={q.dtype} is not supported; allowed: float16, bfloat16, float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def _key_bias_tensor(key_padding: torch.Tensor | None, b: int, n: int, device: torch.device) -> torch.Tensor | None:
    """``key_padding`` (validated) as the kernels' float32 (B, N) key bias: 0 where kept, -inf where masked."""
    key_padding = reference.check_key_padding(key_padding, b, n, device)
    if key_padding is None:
        return None
    return torch.where(key_padding, 0.0, float("-inf")).to(torch.float32).contiguous()


class _Prepared:
    """Validated, kernel-ready views of one attention call's inputs."""

    def __init__(
        self,
        q,
        k,
        v,
        kv_indices,
        kv_counts,
        block_m: int,
        block_n: int,
        scale: float | None,
        key_padding: torch.Tensor | None = None,
        key_groups: torch.Tensor | None = None,
        query_groups: torch.Tensor | None = None,
    ):
        _check_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n)
        bias = _key_bias_tensor(key_padding, q.shape[0], q.shape[2], q.device)
        self.has_kpad = bias is not None
        self.kpad = bias if bias is not None else torch.zeros(1, dtype=torch.float32, device=q.device)
        key_groups, query_groups = reference.check_groups(
            key_groups, query_groups, q.shape[0], q.shape[1], q.shape[2], q.device
        )
        self.has_groups = key_groups is not None
        if key_groups is not None and query_groups is not None:
            self.kgrp = key_groups.contiguous()
            self.qgrp = _last_contig(query_groups)
        else:
            self.kgrp = torch.zeros(1, dtype=torch.int32, device=q.device)
            self.qgrp = torch.zeros(1, 1, 1, 1, dtype=torch.int64, device=q.device)
        self.group_words = self.qgrp.shape[-1] if self.qgrp.shape[-1] <= 2 else 0  # 0: the gather path
        self.q, self.k, self.v = _last_contig(q), _last_contig(k), _last_contig(v)
        self.b, self.h, self.n, self.d = q.shape
        self.dv = v.shape[-1]
        self.block_m, self.block_n = block_m, block_n
        self.n_qb = math.ceil(self.n / block_m)
        self.n_kb = math.ceil(self.n / block_n)
        lut = kv_indices.to(torch.int32)
        if lut.shape[-1] == 0:  # an all-empty LUT: one dummy slot keeps the kernels' loads in bounds
            lut = torch.zeros(*lut.shape[:-1], 1, dtype=torch.int32, device=lut.device)
        self.lut = _last_contig(lut)
        self.cnt = kv_counts.to(torch.int32).contiguous()
        self.scale = 1.0 / math.sqrt(self.d) if scale is None else float(scale)
        self.head_d, self.head_dv = _pow2(self.d), _pow2(self.dv)
        self.fp32 = q.dtype == torch.float32
        self.mask_n = self.n % block_n != 0
        self.pad_d = self.head_d != self.d or self.head_dv != self.dv
        self.mask_kv = self.mask_n or self.pad_d
        self.tma_ok = _tma_eligible(self.k, self.v) and self.head_d == self.d and self.head_dv == self.dv

    def key(self, *extra, by_sparsity: bool = True) -> tuple:
        """Tuning key: the shape, and how sparse the LUT can be (log2 of key blocks over its width, 0 = dense), since
        the best launch at 97% sparsity (few blocks per program) need not be the dense one. The LUT width is a host
        value (no device read), and top-k LUTs are exactly as wide as their rows."""
        bucket = max(0, round(math.log2(self.n_kb / max(1, self.lut.shape[-1])))) if by_sparsity else 0
        kpad = ("kpad",) if self.has_kpad else ()  # another compiled variant; unmasked keys stay as they were
        groups = (f"groups{self.group_words}",) if self.has_groups else ()
        return (
            self.b, self.h, self.n, self.d, self.dv, str(self.q.dtype), self.block_m, self.block_n, *extra, *kpad,
            *groups, f"w{bucket}",
        )  # fmt: skip

    def descriptors(self, cfg: _Config):
        if not cfg["tma"]:
            return self.k, self.v
        k_desc = TensorDescriptor.from_tensor(self.k, [1, 1, cfg["tile_n"], self.head_d])
        v_desc = TensorDescriptor.from_tensor(self.v, [1, 1, cfg["tile_n"], self.head_dv])
        return k_desc, v_desc

    def strides(self, out: torch.Tensor) -> list[int]:
        q, k, v, lut = self.q, self.k, self.v, self.lut
        return [
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lut.stride()[:3],
            *self.cnt.stride()[:2],
        ]  # fmt: skip

    def grid(self, cfg: _Config) -> tuple[int, int]:
        return (triton.cdiv(self.n, cfg["tile_m"]), self.b * self.h)

    def consts(self, cfg: _Config) -> dict:
        return dict(
            BLOCK_M=cfg["tile_m"], LUT_BLOCK_M=self.block_m, BLOCK_N=self.block_n, TILE_N=cfg["tile_n"],
            HEAD_D=self.head_d, HEAD_DV=self.head_dv, USE_TMA=bool(cfg["tma"]), MASK_N=self.mask_n,
            MASK_KV=self.mask_kv, PAD_D=self.pad_d, FP32=self.fp32, HAS_KPAD=self.has_kpad,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    scale: float | None = None,
    return_lse: bool = True,
    return_mass: bool = False,
    key_padding: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
    rho: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    rho_add: float = 0.0,
    rho_clamp: bool = False,
):
    """Triton block-sparse attention; same contract as :func:`reference.block_sparse_attention` (with ``rho`` and
    ``residual`` the reshape is the kernel's epilogue)."""
    p = _Prepared(q, k, v, kv_indices, kv_counts, block_m, block_n, scale, key_padding, key_groups, query_groups)
    reshape = reference.check_reshape(rho, residual, p.b, p.h, p.n, p.dv, q.device)
    if reshape is not None:
        rho, residual = rho.float().contiguous(), _last_contig(residual)
    out = torch.empty(p.b, p.h, p.n, p.dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(p.b, p.h, p.n, device=q.device, dtype=torch.float32)
    width = kv_indices.shape[-1] if return_mass else 0
    mass = torch.zeros(p.b, p.h, p.n_qb, width, device=q.device, dtype=torch.float32)
    mass_arg = mass if width > 0 else lse

    def launch(cfg: _Config) -> None:
        k_desc, v_desc = p.descriptors(cfg)
        atomic = width > 0 and cfg["tile_m"] < block_m
        if atomic:
            mass.zero_()
        _bsa_fwd[p.grid(cfg)](
            p.q, p.k, p.v, out, lse, mass_arg, p.lut, p.cnt, p.kpad, p.kgrp, p.qgrp, k_desc, v_desc, *p.strides(out),
            *(mass.stride()[:3] if width > 0 else (0, 0, 0)), *p.qgrp.stride()[:3], p.h, p.n, p.n_kb, p.d, p.dv,
            p.scale * _LOG2E, WRITE_LSE=return_lse, WRITE_MASS=width > 0, MASS_ATOMIC=atomic,
            HAS_GROUPS=p.has_groups, GROUP_WORDS=p.group_words,
            RHO=rho if reshape is not None else lse, RES=residual if reshape is not None else out,
            srb=residual.stride(0) if reshape is not None else 0, srh=residual.stride(1) if reshape is not None else 0,
            srn=residual.stride(2) if reshape is not None else 0, rho_add=float(rho_add),
            HAS_RESHAPE=reshape is not None, RHO_CLAMP=bool(rho_clamp), RES_CHUNK=min(32, p.head_dv),
            **p.consts(cfg),
        )  # fmt: skip

    cands = _candidates("bsa", block_m, block_n, p.head_d, p.fp32, p.tma_ok)
    if return_mass:  # tuning would run the atomic accumulation many times; the default tile is exact
        cfg = cands[0]
    else:
        cfg = _tuned("bsa", p.key(return_lse), q.device, cands, launch)
    launch(cfg)
    return reference._pack(out, lse, mass, return_lse, return_mass)


def block_sparse_attention_pair(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o_sparse, lse_sparse, o_full, lse_full)``: cuDNN's dense pass (with its LSE, checked once, see
    :mod:`.dense_lse`) plus the block-sparse kernel where cuDNN serves; else one pass of the pair kernel over all
    key blocks. With ``key_padding`` the pair kernel always answers (the cuDNN path is checked without a mask).
    With groups (token-level gating, see :func:`block_sparse_attention`) the sparse half always comes from the
    block-sparse kernel, the full half from cuDNN or the pair kernel's full pass.

    The pair kernel's sparse softmax uses the full row max as its reference, so it is exact unless the selected
    blocks' best score lies more than about 87 nats below the row's overall best (then the sparse sums underflow).
    """
    _check_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n)  # before cuDNN: a bad call must not switch it off
    reference.check_key_padding(key_padding, q.shape[0], q.shape[2], q.device)
    groups = reference.check_groups(key_groups, query_groups, q.shape[0], q.shape[1], q.shape[2], q.device)
    dense = None
    if key_padding is None and q.dtype in (torch.float16, torch.bfloat16):
        dense = dense_lse.dense_with_lse(q, k, v, scale)
    if dense is not None or groups[0] is not None:
        o_sparse, lse_sparse = block_sparse_attention(
            q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n, scale=scale, key_padding=key_padding,
            key_groups=key_groups, query_groups=query_groups,
        )  # fmt: skip
        if dense is None:  # the pair kernel's full half (its sparse half ignores the groups)
            dense = block_sparse_attention_pair(
                q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n, scale=scale, key_padding=key_padding
            )[2:]
        return o_sparse, lse_sparse, dense[0], dense[1]
    p = _Prepared(q, k, v, kv_indices, kv_counts, block_m, block_n, scale, key_padding)
    o_s = torch.empty(p.b, p.h, p.n, p.dv, device=q.device, dtype=q.dtype)
    o_f = torch.empty_like(o_s)
    lse_s = torch.empty(p.b, p.h, p.n, device=q.device, dtype=torch.float32)
    lse_f = torch.empty_like(lse_s)

    def launch(cfg: _Config) -> None:
        k_desc, v_desc = p.descriptors(cfg)
        strides = p.strides(o_s)
        _pair_fwd[p.grid(cfg)](
            p.q, p.k, p.v, o_s, lse_s, o_f, lse_f, p.lut, p.cnt, p.kpad, k_desc, v_desc, *strides, p.h, p.n, p.n_kb,
            p.lut.shape[-1], p.d, p.dv, p.scale * _LOG2E, **p.consts(cfg),
        )  # fmt: skip

    cands = _candidates("pair", block_m, block_n, p.head_d, p.fp32, p.tma_ok)
    cfg = _tuned("pair", p.key(by_sparsity=False), q.device, cands, launch)  # visits every block
    launch(cfg)
    return o_s, lse_s, o_f, lse_f


def _identity(t: torch.Tensor | None) -> tuple | None:
    """Where a tensor's data is and which write it is at: equal for a view taken again of unchanged data."""
    if t is None:
        return None
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t._version)


def _linear_helper_luts(p, negligible, key_padding, cache: dict | None):
    """SLA's helper LUTs of the negligible and the marginal blocks, so the kernel can pick the cheaper sum. With
    ``cache`` (a dict the caller keeps with its pattern) they are made once per pattern: reused while the same
    negligible mask and key padding come back unchanged (same data, no in-place write since)."""
    key = (_identity(p.lut), _identity(p.cnt), _identity(negligible), _identity(key_padding), p.block_n)
    if cache is not None and cache.get("key") == key:
        return cache["luts"]
    dev = p.lut.device
    selected = reference.selected_block_mask(p.lut, p.cnt, p.n_kb)
    marginal = ~selected
    if key_padding is not None:  # a fully masked block is never marginal (its phi(K) rows are 0 anyway)
        marginal = marginal & reference.key_blocks_alive(key_padding, p.block_n)[:, None, None, :]
    if negligible is not None:
        neg = negligible.to(device=dev, dtype=torch.bool) & marginal
        marginal = marginal & ~neg
        neg_lut, neg_cnt = lut_from_mask(neg)
    else:
        neg_lut = torch.zeros(1, dtype=torch.int32, device=dev)
        neg_cnt = torch.zeros(p.b, p.h, p.n_qb, dtype=torch.int32, device=dev)
    luts = (neg_lut, neg_cnt, *lut_from_mask(marginal))
    if cache is not None:  # the inputs are held too, so their memory cannot pass to another tensor meanwhile
        cache.clear()
        cache.update(key=key, luts=luts, held=(negligible, key_padding))
    return luts


def sparse_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    negligible: torch.Tensor | None = None,
    feature_map: str = "softmax",
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    helper_cache: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton SLA; same contract as :func:`reference.sparse_linear_attention` (``(o_sparse, o_linear, lse)``);
    ``helper_cache``: a dict kept with the pattern, so its helper LUTs are built once per pattern."""
    if feature_map not in _FEATURE_MAPS:
        raise ValueError(f"feature_map={feature_map!r} is not supported; allowed: {', '.join(_FEATURE_MAPS)}")
    p = _Prepared(q, k, v, kv_indices, kv_counts, block_m, block_n, scale, key_padding)
    if negligible is not None and tuple(negligible.shape) != (p.b, p.h, p.n_qb, p.n_kb):
        raise ValueError(
            f"negligible must be (B, H, n_q, n_k) = {(p.b, p.h, p.n_qb, p.n_kb)}; got {tuple(negligible.shape)}"
        )
    dev = q.device
    phi = _FEATURE_MAPS[feature_map]
    chunk = min(2048, 64 * math.ceil(p.n / 64))  # keys per partial-sum program (a multiple of 64)
    n_chunks = math.ceil(p.n / chunk)
    phi_k = torch.empty(p.b, p.h, p.n, p.d, device=dev, dtype=q.dtype)
    s_part = torch.empty(p.b, p.h, n_chunks, p.head_d, p.head_dv, device=dev, dtype=torch.float32)
    z_part = torch.empty(p.b, p.h, n_chunks, p.head_d, device=dev, dtype=torch.float32)
    _kv_stats[(n_chunks, p.b * p.h)](
        p.k, p.v, phi_k, s_part, z_part, p.kpad, *p.k.stride()[:3], *p.v.stride()[:3], p.h, p.n, n_chunks, p.d,
        p.dv, CHUNK=chunk, BLOCK_N=64, HEAD_D=p.head_d, HEAD_DV=p.head_dv, PHI=phi, FP32=p.fp32, HAS_KPAD=p.has_kpad,
        num_warps=4 if p.head_d * p.head_dv <= 64 * 64 else 8,
    )  # fmt: skip
    s_tot = s_part.sum(2)
    z_tot = z_part.sum(2)
    neg_lut, neg_cnt, marg_lut, marg_cnt = _linear_helper_luts(p, negligible, key_padding, helper_cache)

    o_s = torch.empty(p.b, p.h, p.n, p.dv, device=dev, dtype=q.dtype)
    o_l = torch.empty_like(o_s)
    lse = torch.empty(p.b, p.h, p.n, device=dev, dtype=torch.float32)

    def launch(cfg: _Config) -> None:
        k_desc, v_desc = p.descriptors(cfg)
        _sla_fwd[p.grid(cfg)](
            p.q, p.k, p.v, o_s, o_l, lse, p.lut, p.cnt, neg_lut, neg_cnt, marg_lut, marg_cnt, phi_k, s_tot, z_tot,
            p.kpad, k_desc, v_desc, *p.strides(o_s), p.h, p.n, p.n_qb, p.n_kb, p.d, p.dv, p.scale * _LOG2E,
            PHI=phi, **p.consts(cfg),
        )  # fmt: skip

    cands = _candidates("sla", block_m, block_n, p.head_d, p.fp32, p.tma_ok)
    cfg = _tuned("sla", p.key(phi, negligible is not None), dev, cands, launch)
    launch(cfg)
    return o_s, o_l, lse


def kept_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse_sparse: torch.Tensor,
    outside: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton SLA kept-mass estimate; same contract as :func:`reference.kept_mass`."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be the same (B, H, N, D); got {tuple(q.shape)} and {tuple(k.shape)}")
    b, h, n, d = q.shape
    n_qb, n_kb = math.ceil(n / block_m), math.ceil(n / block_n)
    if outside.dim() != 4 or tuple(outside.shape[2:]) != (n_qb, n_kb) or outside.shape[0] not in (1, b) or \
            outside.shape[1] not in (1, h):  # fmt: skip
        raise ValueError(f"outside must be (B or 1, H or 1, {n_qb}, {n_kb}); got {tuple(outside.shape)}")
    head_d = _pow2(d)
    key_padding = reference.check_key_padding(key_padding, b, n, q.device)
    mean, var, log_count = reference.key_block_moments(k, block_n, key_padding)
    log_count = log_count.contiguous()
    slcb = n_kb if key_padding is not None else 0  # (B, n_kb) counts with key padding, else one (n_kb,) row
    if head_d != d:
        mean, var = (torch.nn.functional.pad(t, (0, head_d - d)) for t in (mean, var))
    out8 = outside.to(torch.int8).contiguous()
    sob, soh = (0 if out8.shape[i] == 1 else out8.stride(i) for i in (0, 1))
    q = _last_contig(q)
    lse = lse_sparse.float().contiguous()
    alpha = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    tile = 64
    s = 1.0 / math.sqrt(d) if scale is None else float(scale)
    _kept_mass_fwd[(triton.cdiv(n, tile), b * h)](
        q, lse, mean.contiguous(), var.contiguous(), log_count, out8, alpha, *q.stride()[:3], sob, soh,
        out8.stride(2), slcb, h, n, n_kb, d, s, BLOCK_M=tile, LUT_BLOCK_M=block_m, KB=64, HEAD_D=head_d,
        FP32=q.dtype == torch.float32, num_warps=8,
    )  # fmt: skip
    return alpha


def mean_pool(
    x: torch.Tensor, block: int, *, smooth: bool = False, key_padding: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton block mean-pooling; same contract as :func:`reference.mean_pool`."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, N, D); got {tuple(x.shape)}")
    x = _last_contig(x)
    b, h, n, d = x.shape
    bias = _key_bias_tensor(key_padding, b, n, x.device)
    n_blocks = math.ceil(n / block)
    out = torch.empty(b, h, n_blocks, d, device=x.device, dtype=torch.float32)
    tile = min(64, _pow2(block, 1))
    _pool_mean[(n_blocks, b * h)](
        x, out, bias if bias is not None else out, *x.stride()[:3], h, n, n_blocks, d, POOL=block, TILE=tile,
        HEAD_D=_pow2(d, 1), HAS_KPAD=bias is not None, num_warps=4,
    )  # fmt: skip
    if smooth:  # mean over blocks weighted by their real (kept) sizes = the mean over all (kept) tokens
        if key_padding is None:
            sizes = reference.block_sizes(n, block, x.device)[None, None, :, None]
            out = out - (out * sizes).sum(2, keepdim=True) / n
        else:
            sizes = reference.kept_counts(key_padding, block)[:, None, :, None]
            mean = (out * sizes).sum(2, keepdim=True) / sizes.sum(2, keepdim=True).clamp(min=1.0)
            out = torch.where(sizes > 0, out - mean, 0.0)  # a fully masked block stays 0, as in the reference
    return out


def _select(
    mode: int,
    source: torch.Tensor,
    *,
    k_sel: int = 0,
    tau: float = 0.0,
    forced: torch.Tensor | None = None,
    write_mask: bool,
    write_lut: bool,
):
    shape = source.shape
    n_k = shape[-1]
    rows = source.numel() // max(n_k, 1)
    dev = source.device
    mask = torch.empty(shape, dtype=torch.bool, device=dev) if write_mask else None
    lut = torch.empty(shape, dtype=torch.int32, device=dev) if write_lut else None
    cnt = torch.empty(shape[:-1], dtype=torch.int32, device=dev) if write_lut else None
    if rows == 0 or n_k == 0:
        if write_mask:
            mask.zero_()
        if write_lut:
            cnt.zero_()
        return mask, lut, cnt
    src = source.contiguous()
    if mode == 0:
        src = src.view(torch.int8) if src.dtype == torch.bool else (src != 0).view(torch.int8)
    frc = None
    if forced is not None:
        frc = forced.to(device=dev, dtype=torch.bool).expand(shape).contiguous().view(torch.int8)
    dummy = src
    width = _pow2(n_k, 16)
    _select_lut[(rows,)](
        src if mode else dummy, src if mode == 0 else dummy, frc if frc is not None else dummy,
        mask.view(torch.int8) if write_mask else dummy, lut if write_lut else dummy, cnt if write_lut else dummy,
        n_k, int(k_sel), float(tau), MODE=mode, HAS_FORCED=frc is not None, WRITE_MASK=write_mask,
        WRITE_LUT=write_lut, WIDTH=width, num_warps=4 if width <= 1024 else 8,
    )  # fmt: skip
    return mask, lut, cnt


def lut_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton mask-to-LUT (prefix counts, no sort); same output as :func:`reference.lut_from_mask`."""
    if mask.shape[-1] > _MAX_SELECT_WIDTH:
        return reference.lut_from_mask(mask)
    _, lut, cnt = _select(0, mask, write_mask=False, write_lut=True)
    return lut, cnt


def topk_mask(scores: torch.Tensor, k: int, *, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Triton top-k block selection; same contract as :func:`reference.topk_mask` (ties to the lower index)."""
    n_k = scores.shape[-1]
    if n_k > _MAX_SELECT_WIDTH:
        return reference.topk_mask(scores, k, forced=forced)
    mask, _, _ = _select(1, scores, k_sel=max(0, min(int(k), n_k)), forced=forced, write_mask=True, write_lut=False)
    return mask


def threshold_mask(scores: torch.Tensor, tau: float, *, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Triton cumulative-threshold selection; same contract as :func:`reference.threshold_mask`."""
    tau = float(tau)
    if scores.shape[-1] > _MAX_SELECT_WIDTH or tau <= 0.0 or tau >= 1.0:
        return reference.threshold_mask(scores, tau, forced=forced)
    mask, _, _ = _select(2, scores, tau=tau, forced=forced, write_mask=True, write_lut=False)
    return mask


def pooled_topk_lut(
    q: torch.Tensor,
    k: torch.Tensor,
    block_m: int,
    block_n: int,
    k_blocks: int,
    *,
    forced: torch.Tensor | None = None,
    smooth_k: bool = True,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool (Triton), score (one batched matmul), select top-k and write the LUT (one Triton kernel): four launches.
    With ``key_padding`` the keys are pooled over kept tokens and the fully masked key blocks are dropped from
    the selection (two more launches: the mask, then its LUT).

    Smooth-K subtracts one vector from every pooled key, which shifts all scores of a row by the same amount, and the
    scale is positive: neither changes a row's top-k, so both are skipped here (the reference applies them; the
    selection is the same). With them the pipeline took 0.30-0.36 ms on an H200 for shapes whose pooling and
    matmul move about 200 MB (tens of microseconds of bandwidth): launches, not work, set its cost."""
    del smooth_k, scale  # see the docstring: the top-k of a row does not depend on them
    pq = mean_pool(q, block_m)
    pk = mean_pool(k, block_n, key_padding=key_padding)
    scores = torch.matmul(pq, pk.transpose(-1, -2))
    if key_padding is not None:
        alive = reference.key_blocks_alive(key_padding, block_n)[:, None, None, :]
        scores = scores.masked_fill(~alive, float("-inf"))
        forced = forced.to(device=q.device, dtype=torch.bool) & alive if forced is not None else None
        return lut_from_mask(topk_mask(scores, k_blocks, forced=forced) & alive)
    n_k = scores.shape[-1]
    if n_k > _MAX_SELECT_WIDTH:
        return reference.lut_from_mask(reference.topk_mask(scores, k_blocks, forced=forced))
    _, lut, cnt = _select(
        1, scores, k_sel=max(0, min(int(k_blocks), n_k)), forced=forced, write_mask=False, write_lut=True
    )
    return lut, cnt


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i`` (a device scatter, no host sync)."""
    return reference.inverse_permutation(perm)


def permute_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Triton token gather ``out[:, :, i] = x[:, :, perm[i]]``; same contract as :func:`reference.permute_tokens`."""
    if x.dim() != 4 or perm.dim() != 1 or perm.numel() != x.shape[2]:
        raise ValueError(f"x must be (B, H, N, D) and perm (N,); got x={tuple(x.shape)}, perm={tuple(perm.shape)}")
    x = _last_contig(x)
    b, h, n, d = x.shape
    out = torch.empty(b, h, n, d, device=x.device, dtype=x.dtype)
    idx = perm.to(device=x.device, dtype=torch.int32).contiguous()
    tile = 64
    _gather_tokens[(triton.cdiv(n, tile), b * h)](
        x, out, idx, *x.stride()[:3], *out.stride()[:3], h, n, d, TILE=tile, HEAD_D=_pow2(d, 1), num_warps=4
    )
    return out


def unpermute_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Undo :func:`permute_tokens` with the same ``perm`` (a gather with the inverse permutation)."""
    return permute_tokens(x, inverse_permutation(perm.to(device=x.device, dtype=torch.long)))
