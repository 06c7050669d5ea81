"""When a sparse site refreshes (full attention, statistics recollected) and when it rebuilds its pattern.

The runtime already keeps ``dense_steps`` and ``dense_layers`` dense. After that, per site and CFG branch:

* refresh at the first sparse call of a generation when the compensation needs statistics (reshape, or the
  ``mass`` weighting of the linear branch when refreshes are scheduled), then every ``refresh_every`` steps,
  and adaptively when the sparse branch's LSE drifted more than ``refresh_drift`` nats (mean absolute) since;
* rebuild the pattern every ``reuse_pattern_every`` steps; static (geometric) patterns are built once per
  generation; patterns that statistics belong to (rho, R, alpha) change only at refresh steps.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import AccelConfig
from .parallel import head_mean

__all__ = ["lse_drift", "needs_refresh", "needs_statistics", "pattern_is_stale"]


def needs_statistics(config: AccelConfig) -> bool:
    """Whether the compensation uses statistics of a full-attention pass (rho, R or alpha)."""
    if config.compensation == "reshape":
        return True
    return config.compensation == "linear" and config.linear_weight == "mass" and config.refresh_every > 0


def needs_refresh(config: AccelConfig, cache: dict[str, Any], step: int, shape: Any = None) -> bool:
    """Whether this call must run a full-attention refresh before (or instead of) sparse attention.

    ``shape`` is the (tokens, batch, heads) key of this call: statistics (rho, R, alpha) computed for another
    shape belong to other tokens, so a change forces a refresh.
    """
    last = cache.get("refresh_step")
    if last is None:
        return needs_statistics(config) or config.refresh_every > 0
    if step < last:  # the step counter went back: stale statistics
        return True
    if needs_statistics(config) and cache.get("refresh_shape") != shape:
        return True
    return config.refresh_every > 0 and step - last >= config.refresh_every


def pattern_is_stale(config: AccelConfig, cache: dict[str, Any], step: int, refresh: bool, n: Any) -> bool:
    """Whether the cached pattern must be rebuilt for this call (``n``: the shape key it was built for)."""
    built = cache.get("pattern_step")
    if built is None or cache.get("pattern_n") != n or step < built:
        return True
    if cache.get("pattern_static"):
        return False
    if needs_statistics(config):
        return refresh
    return refresh or step - built >= config.reuse_pattern_every


def lse_drift(lse: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean absolute change of the sparse LSE over rows that are finite in both (over all ranks' heads under
    Ulysses context parallelism, so every rank refreshes together)."""
    ok = torch.isfinite(lse) & torch.isfinite(reference)
    return head_mean((lse - reference.to(lse.device)).abs()[ok])
