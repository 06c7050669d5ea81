"""The whole schedule of a site: which calls stay dense, when a sparse site refreshes, when it rebuilds its pattern.

Every integration (diffusers hooks, FreeSwim, the ComfyUI node) asks these functions through
:class:`dit_accel.core.SiteCore`, so the three agree by construction.

* Dense: calls outside a transformer forward, sequences under ``min_tokens``, the layers in ``dense_layers`` and
  the first ``dense_steps`` steps (:func:`dense_reason`).
* Refresh (full attention, statistics recollected), per site and CFG branch: at the first sparse call of a
  generation when the compensation needs statistics (reshape, or the ``mass`` weighting of the linear branch when
  refreshes are scheduled), then every ``refresh_every`` steps, whenever the call's shape differs from the one the
  statistics were measured on, and adaptively when the sparse branch's LSE drifted more than ``refresh_drift``
  nats (mean absolute) since the last refresh. The drift is measured on the device at every sparse call and read
  once per transformer forward (:func:`resolve_drift`), so the refresh it asks for runs at the site's next call.
* Pattern: rebuilt every ``reuse_pattern_every`` steps; static (geometric) patterns once per generation; a pattern
  that statistics belong to (rho, R, alpha) only together with a refresh (:func:`plan_call`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .config import AccelConfig
from .parallel import head_sum_count
from .site_state import BlockPattern, BranchState, Shape
from .state import DenoiseState

__all__ = [
    "all_steps_dense",
    "dense_reason",
    "lse_drift",
    "needs_refresh",
    "needs_statistics",
    "pattern_is_stale",
    "plan_call",
    "resolve_drift",
]


def dense_reason(config: AccelConfig, site_index: int, tokens: int, state: DenoiseState) -> str | None:
    """The schedule's reason to keep this call dense, or None (see ``dit_accel.core.DENSE_REASONS``)."""
    if not state.active:
        return "outside_forward"
    if tokens < config.min_tokens:
        return "min_tokens"
    if site_index in config.dense_layers:
        return "dense_layer"
    if state.step < config.dense_step_count(state.num_steps):
        return "dense_step"
    return None


def all_steps_dense(config: AccelConfig, num_steps: int | None) -> str | None:
    """Why no step of a ``num_steps``-step generation can run sparse, or None: an int ``dense_steps`` that
    covers every step (a count chosen for 50 steps, run at 4-8 steps as distilled LoRAs do)."""
    count = config.dense_steps
    if num_steps is None or isinstance(count, float) or count < num_steps or num_steps < 1:
        return None
    return (
        f"dit_accel: dense_steps={count!r} keeps all {num_steps} steps of this generation dense, so nothing runs "
        "sparse; pass a fraction (dense_steps=0.1 keeps at least one step dense and at least one sparse) or a "
        "smaller count"
    )


def needs_statistics(config: AccelConfig) -> bool:
    """Whether the compensation uses statistics of a full-attention pass (rho, R or alpha)."""
    if config.compensation.kind == "reshape":
        return True
    return config.compensation.kind == "linear" and config.linear_weight == "mass" and config.refresh_every > 0


def needs_refresh(config: AccelConfig, branch: BranchState, step: int, shape: Shape) -> bool:
    """Whether this call must run a full-attention refresh before (or instead of) sparse attention.

    ``shape`` is the (tokens, batch, heads) of this call: statistics computed for another shape belong to other
    tokens, so a change forces a refresh.
    """
    last = branch.refresh_step
    if last is None:
        return needs_statistics(config) or config.refresh_every > 0
    if step < last or branch.drift_exceeded:  # the step went back (stale), or the drift check asked for it
        return True
    if needs_statistics(config) and (branch.statistics is None or branch.statistics.shape != shape):
        return True
    return config.refresh_every > 0 and step - last >= config.refresh_every


def pattern_is_stale(config: AccelConfig, pattern: BlockPattern | None, step: int, refresh: bool, shape: Shape) -> bool:
    """Whether the cached pattern must be rebuilt for this call."""
    if pattern is None or pattern.shape != shape or step < pattern.step:
        return True
    if pattern.static:
        return False
    if needs_statistics(config):
        return refresh
    return refresh or step - pattern.step >= config.reuse_pattern_every


def plan_call(config: AccelConfig, branch: BranchState, step: int, shape: Shape) -> tuple[bool, bool]:
    """``(refresh, rebuild)`` for this call. Statistics belong to the pattern they were measured with, so a
    rebuilt pattern always comes with a refresh when the compensation uses statistics."""
    refresh = needs_refresh(config, branch, step, shape)
    rebuild = pattern_is_stale(config, branch.pattern, step, refresh, shape)
    if rebuild and needs_statistics(config):
        refresh = True
    return refresh, rebuild


def lse_drift(lse: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` of the absolute LSE change over rows finite in both, on the device (no host sync).

    Summed over every rank's heads under Ulysses context parallelism, so all ranks decide alike.
    """
    ok = torch.isfinite(lse) & torch.isfinite(reference)
    diff = torch.where(ok, (lse - reference.to(lse.device)).abs(), torch.zeros((), device=lse.device))
    return head_sum_count(diff.double().sum(), ok.sum().double())


def resolve_drift(config: AccelConfig, branches: Iterable[BranchState]) -> int:
    """Read every pending drift measurement with one host sync; mark the branches that drifted past
    ``refresh_drift`` so their next call refreshes. Returns how many were marked."""
    pending = [b for b in branches if b.drift is not None]
    if not pending:
        return 0
    values = torch.stack([b.drift.to(pending[0].drift.device) for b in pending]).tolist()  # the one sync
    marked = 0
    for branch, (total, count) in zip(pending, values):
        branch.drift = None
        if count and total / count > config.refresh_drift:
            branch.drift_exceeded = True
            marked += 1
    return marked
