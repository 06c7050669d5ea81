"""Compensation: what replaces the probability mass of the skipped key blocks."""

from .linear import SLAProjections, combine_linear, load_sla_weights, remove_lora, save_sla_weights
from .reshape import reshape_output, reshape_statistics

__all__ = [
    "SLAProjections",
    "combine_linear",
    "load_sla_weights",
    "reshape_output",
    "remove_lora",
    "reshape_statistics",
    "save_sla_weights",
]
