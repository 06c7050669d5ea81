"""ComfyUI custom node package: "DiT Sparse Attention" (dit_accel sparse self-attention for DiT video models).

Use it as a ComfyUI custom node by linking this folder into ``ComfyUI/custom_nodes/`` (see docs/comfyui.md).
ComfyUI reads ``NODE_CLASS_MAPPINGS`` (V1); loaders that look for ``comfy_entrypoint`` get the same node through
``comfy_api.latest`` (V3) when that API exists. Nothing here imports ``comfy`` until a node runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

try:
    import dit_accel  # noqa: F401
except ImportError:  # linked from a source checkout that is not pip-installed: use the checkout itself
    _root = Path(__file__).resolve().parents[3]
    if (_root / "dit_accel" / "__init__.py").exists():
        sys.path.insert(0, str(_root))

from dit_accel.pipelines.comfyui.node import (  # noqa: E402
    DISPLAY_NAME,
    KEY,
    NODE_ID,
    DiTSparseAttention,
    SparseAttentionPatch,
    apply_sparse_attention,
    v3_extension,
)

NODE_CLASS_MAPPINGS = {NODE_ID: DiTSparseAttention}
NODE_DISPLAY_NAME_MAPPINGS = {NODE_ID: DISPLAY_NAME}


async def comfy_entrypoint() -> Any:
    """V3 registration (``comfy_api.latest``)."""
    extension = v3_extension()
    if extension is None:
        raise ImportError("comfy_api.latest is not available in this ComfyUI; the V1 NODE_CLASS_MAPPINGS apply")
    return extension


__all__ = [
    "KEY",
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
    "DiTSparseAttention",
    "SparseAttentionPatch",
    "apply_sparse_attention",
    "comfy_entrypoint",
]
