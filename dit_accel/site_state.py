"""The typed state one attention site keeps per CFG branch: its block pattern and the statistics tied to it.

Kept by :class:`dit_accel.core.SiteCore`, read and written by the methods, consulted by the schedule; reset
when a generation starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

__all__ = ["BlockPattern", "BranchState", "Shape", "Statistics"]

Shape = tuple[int, int, int]  # (tokens, batch, heads) of the call a pattern or statistics were made for


def _tensor_bytes(obj: Any) -> int:
    total = 0
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


@dataclass
class BlockPattern:
    """A site's cached block pattern: the LUT the kernels read and what the compensation needs about it."""

    kv_indices: torch.Tensor  # (B|1, H|1, n_q, width) key blocks per query block, in kernel order
    kv_counts: torch.Tensor  # (B|1, H|1, n_q) valid entries of each row
    density: torch.Tensor  # kept fraction of all (query block, key block) pairs
    video_density: torch.Tensor | None  # the same over query blocks holding no text; None without text rows
    step: int  # the step it was built at
    shape: Shape  # the call shape it was built for
    static: bool = False  # geometry only: valid for the whole generation
    negligible: torch.Tensor | None = None  # SLA's skipped blocks (bool like the mask)
    outside: torch.Tensor | None = None  # blocks outside the pattern (the mass-weighted linear branch)
    key_groups: torch.Tensor | None = None  # token-gated VMoBA: the chunk of each key (shared with the plan)
    query_groups: torch.Tensor | None = None  # token-gated VMoBA: int64 bit words of the chunks each query sees
    #: what kernels derive from this pattern once (SLA's helper LUTs), kept as long as the pattern
    kernel_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def nbytes(self) -> int:
        derived = self.kernel_cache.get("luts", ())
        return _tensor_bytes(self) + sum(t.numel() * t.element_size() for t in derived)


@dataclass
class Statistics:
    """What a full-attention refresh measured. Valid only with the pattern and the shape it was computed for."""

    pattern: BlockPattern
    shape: Shape
    step: int
    rho: torch.Tensor | None = None  # Re-ttention's kept mass ratio per row
    residual: torch.Tensor | None = None  # Re-ttention's residual (full - sparse, mass-scaled)
    value_mean: torch.Tensor | None = None  # float32 (B, H, D) mean value at the refresh (residual_update="mean")
    alpha: torch.Tensor | None = None  # kept softmax mass for the mass-weighted linear branch
    lse_ref: torch.Tensor | None = None  # the sparse LSE at the refresh (adaptive refresh's reference)
    sparse_uses: int = 0  # sparse calls since the refresh (Re-ttention's ramp)

    def nbytes(self) -> int:
        return _tensor_bytes(self)


@dataclass
class BranchState:
    """Everything one site keeps for one CFG branch within one generation (reset when a generation starts)."""

    pattern: BlockPattern | None = None
    statistics: Statistics | None = None
    refresh_step: int | None = None  # last full-attention refresh (with or without statistics)
    drift: torch.Tensor | None = None  # the last sparse call's LSE drift, checked once per forward (no sync here)
    drift_exceeded: bool = False  # set by that check: the next call refreshes

    def nbytes(self) -> int:
        total = self.pattern.nbytes() if self.pattern is not None else 0
        return total + (self.statistics.nbytes() if self.statistics is not None else 0)
