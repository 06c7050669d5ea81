"""FlexAttention with ``kernel_options={"BACKEND": "FLASH"}`` (``kernel_backend="flex_flash"``).

The same ``BlockMask`` as :mod:`dit_accel.kernels.flex`, handed by Inductor to FlashAttention-4's CuTe DSL kernel
(torch >= 2.11 with ``flash-attn-4`` installed) instead of the Triton template: FA4 picks its tile from the
``BlockMask``'s block size (on sm90 a 64 x 64 ``BlockMask`` runs 64 x 64 tiles), and the ``mask_mod`` (selected
block and key padding, read from captured tensors) is compiled into the kernel. A separate backend name so
``auto`` times it apart from the Triton-template FlexAttention and a refusal by Inductor excludes only it.
"""

from __future__ import annotations

import torch

from . import flex

__all__ = ["block_sparse_attention"]

_FLASH = {"BACKEND": "FLASH"}


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices, kv_counts, **kwargs):
    """:func:`dit_accel.kernels.flex.block_sparse_attention` on FlexAttention's FLASH backend (CUDA only)."""
    if q.device.type != "cuda":
        raise ValueError(f"kernel_backend='flex_flash' needs CUDA tensors; q is on {q.device}")
    return flex.block_sparse_attention(q, k, v, kv_indices, kv_counts, kernel_options=_FLASH, **kwargs)
