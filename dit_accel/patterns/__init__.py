"""Block patterns: which key blocks each query block attends to."""

from .common import forced_blocks, self_blocks

__all__ = ["forced_blocks", "self_blocks"]
