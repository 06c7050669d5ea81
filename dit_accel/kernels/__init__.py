"""Attention kernels behind one dispatching API.

On CUDA the public functions run the Triton kernels when they are available; everywhere else the exact
PyTorch references in :mod:`dit_accel.kernels.reference`. ``DIT_ACCEL_KERNELS=triton`` or ``=reference``
forces one (with ``TRITON_INTERPRET=1`` the Triton kernels run on the CPU, for tests).
"""

from __future__ import annotations

import os

import torch

from . import reference

__all__ = [
    "SUPPORTED_BLOCK_SIZES",
    "backend_for",
    "block_sparse_attention",
    "dense_attention",
    "lut_from_mask",
    "mean_pool",
    "reference",
    "topk_mask",
]

SUPPORTED_BLOCK_SIZES = (64, 128)
_BACKENDS = ("auto", "triton", "reference")


def _triton_available() -> bool:
    try:
        from . import triton_block_sparse  # noqa: F401
    except Exception:  # pragma: no cover - triton missing or broken on this platform
        return False
    return True


def backend_for(device: torch.device | str) -> str:
    """Which implementation runs for tensors on ``device``: ``"triton"`` or ``"reference"``."""
    forced = os.environ.get("DIT_ACCEL_KERNELS", "auto").strip().lower() or "auto"
    if forced not in _BACKENDS:
        raise ValueError(f"DIT_ACCEL_KERNELS={forced!r} is not one of {', '.join(_BACKENDS)}")
    if forced == "reference":
        return "reference"
    if forced == "triton":
        if not _triton_available():
            raise RuntimeError("DIT_ACCEL_KERNELS=triton but the Triton kernels cannot be imported")
        return "triton"
    device = torch.device(device)
    if device.type == "cuda" and _triton_available():
        return "triton"
    return "reference"


def _check_block(block_m: int, block_n: int) -> None:
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"{name}={value!r} is not supported; allowed: {SUPPORTED_BLOCK_SIZES}")


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
):
    """Block-sparse attention over a per-(batch, head, query block) LUT of key blocks.

    Returns ``(out, lse)`` (``lse`` float32 (B, H, N), natural log) or ``out`` alone with ``return_lse=False``.
    See :mod:`dit_accel.kernels.reference` for the layout of ``kv_indices`` and ``kv_counts``.
    """
    _check_block(block_m, block_n)
    if backend_for(q.device) == "triton":
        from .triton_block_sparse import block_sparse_attention as impl
    else:
        impl = reference.block_sparse_attention
    return impl(q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n, scale=scale, return_lse=return_lse)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None):
    """Full attention with its LSE: ``(out, lse)``; used by methods that need statistics of a dense step."""
    return reference.dense_attention(q, k, v, scale=scale)


def mean_pool(x: torch.Tensor, block: int, *, smooth: bool = False) -> torch.Tensor:
    """Block means of (B, H, N, D) as float32 (B, H, ceil(N/block), D); see the reference for details."""
    return reference.mean_pool(x, block, smooth=smooth)


def lut_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A boolean block mask as ``(kv_indices, kv_counts)`` without host synchronisation."""
    return reference.lut_from_mask(mask)


def topk_mask(scores: torch.Tensor, k: int, *, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Forced blocks plus the highest-scoring others, ``k`` per row in all."""
    return reference.topk_mask(scores, k, forced=forced)
