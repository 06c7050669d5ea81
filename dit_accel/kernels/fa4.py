"""Block-sparse attention through FlashAttention-4 (CuTe DSL, ``flash-attn-4``), from the project's LUT.

FA4 (``flash_attn.cute.flash_attn_func``, checked against 4.0.0b40) takes block sparsity as FlexAttention does:
per (batch, head, query tile) a count and an ascending list of *partial* key tiles (``mask_block_cnt`` /
``mask_block_idx``: the ``mask_mod`` decides token by token) and of *full* key tiles (``full_block_cnt`` /
``full_block_idx``: every key computed, no ``mask_mod``), all int32 on CUDA, wrapped in
``flash_attn.cute.block_sparsity.BlockSparseTensorsTorch`` with ``block_size=(tile_m, tile_n)``. Its tiles are
coarser than our 64-token blocks, so :func:`fa4_block_sparsity_from_lut` merges them:

* a tile of ``tile_m x tile_n`` tokens covers ``(tile_m / block_m) x (tile_n / block_n)`` of our blocks;
* it is *full* when every sub-block whose query block exists is kept and no key inside it is masked (key padding,
  or the padded tail past ``n``); *partial* when some sub-block is kept and some key in it is alive; skipped
  otherwise;
* the ``mask_mod`` keeps exactly the kept sub-blocks and the unpadded keys: it reads one int32 word per tile
  (``tile_bits``, bit ``i * (tile_n / block_n) + j`` = sub-block (i, j) kept) and an int32 key mask
  (``keys_ok``, padded to whole tiles so every index the kernel may pass is in bounds).

The tile FA4 runs is chosen by FA4 itself from ``block_size`` (``flash_attn/cute/config.py``): on Hopper (sm90) a
sparse block of 128 x 128 gives a 128 x 128 tile for head dims up to 128 (64 x 64 blocks give 64 x 64 tiles there:
``DIT_ACCEL_FA4_TILE=64`` passes our blocks unmerged); on Blackwell (sm100/sm110) two query tiles run per CTA
(``q_stage=2`` beyond 128 queries) so the query block must be 256, key blocks multiples of 128.

FA4 returns ``out`` (B, N, H, Dv) and ``lse`` float32 (B, H, N) in natural log (``softmax.py`` multiplies its base-2
value by ln 2), -inf and 0 for a row with no key: our convention already, only the layout is transposed.
Masses, token-level groups and the reshape epilogue go to the reference, as in :mod:`dit_accel.kernels.flex`.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, NamedTuple

import torch

from . import reference

__all__ = [
    "FA4_PACKAGE",
    "FA4BlockSparsity",
    "block_sparse_attention",
    "fa4_available",
    "fa4_block_sparsity_from_lut",
    "fa4_tile",
    "lut_mask_mod",
]

#: the pip name of the package (pinned in scripts/stage_fa4.sh); ``import flash_attn.cute`` is what it provides
FA4_PACKAGE = "flash-attn-4==4.0.0b40"


class FA4BlockSparsity(NamedTuple):
    """FA4's four block-sparse tensors of one LUT, plus what the ``mask_mod`` reads (``aux_tensors``)."""

    mask_block_cnt: torch.Tensor  # int32 (B, H, n_qt): partial tiles per query tile
    mask_block_idx: torch.Tensor  # int32 (B, H, n_qt, n_kt): ascending, valid entries first
    full_block_cnt: torch.Tensor  # int32 (B, H, n_qt)
    full_block_idx: torch.Tensor  # int32 (B, H, n_qt, n_kt)
    tile_bits: torch.Tensor  # int32 (B, H, n_qt, n_kt): bit i * fn + j = sub-block (i, j) kept
    keys_ok: torch.Tensor  # int32 (B, n_kt * tile_n): 1 = the key exists and is not padded out
    tile: tuple[int, int]  # (tile_m, tile_n) tokens, FA4's block_size
    block: tuple[int, int]  # (block_m, block_n) of the LUT


def fa4_block_sparsity_from_lut(
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    n: int,
    *,
    block_m: int,
    block_n: int,
    tile: tuple[int, int] = (128, 128),
    key_padding: torch.Tensor | None = None,
) -> FA4BlockSparsity:
    """FA4's block sparsity for a LUT over ``n`` tokens (layout: :mod:`dit_accel.kernels.reference`).

    Pure torch, on the LUT's device, no host sync and no loop over blocks. ``tile`` must be a multiple of
    ``(block_m, block_n)`` with at most 31 sub-blocks (one int32 word per tile).
    """
    tile_m, tile_n = int(tile[0]), int(tile[1])
    for name, t, blk in (("tile[0]", tile_m, block_m), ("tile[1]", tile_n, block_n)):
        if blk <= 0 or t <= 0 or t % blk:
            raise ValueError(f"{name}={t} must be a positive multiple of the LUT block ({blk})")
    fm, fn = tile_m // block_m, tile_n // block_n
    if fm * fn > 31:
        raise ValueError(f"tile={tile} holds {fm * fn} blocks of {block_m}x{block_n}; at most 31 fit one int32 word")
    b, h, n_qb = kv_counts.shape
    n_kb = math.ceil(n / block_n)
    n_qt, n_kt = math.ceil(n / tile_m), math.ceil(n / tile_n)
    device = kv_indices.device
    if n_qb != math.ceil(n / block_m):
        want = math.ceil(n / block_m)
        raise ValueError(f"kv_counts has {n_qb} query blocks; n={n} with block_m={block_m} needs {want}")

    selected = reference.selected_block_mask(kv_indices, kv_counts, n_kb)  # (B, H, n_qb, n_kb)
    grid = torch.nn.functional.pad(selected, (0, n_kt * fn - n_kb, 0, n_qt * fm - n_qb))
    sub = grid.view(b, h, n_qt, fm, n_kt, fn).transpose(3, 4)  # (B, H, n_qt, n_kt, fm, fn)
    weights = torch.arange(fm * fn, device=device, dtype=torch.int32).view(fm, fn)
    tile_bits = (sub.to(torch.int32) << weights).sum((-1, -2), dtype=torch.int32)

    keys_ok = torch.zeros(b, n_kt * tile_n, dtype=torch.bool, device=device)
    keys_ok[:, :n] = True if key_padding is None else key_padding.to(torch.bool)
    keys_tiles = keys_ok.view(b, n_kt, tile_n)
    tile_whole = keys_tiles.all(-1)[:, None, None, :]  # (B, 1, 1, n_kt): no masked or padded key inside
    tile_alive = keys_tiles.any(-1)[:, None, None, :]
    q_exists = (torch.arange(n_qt * fm, device=device) < n_qb).view(n_qt, 1, fm, 1)  # query sub-blocks past n
    every = (sub | ~q_exists).all(-1).all(-1)  # every existing sub-block kept
    full = every & tile_whole
    partial = (tile_bits != 0) & tile_alive & ~full
    full_idx, full_cnt = reference.lut_from_mask(full)
    part_idx, part_cnt = reference.lut_from_mask(partial)
    return FA4BlockSparsity(
        part_cnt, part_idx, full_cnt, full_idx, tile_bits, keys_ok.to(torch.int32), (tile_m, tile_n),
        (block_m, block_n),
    )  # fmt: skip


def lut_mask_mod(
    sparsity: FA4BlockSparsity, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
) -> torch.Tensor:
    """The ``mask_mod`` of :func:`fa4_block_sparsity_from_lut` in torch (broadcasting index tensors): what the CuTe
    version computes, for the CPU interpreter in the tests and for FlexAttention."""
    tile_m, tile_n = sparsity.tile
    block_m, block_n = sparsity.block
    fn = tile_n // block_n
    word = sparsity.tile_bits[b, h, q_idx // tile_m, kv_idx // tile_n]
    shift = (q_idx % tile_m) // block_m * fn + (kv_idx % tile_n) // block_n
    return (((word >> shift) & 1) & sparsity.keys_ok[b, kv_idx]) != 0


@functools.cache
def _cute_mask_mod(tile_m: int, tile_n: int, block_m: int, block_n: int) -> Any:
    """The CuTe DSL ``mask_mod`` (FA4 signature ``(batch, head, m_idx, n_idx, seqlen_info, aux_tensors)``, indices
    as 1-element TensorSSA), one per tiling so FA4's compile cache (it hashes source and closure) keys on it."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils as fa_utils

    fn = tile_n // block_n

    @cute.jit
    def lut_mask_mod_cute(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        bits, keys = aux_tensors[0], aux_tensors[1]
        q, k = m_idx[0], n_idx[0]
        word = bits[batch[0], head[0], q // tile_m, k // tile_n]
        shift = (q % tile_m) // block_m * fn + (k % tile_n) // block_n
        keep = ((word >> shift) & 1) & keys[batch[0], k]
        return fa_utils.scalar_to_ssa(keep, cutlass.Int32) != fa_utils.scalar_to_ssa(0, cutlass.Int32)

    return lut_mask_mod_cute


def _import_fa4() -> tuple[Any, Any]:
    """``(flash_attn_func, BlockSparseTensorsTorch)``, or ImportError naming the package to install."""
    try:
        from flash_attn.cute import flash_attn_func
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    except Exception as exc:  # noqa: BLE001 - any failure (missing package, CUDA/driver mismatch) means unavailable
        raise ImportError(
            f"kernel_backend='fa4' needs FlashAttention-4: pip install --pre '{FA4_PACKAGE}' (import flash_attn.cute "
            f"failed: {type(exc).__name__}: {exc})"[:400]
        ) from exc
    return flash_attn_func, BlockSparseTensorsTorch


@functools.lru_cache(maxsize=1)
def fa4_available() -> bool:
    """Whether ``flash_attn.cute`` imports and a CUDA device is present (cached: import is slow)."""
    if not torch.cuda.is_available():
        return False
    try:
        _import_fa4()
    except ImportError:
        return False
    return True


def fa4_tile(device: torch.device, n: int) -> tuple[int, int]:
    """The sparse block FA4 runs on ``device`` for ``n`` queries: (128, 128) on sm90 (``DIT_ACCEL_FA4_TILE=64``:
    64 x 64, our blocks unmerged), (256, 128) on sm100/sm110 beyond 128 queries (two query tiles per CTA)."""
    major = torch.cuda.get_device_capability(device)[0]
    if major == 9:
        raw = os.environ.get("DIT_ACCEL_FA4_TILE", "128").strip()
        if raw not in ("64", "128"):
            raise ValueError(f"DIT_ACCEL_FA4_TILE={raw!r} is not allowed; choose '64' or '128'")
        return (int(raw), int(raw))
    if major in (10, 11):
        return (256 if n > 128 else 128, 128)
    raise ValueError(f"kernel_backend='fa4' is wired for sm90 and sm100/sm110 only; this device is sm{major}x")


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
    tile: tuple[int, int] | None = None,
):
    """Block-sparse attention through FA4 (same contract as the reference; ``tile`` overrides :func:`fa4_tile`)."""
    if reference.needs_reference(return_mass, key_groups, query_groups, rho, residual):
        return reference.block_sparse_attention(
            q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n, scale=scale, return_lse=return_lse,
            return_mass=return_mass, key_padding=key_padding, key_groups=key_groups, query_groups=query_groups,
            rho=rho, residual=residual, rho_add=rho_add, rho_clamp=rho_clamp,
        )  # fmt: skip
    reference._check_block_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n)
    flash_attn_func, block_sparse_tensors = _import_fa4()
    if q.device.type != "cuda":
        raise ValueError(f"kernel_backend='fa4' needs CUDA tensors; q is on {q.device}")
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"kernel_backend='fa4' takes float16 or bfloat16 q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, _, n, d = q.shape
    key_padding = reference.check_key_padding(key_padding, b, n, q.device)
    tile = fa4_tile(q.device, n) if tile is None else tile
    sp = fa4_block_sparsity_from_lut(
        kv_indices, kv_counts, n, block_m=block_m, block_n=block_n, tile=tile, key_padding=key_padding
    )
    tensors = block_sparse_tensors(
        mask_block_cnt=sp.mask_block_cnt, mask_block_idx=sp.mask_block_idx, full_block_cnt=sp.full_block_cnt,
        full_block_idx=sp.full_block_idx, block_size=sp.tile,
    )  # fmt: skip
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out, lse = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
        mask_mod=_cute_mask_mod(*sp.tile, block_m, block_n), aux_tensors=[sp.tile_bits, sp.keys_ok],
        block_sparse_tensors=tensors, return_lse=True,
    )  # fmt: skip
    out, lse = reference.empty_rows_as_reference(out.transpose(1, 2), lse)
    return (out.contiguous(), lse) if return_lse else out.contiguous()
