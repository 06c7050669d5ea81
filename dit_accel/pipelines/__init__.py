"""Integrations: diffusers model-family adapters (and, later, pipelines and the ComfyUI node)."""

from .families import FAMILIES, Family, find_family

__all__ = ["FAMILIES", "Family", "find_family"]

# FreeSwim (issue 7): imported lazily, so ``import dit_accel`` does not load diffusers' Wan pipelines.
_FREESWIM = ("FreeSwimHooks", "FreeSwimOptions", "FreeSwimPipeline", "FreeSwimStats", "maybe_freeswim")
__all__ += list(_FREESWIM)


def __getattr__(name: str):
    if name in _FREESWIM:
        from . import freeswim

        return getattr(freeswim, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
