"""Plain mean-pooled block top-k: each query block keeps its highest-scoring key blocks, no compensation."""

from __future__ import annotations

from .base import Method, SiteCall
from .composed import ComposedMethod

__all__ = ["BlockTopK", "DenseMethod"]


class DenseMethod(Method):
    """Full attention through dit_accel's machinery: every call is dense (reason ``method``), for A/B runs."""

    name = "dense"

    def dense_reason(self, call: SiteCall) -> str | None:
        return "method"


class BlockTopK(ComposedMethod):
    """Mean-pooled block top-k with smooth-K, per head; self, text and sink blocks always kept.

    The composed method with its default parts (pattern ``topk``, compensation ``none``), so every other part
    can still be mixed in through options.
    """

    name = "blocktopk"
