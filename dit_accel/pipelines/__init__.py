"""Integrations: diffusers model-family adapters (and, later, pipelines and the ComfyUI node)."""

from .families import FAMILIES, Family, find_family

__all__ = ["FAMILIES", "Family", "find_family"]
