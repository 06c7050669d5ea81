"""Methods: named presets of pattern x compensation x schedule."""

from __future__ import annotations

from ..config import AccelConfig
from .base import Method, SiteCall, SparseResult
from .blocktopk import BlockTopK, DenseMethod

__all__ = ["Method", "SiteCall", "SparseResult", "build_method", "METHOD_CLASSES"]

METHOD_CLASSES: dict[str, type[Method]] = {"dense": DenseMethod, "blocktopk": BlockTopK}


def build_method(config: AccelConfig) -> Method:
    """The method object for a validated config."""
    return METHOD_CLASSES[config.method](config)
