"""Re-ttention's statistical reshape, in LSE form (no N x N tensor ever exists).

At a refresh step, with the sparse and the full attention of the same call and their LSEs:
    rho = exp(lse_sparse - lse_full)   (the kept softmax mass per row, in (0, 1])
    R   = O_full - rho * O_sparse      (the output of the masked keys)
At the c-th sparse step after it (c = 1 first): O = rho_c * O_sparse + R with rho_c = rho + (c - 1) * ramp, as the
official processors count (clamped at 1 on request); ``uses`` below is c - 1.
"""

from __future__ import annotations

import torch

from ..kernels.reference import apply_reshape

__all__ = ["reshape_output", "reshape_statistics"]


def reshape_statistics(
    o_sparse: torch.Tensor, lse_sparse: torch.Tensor, o_full: torch.Tensor, lse_full: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rho, residual)``: rho float32 (B, H, N) in (0, 1], residual float32 (B, H, N, D)."""
    rho = torch.exp(lse_sparse.float() - lse_full.float())
    # a row with no selected key has lse_sparse = -inf: rho 0, the residual is the whole output
    rho = torch.nan_to_num(rho, nan=0.0).clamp(0.0, 1.0)
    residual = o_full.float() - rho[..., None] * o_sparse.float()
    return rho, residual


def reshape_output(
    o_sparse: torch.Tensor,
    rho: torch.Tensor,
    residual: torch.Tensor,
    *,
    ramp: float,
    uses: int,
    clamp: bool,
) -> torch.Tensor:
    """``rho_c * O_sparse + R`` with ``rho_c = rho + uses * ramp`` (``uses`` sparse steps since the refresh), in
    float32; the kernels apply the same formula in their epilogue (``block_sparse_attention(rho=, residual=)``)."""
    return apply_reshape(o_sparse, rho, residual, ramp * uses, clamp)
