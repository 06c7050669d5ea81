"""Block-sparse attention through cuDNN frontend's BSA kernels (``nvidia-cudnn-frontend``, ``"cudnn_bsa"``).

``cudnn.block_sparse_attention.block_sparse_attention_forward`` (checked against 1.32.0,
``cudnn/block_sparse_attention/api.py``) takes nearly our LUT: ``q2k_block_index`` int32 (B, H, n_qb, width) of key
block ids per query block, ``q2k_block_nums`` int32 (B, H, n_qb) of how many are valid, and ``block_sizes`` int32
(n_kb,) (or (B, n_kb), (B, H, n_kb) on sm90/sm120): the number of real keys of each key block, counted from its
start. One ``sparse_block_size`` serves queries and keys: 64 or 128 on sm90 (64 there needs ``seqlen_q % 64 == 0``,
so a ragged ``n`` gets zero query rows appended), 128 on sm100/sm110 (64 only for bf16, head dim 128, MHA). Head
dims 64, 96, 128 on sm90; fp16 / bf16. It returns ``o`` in the input layout and ``lse`` float32 (B, H, N) in natural
log (``get_final_ratio_and_lse`` in ``csrc/fwd/sm90_blk64/bsa_fwd_sm90.py`` scales by ln 2), -inf for an empty row.

Key padding is not expressible (``block_sizes`` cuts a block's tail, not arbitrary keys): such calls raise, and
``auto`` excludes the backend for those keys only. Masses, groups and the reshape epilogue go to the reference.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from . import reference

__all__ = ["CUDNN_PACKAGE", "CudnnBSAInputs", "block_sparse_attention", "cudnn_bsa_available", "cudnn_bsa_from_lut"]

CUDNN_PACKAGE = "nvidia-cudnn-frontend==1.32.0"


class CudnnBSAInputs(NamedTuple):
    """cuDNN BSA's sparse metadata of one LUT."""

    q2k_block_index: torch.Tensor  # int32 (B, H, n_qb, width): ids in [0, n_kb), valid entries first
    q2k_block_nums: torch.Tensor  # int32 (B, H, n_qb)
    block_sizes: torch.Tensor  # int32 (n_kb,): real keys per key block (the last one ragged)


def cudnn_bsa_from_lut(kv_indices: torch.Tensor, kv_counts: torch.Tensor, n: int, *, block: int) -> CudnnBSAInputs:
    """The LUT as cuDNN BSA wants it: slots past the count clamped into range (the kernel's contract asks for
    ids of real blocks everywhere), the counts as they are, the ragged last block's length in ``block_sizes``."""
    n_kb = math.ceil(n / block)
    if kv_indices.shape[-1] < 1:
        raise ValueError("kv_indices must have at least one slot (cuDNN BSA refuses an empty LUT width)")
    index = kv_indices.clamp(0, n_kb - 1).to(torch.int32).contiguous()
    starts = torch.arange(n_kb, device=kv_indices.device, dtype=torch.int32) * block
    sizes = (n - starts).clamp(max=block).to(torch.int32)
    return CudnnBSAInputs(index, kv_counts.to(torch.int32).contiguous(), sizes)


def _import_bsa() -> Any:
    try:
        from cudnn.block_sparse_attention import block_sparse_attention_forward
    except Exception as exc:  # noqa: BLE001 - missing package or a broken install: unavailable either way
        raise ImportError(
            f"kernel_backend='cudnn_bsa' needs cuDNN frontend's BSA: pip install '{CUDNN_PACKAGE}' (import "
            f"cudnn.block_sparse_attention failed: {type(exc).__name__}: {exc})"[:400]
        ) from exc
    return block_sparse_attention_forward


@functools.lru_cache(maxsize=1)
def cudnn_bsa_available() -> bool:
    """Whether ``cudnn.block_sparse_attention`` imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        _import_bsa()
    except ImportError:
        return False
    return True


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
    """Block-sparse attention through cuDNN BSA (same contract as the reference, no key padding)."""
    if reference.needs_reference(return_mass, key_groups, query_groups, rho, residual):
        return reference.block_sparse_attention(
            q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n, scale=scale, return_lse=return_lse,
            return_mass=return_mass, key_padding=key_padding, key_groups=key_groups, query_groups=query_groups,
            rho=rho, residual=residual, rho_add=rho_add, rho_clamp=rho_clamp,
        )  # fmt: skip
    reference._check_block_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n)
    forward = _import_bsa()
    if key_padding is not None:
        raise ValueError("kernel_backend='cudnn_bsa' cannot apply key_padding (block_sizes only cut block tails)")
    if block_m != block_n:
        raise ValueError(f"kernel_backend='cudnn_bsa' needs block_m == block_n; got {block_m} and {block_n}")
    if q.device.type != "cuda":
        raise ValueError(f"kernel_backend='cudnn_bsa' needs CUDA tensors; q is on {q.device}")
    n = q.shape[2]
    meta = cudnn_bsa_from_lut(kv_indices, kv_counts, n, block=block_n)
    pad = -n % block_m
    q_in = F.pad(q, (0, 0, 0, pad)) if pad else q  # sm90's 64-blocks need whole query blocks; extra rows dropped
    result = forward(
        q_in, k, v, meta.q2k_block_index, None, meta.block_sizes, meta.q2k_block_nums, sparse_block_size=block_n,
        allow_empty_block_nums=True, softmax_scale=scale, layout="bhsd",
    )  # fmt: skip
    out, lse = result["o_tensor"][:, :, :n], result["lse_tensor"][:, :, :n]
    out, lse = reference.empty_rows_as_reference(out, lse)
    return (out.contiguous(), lse) if return_lse else out.contiguous()
