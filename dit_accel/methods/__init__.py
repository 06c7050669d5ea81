"""Methods: named presets of pattern x compensation x schedule.

Every preset but ``dense`` runs through :class:`ComposedMethod`; a preset only sets defaults, so any part can be
swapped through ``accelerate(pipe, method, **options)`` (e.g. a VMoBA pattern with Re-ttention compensation).
``PRESET_DOCS`` says what each preset is; docs/methods.md has the measurements behind the choices.
"""

from __future__ import annotations

from ..config import AccelConfig
from ..presets import PRESETS
from .base import Method, SiteCall, SparseResult
from .blocktopk import BlockTopK, DenseMethod
from .composed import CacheBudgetError, ComposedMethod

__all__ = [
    "CacheBudgetError",
    "ComposedMethod",
    "METHOD_CLASSES",
    "Method",
    "PRESET_DOCS",
    "SiteCall",
    "SparseResult",
    "build_method",
]

#: One line per preset saying what it is (kept for callers that read it here; the presets own them).
PRESET_DOCS: dict[str, str] = {name: preset.doc for name, preset in PRESETS.items()}

#: The special methods; every other preset is a composition of parts.
_SPECIAL: dict[str, type[Method]] = {"dense": DenseMethod, "blocktopk": BlockTopK}
METHOD_CLASSES: dict[str, type[Method]] = {name: _SPECIAL.get(name, ComposedMethod) for name in PRESETS}


def build_method(config: AccelConfig) -> Method:
    """The method object for a validated config."""
    return METHOD_CLASSES[config.method](config)
