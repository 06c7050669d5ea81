"""Dense attention with its log-sum-exp from cuDNN, the fastest dense kernel on Hopper, for refresh steps.

A Re-ttention refresh needs the full output and its LSE besides the sparse pair. Measured on an H200 (BENCHMARKS.md)
our one-pass pair kernel cost 1.4x a dense step, while cuDNN runs dense attention at 566 TFLOP/s; cuDNN's full pass
plus our sparse kernel is the cheaper pair. PyTorch exposes cuDNN's LSE only through the private op
``aten._scaled_dot_product_cudnn_attention`` whose LSE layout is not documented, so the first call per (device,
dtype, head_dim) checks it against an exact computation on a few query rows; a failure or a mismatch switches the
path off for that key (the pair kernel is used) with one warning. ``DIT_ACCEL_DENSE_LSE=0`` switches it off.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from . import reference

__all__ = ["dense_with_lse"]

_DEVICE_TYPES = ("cuda",)
_CHECK_ROWS = 64
_VERIFIED: dict[tuple, bool] = {}


def _cudnn_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    op = torch.ops.aten._scaled_dot_product_cudnn_attention
    result = op(q, k, v, None, True, 0.0, False, False, scale=scale)
    out, lse = result[0], result[1]
    b, h, n, _ = q.shape
    if lse is None or lse.numel() != b * h * n:
        raise RuntimeError(f"unexpected cuDNN LSE shape {None if lse is None else tuple(lse.shape)}")
    return out, lse.reshape(b, h, n).float()


def dense_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(out, lse)`` of dense attention (lse float32 (B, H, N), natural log) through cuDNN, or None where that
    path is unavailable, unverified during a CUDA-graph capture, switched off, or failed its check."""
    if q.device.type not in _DEVICE_TYPES or os.environ.get("DIT_ACCEL_DENSE_LSE", "1").strip() == "0":
        return None
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    key = (str(q.device), q.dtype, q.shape[-1], v.shape[-1])
    state = _VERIFIED.get(key)
    if state is False:
        return None
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if state is None and capturing:
        return None  # the check reads values on the host: run one call outside the capture first
    try:
        out, lse = _cudnn_call(q, k, v, scale)
    except Exception as exc:  # op missing, shape or dtype not supported by this cuDNN
        _VERIFIED[key] = False
        warnings.warn(
            f"dit_accel: cuDNN dense attention with LSE unavailable ({exc}); using the pair kernel", stacklevel=2
        )
        return None
    if state is None:
        rows = min(_CHECK_ROWS, q.shape[2])
        ref_out, ref_lse = reference.dense_attention(q[:, :, :rows], k, v, scale=scale)
        ok = torch.allclose(lse[:, :, :rows], ref_lse, atol=2e-2, rtol=0) and torch.allclose(
            out[:, :, :rows].float(), ref_out.float(), atol=3e-2, rtol=3e-2
        )
        _VERIFIED[key] = ok
        if not ok:
            warnings.warn("dit_accel: cuDNN's LSE did not match the exact one; using the pair kernel", stacklevel=2)
            return None
    return out, lse
