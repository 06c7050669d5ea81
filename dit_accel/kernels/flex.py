"""Block-sparse attention through PyTorch's FlexAttention, from the project's LUT (``DIT_ACCEL_KERNELS=flex``).

A maintained alternative to our Triton kernel (issue 16's backends): the LUT becomes a ``BlockMask`` whose
``mask_mod`` states the same selection token by token, so the result is exact in both FlexAttention modes. Compiled
(CUDA: ``torch.compile`` once per shape), the kernel visits only the listed blocks, as *full* blocks (no mask
evaluation inside them) when nothing is masked within a block; eager (the CPU, and tests) FlexAttention evaluates
the ``mask_mod`` everywhere and treats the blocks only as a hint, which is why the selection lives in the
``mask_mod`` too. Masses, token-level groups and the reshape epilogue go to the reference (or Triton) kernels.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import reference

__all__ = ["block_mask_from_lut", "block_sparse_attention", "block_sparse_attention_pair", "flash_backend_available"]

_COMPILED: dict[str, Any] = {}


def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def _compiled_flex(device: torch.device):
    """FlexAttention compiled once (CUDA), or eager (CPU: its compiled CPU kernel returns no LSE)."""
    if device.type != "cuda":
        return _flex()
    if "cuda" not in _COMPILED:
        _COMPILED["cuda"] = torch.compile(_flex(), dynamic=False)
    return _COMPILED["cuda"]


def torch_has_flash_backend() -> bool:
    """Whether this torch's FlexAttention has ``BACKEND="FLASH"`` (2.11 and later)."""
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2] if p.isdigit())
    return version >= (2, 11)


def flash_backend_available() -> bool:
    """Whether FlexAttention's ``BACKEND="FLASH"`` can run here: CUDA, torch >= 2.11 and FlashAttention-4
    (``flash_attn.cute``) importable; the compiled call still raises if Inductor refuses the mask."""
    from . import fa4

    return torch_has_flash_backend() and fa4.fa4_available()


def block_mask_from_lut(
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    n: int,
    *,
    block_m: int,
    block_n: int,
    key_padding: torch.Tensor | None = None,
):
    """The ``BlockMask`` of a LUT (see :mod:`dit_accel.kernels.reference` for its layout) over ``n`` tokens.

    Selected blocks are full blocks unless a key inside them is masked (key padding, or the padded tail past ``n``),
    then partial; the ``mask_mod`` repeats the whole rule, so eager FlexAttention gives the same answer.
    """
    from torch.nn.attention.flex_attention import BlockMask

    n_kb = math.ceil(n / block_n)
    selected = reference.selected_block_mask(kv_indices, kv_counts, n_kb)  # (B, H, n_qb, n_kb)
    keys_ok = torch.ones(kv_indices.shape[0], n_kb * block_n, dtype=torch.bool, device=kv_indices.device)
    keys_ok[:, n:] = False
    if key_padding is not None:
        keys_ok[:, :n] &= key_padding.to(torch.bool)
    block_whole = keys_ok.view(-1, n_kb, block_n).all(-1)  # (B, n_kb): no masked key inside
    full = selected & block_whole[:, None, None, :]
    partial = selected & ~full
    full_idx, full_cnt = reference.lut_from_mask(full)
    part_idx, part_cnt = reference.lut_from_mask(partial)

    def mask_mod(b, h, q_idx, kv_idx):
        return selected[b, h, q_idx // block_m, kv_idx // block_n] & keys_ok[b, kv_idx]

    return BlockMask.from_kv_blocks(
        part_cnt, part_idx, full_cnt, full_idx, BLOCK_SIZE=(block_m, block_n), mask_mod=mask_mod, seq_lengths=(n, n)
    )


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
    kernel_options: dict[str, Any] | None = None,
):
    """Block-sparse attention through FlexAttention (same contract as the reference); ``kernel_options`` go to
    ``flex_attention`` (``{"BACKEND": "FLASH"}``: :mod:`dit_accel.kernels.flex_flash`)."""
    if reference.needs_reference(return_mass, key_groups, query_groups, rho, residual):
        return reference.block_sparse_attention(
            q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n, scale=scale, return_lse=return_lse,
            return_mass=return_mass, key_padding=key_padding, key_groups=key_groups, query_groups=query_groups,
            rho=rho, residual=residual, rho_add=rho_add, rho_clamp=rho_clamp,
        )  # fmt: skip
    reference._check_block_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n)
    b, _, n, d = q.shape
    key_padding = reference.check_key_padding(key_padding, b, n, q.device)
    mask = block_mask_from_lut(kv_indices, kv_counts, n, block_m=block_m, block_n=block_n, key_padding=key_padding)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    extra = {} if kernel_options is None else {"kernel_options": dict(kernel_options)}
    out, lse = _compiled_flex(q.device)(q, k, v, block_mask=mask, scale=scale, return_lse=True, **extra)
    out, lse = reference.empty_rows_as_reference(out, lse)
    return (out, lse) if return_lse else out


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
    """``(o_sparse, lse_sparse, o_full, lse_full)``: FlexAttention for the sparse half, the dense half with its LSE
    from the fused CPU kernel or the reference."""
    from . import cpu

    o_sparse, lse_sparse = block_sparse_attention(
        q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n, scale=scale, key_padding=key_padding,
        key_groups=key_groups, query_groups=query_groups,
    )  # fmt: skip
    o_full, lse_full = cpu.dense_attention(q, k, v, scale=scale, key_padding=key_padding)
    return o_sparse, lse_sparse, o_full, lse_full
