"""Reading a key-padding mask out of the ``attn_mask`` an attention call hands to SDPA, without a host sync.

HunyuanVideo pads its prompt and passes SDPA a boolean (B, 1, 1, N) mask: every query sees the same keys, the
padded text tokens are off. That is a *key-padding* mask, which the block-sparse kernels can apply themselves
(``key_padding`` (B, N), True = attend). Any other mask (per-query rows, additive float biases, per-head masks)
keeps the call dense.

Deciding "every query row is the same" by comparing rows would read a device value on the host (a sync per
call, and no CUDA-graph capture). So the decision is structural, on shape and strides only:

* a dimension of size 1 broadcasts, so a (B, 1, 1, N) (or (1, N), (N,), (B, 1, 1, N) expanded) mask has one row
  by construction;
* a query (or head) dimension larger than 1 is accepted only with stride 0: a view made by ``expand()``, whose
  rows are one row in memory. A materialised (B, 1, N, N) mask whose rows happen to be equal is *not* recognised
  (it stays dense), since proving the equality would need the values.
"""

from __future__ import annotations

import torch

__all__ = ["key_padding_from_mask"]


def key_padding_from_mask(mask: torch.Tensor, *, batch: int, heads: int, n_q: int, n_k: int) -> torch.Tensor | None:
    """The key padding (bool (batch, n_k), True = attend) that SDPA's ``attn_mask`` amounts to, or None.

    None means the mask is not provably a boolean key-padding mask (a float mask, rows that may differ, a
    per-head mask, or a shape SDPA would not broadcast to (batch, heads, n_q, n_k)): the caller stays dense.
    Reads shapes and strides only, never values, so it never synchronises with the device.
    """
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a tensor (SDPA's attn_mask); got {type(mask).__name__}")
    if mask.dtype != torch.bool or mask.dim() == 0 or mask.dim() > 4:
        return None
    while mask.dim() < 4:  # SDPA broadcasts from the right, like NumPy
        mask = mask.unsqueeze(0)
    target = (batch, heads, n_q, n_k)
    for size, want in zip(mask.shape, target):
        if size not in (1, want):
            return None
    if mask.shape[3] != n_k:
        return None  # one value for all keys (size 1): a per-row mask, not key padding
    for dim in (1, 2):  # heads and query rows must be one row in memory
        if mask.shape[dim] > 1 and mask.stride(dim) != 0:
            return None
    return mask[:, 0, 0, :].expand(batch, n_k).contiguous()
