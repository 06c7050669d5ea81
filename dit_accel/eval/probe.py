"""Attention probe: how far each site's attention output is from dense attention on the same inputs.

It registers an observer on every accelerator behind an :class:`~dit_accel.AccelHandle`, so it sees exactly the
q, k, v and output of each call (after RoPE and QK-norm, as the method saw them) without changing any decision.
It also sums the time spent in attention calls, which the evaluator needs for the attention share.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..core import SiteEvent, key_padding_of
from ..kernels import dense_attention
from .metrics import relative_error

__all__ = ["AttentionProbe", "ProbeEntry"]


def dense_reference(event: SiteEvent) -> torch.Tensor:
    """Dense attention in float32 on the call's inputs, under the call's own mask: a padded prompt's keys stay
    unseen, so a call that was exact scores 0 whichever path it took."""
    q, k, v = event.q.float(), event.k.float(), event.v.float()
    mask = event.attn_mask
    key_padding = None if mask is None else key_padding_of(q, k, mask)
    if (mask is None or key_padding is not None) and not event.is_causal:
        return dense_attention(q, k, v, scale=event.scale, key_padding=key_padding)[0]
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.float()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=event.is_causal, scale=event.scale)


@dataclass
class ProbeEntry:
    """One probed call: where it ran, what the site did, and its error against dense attention."""

    step: int
    layer: int
    site: str
    branch: str
    kind: str
    reason: str | None
    density: float | None
    rel_error: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class AttentionProbe:
    """Observe the attention sites of a handle; use as a context manager around a pipeline call.

    Args:
        handle: what :func:`dit_accel.accelerate` returned.
        steps: step indices to probe (negative counts from the end, ``-1`` = last step); None = every step;
            an empty tuple probes nothing and only times attention.
        layers: site indices to probe; None = every site.
    """

    handle: Any
    steps: Iterable[int] | None = None
    layers: Iterable[int] | None = None
    entries: list[ProbeEntry] = field(default_factory=list)
    calls: int = 0
    probe_seconds: float = 0.0
    _timers: list[tuple[Any, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.steps = None if self.steps is None else tuple(int(s) for s in self.steps)
        self.layers = None if self.layers is None else {int(i) for i in self.layers}

    def __enter__(self) -> AttentionProbe:
        for acc in self._accelerators():
            acc.observers.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        for acc in self._accelerators():
            if self in acc.observers:
                acc.observers.remove(self)

    def _accelerators(self) -> list[Any]:
        return list(getattr(self.handle, "accelerators", {}).values())

    def _wants(self, event: SiteEvent) -> bool:
        if self.layers is not None and event.site_index not in self.layers:
            return False
        if self.steps is None:
            return True
        for step in self.steps:
            if step < 0 and event.num_steps is not None:
                step = event.num_steps + step
            if step == event.step:
                return True
        return False

    def __call__(self, event: SiteEvent) -> None:
        self.calls += 1
        self._timers.append(event.timers)
        if not self._wants(event):
            return
        start = time.perf_counter()
        with torch.no_grad():
            error = relative_error(event.out.float(), dense_reference(event))
        density = None if event.density is None else float(event.density)
        self.entries.append(
            ProbeEntry(
                step=event.step,
                layer=event.site_index,
                site=event.site_name,
                branch=event.branch,
                kind=event.kind,
                reason=event.reason,
                density=density,
                rel_error=error,
            )
        )
        self.probe_seconds += time.perf_counter() - start  # includes the host sync of the error

    def attention_seconds(self) -> float:
        """Total time inside attention calls (synchronises CUDA once, at the end)."""
        total = 0.0
        for start, end in self._timers:
            if isinstance(start, float):
                total += end - start
            else:
                end.synchronize()
                total += start.elapsed_time(end) / 1000.0
        return total

    def summary(self) -> dict[str, Any]:
        """Mean/max error over probed sparse calls, and a per-(step, layer) table averaged over branches."""
        sparse = [e for e in self.entries if e.kind != "dense"]
        table: dict[tuple[int, int], list[ProbeEntry]] = defaultdict(list)
        for entry in self.entries:
            table[(entry.step, entry.layer)].append(entry)
        rows = []
        for (step, layer), group in sorted(table.items()):
            densities = [e.density for e in group if e.density is not None]
            rows.append(
                {
                    "step": step,
                    "layer": layer,
                    "kind": "/".join(sorted({e.kind for e in group})),
                    "rel_error": sum(e.rel_error for e in group) / len(group),
                    "density": sum(densities) / len(densities) if densities else None,
                }
            )
        return {
            "probed_calls": len(self.entries),
            "sparse_probed_calls": len(sparse),
            "attn_rel_error": sum(e.rel_error for e in sparse) / len(sparse) if sparse else None,
            "attn_rel_error_max": max((e.rel_error for e in sparse), default=None),
            "per_step_layer": rows,
        }
