"""What a method sees at an attention site, and the interface every method implements."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import AccelConfig
from ..layout import TokenLayout
from ..site_state import BlockPattern, BranchState, Statistics
from ..state import DenoiseState

__all__ = ["BlockPattern", "BranchState", "Method", "SiteCall", "SparseResult", "Statistics"]


@dataclass
class SparseResult:
    """A method's output plus what stats should record about the call."""

    out: torch.Tensor
    density: torch.Tensor | float  # achieved block density over all query blocks
    video_density: torch.Tensor | float | None = None  # over query blocks holding no text
    kind: str = "sparse"  # "sparse", or "refresh" when the method computed full attention for statistics
    pattern_built: bool | None = None  # True: pattern (LUT) rebuilt for this call; False: reused from the cache
    adaptive: bool = False  # the refresh was triggered by drift, not by the schedule
    #: work besides the kept blocks, in dense calls: building the pattern, SLA's linear branch (FLOP estimates)
    extra_work: float = 0.0


@dataclass
class SiteCall:
    """One self-attention call: inputs in the kernel layout (B, H, N, D) and the context around it."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float | None
    config: AccelConfig
    state: DenoiseState
    layout: TokenLayout | None
    site_index: int
    site_name: str
    cache: BranchState = field(default_factory=BranchState)  # per site and CFG branch, reset per generation
    # SDPA's boolean key-padding mask as bool (B, N), True = attend, native token order (None: no mask); see
    # dit_accel.kernels.key_padding_from_mask
    key_padding: torch.Tensor | None = None


class Method:
    """A sparse attention method. ``dense_reason`` may send a call to the dense path before ``attend``."""

    name = "base"

    def __init__(self, config: AccelConfig) -> None:
        self.config = config

    def dense_reason(self, call: SiteCall) -> str | None:
        """Why this call should stay dense (a name from ``dit_accel.core.DENSE_REASONS``), or None."""
        return None

    def attend(self, call: SiteCall) -> SparseResult:
        raise NotImplementedError

    def forward_order(
        self, layout: TokenLayout, n: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(perm, inv)``: the token order every site of a forward with this layout works in, when the same for
        all of them (``tile_permutation="per_forward"`` then runs the whole forward in it); None otherwise."""
        return None
