"""Methods: named presets of pattern x compensation x schedule.

Every preset but ``dense`` runs through :class:`ComposedMethod`; a preset only sets defaults, so any part can be
swapped through ``accelerate(pipe, method, **options)`` (e.g. a VMoBA pattern with Re-ttention compensation).
``PRESET_DOCS`` says what each preset is; docs/methods.md has the measurements behind the choices.
"""

from __future__ import annotations

from ..config import AccelConfig, register_preset
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

#: Published training-free defaults, reproduced as exactly as a block-sparse framework allows.
PAPER_PRESETS: dict[str, dict] = {
    # Re-ttention (NeurIPS 2025, CogVideoX script): 1D raster band of 1/32 of a frame's tokens at the same
    # in-frame positions in every frame, first 30 % of steps dense, refresh every 5 steps, lambda 0.04, no clamp.
    "rettention-paper": dict(
        pattern="raster", sparsity=0.96875, raster_fraction=0.03125, compensation="reshape", dense_steps=0.3,
        refresh_every=5, ramp=0.04, rho_clamp=False, block_m=64, block_n=64,
    ),
    # SLA (arXiv 2509.24006): mean-pooled smooth-K top 5 % of 64-token blocks critical, lowest 10 % negligible,
    # the rest by linear attention (softmax phi) through a zero-initialised proj: sparse-only until fine-tuned.
    "sla-paper": dict(
        pattern="topk", sparsity=0.95, smooth_k=True, compensation="linear", linear_weight="proj",
        feature_map="softmax", negligible=0.1, block_m=64, block_n=64,
    ),
    # VMoBA training-free (arXiv 2506.23858, Table 4, 480p): local + top-k over 1D/2D/3D chunks cycling with the
    # layer (7 | 6x4 | 3x6x4 chunks, k = 2 | 6 | 18), first 25 % of steps dense, no compensation.
    "vmoba-paper": dict(
        pattern="vmoba", vmoba_select="topk", vmoba_chunks=((7,), (6, 4), (3, 6, 4)), vmoba_topk=(2, 6, 18),
        sparsity=0.75, dense_steps=0.25, block_m=64, block_n=64,
    ),
}  # fmt: skip

#: Our versions (defaults chosen by scripts/method_error.py, see docs/methods.md).
IMPROVED_PRESETS: dict[str, dict] = {
    # Re-ttention's reshape on a content-adaptive block pattern (pooled top-k, held from refresh to refresh),
    # rho clamped at 1, no ramp, 10 % dense steps instead of 30 %, refresh every 5 steps.
    "rettention": dict(
        pattern="topk", sparsity=0.9, compensation="reshape", dense_steps=0.1, refresh_every=5, ramp=0.0,
        rho_clamp=True,
    ),
    # SLA training-free: pooled top-k on 3D tiles; the linear branch weighted by the missing mass 1 - alpha,
    # alpha estimated per row from block moments (no refresh: cost stays close to the density). With
    # refresh_every=5, alpha is measured at full refreshes instead (SLA2's alpha, Re-ttention's rho).
    "sla": dict(
        pattern="topk", tiled=True, sparsity=0.9, compensation="linear", linear_weight="mass", negligible=0.0,
        refresh_every=0, dense_steps=0.1,
    ),
    # VMoBA's 1D/2D/3D chunks cycling with the layer (local + top-k), compensated by Re-ttention's reshape.
    "vmoba": dict(
        pattern="vmoba", vmoba_select="topk", vmoba_topk=None, sparsity=0.85, compensation="reshape",
        refresh_every=5, ramp=0.0, rho_clamp=True, dense_steps=0.1,
    ),
    # FreeSwim's inward window, block-dense on 3D tiles (every query keeps a window of constant size).
    "window": dict(pattern="inward", sparsity=0.85, compensation="none"),
}  # fmt: skip

PRESET_DOCS: dict[str, str] = {
    "dense": "full attention through the plugin (every call dense, reason 'method'): the A/B reference",
    "blocktopk": "pooled smooth-K top-k per query block, no compensation, every step sparse",
    "rettention-paper": "Re-ttention as published: raster band 1/32, reshape (rho, R), 30% dense, refresh/5, "
    "lambda 0.04",
    "sla-paper": "SLA as published: top 5% critical, 10% negligible, linear branch through zero-init proj",
    "vmoba-paper": "VMoBA training-free: 1D/2D/3D chunks, local + top-k (2|6|18 of 7|24|72), 25% dense",
    "rettention": "ours: Re-ttention reshape on pooled top-k blocks, rho clamped, 10% dense, refresh/5",
    "sla": "ours: tiled top-k + linear branch weighted by 1 - alpha (alpha estimated from block moments), 10% dense",
    "vmoba": "ours: VMoBA chunks (local + top-k) with Re-ttention's reshape, 10% dense, refresh/5",
    "window": "ours: FreeSwim inward window on 3D tiles, block-dense, no compensation",
}

for _name, _defaults in {**PAPER_PRESETS, **IMPROVED_PRESETS}.items():
    register_preset(_name, _defaults)

METHOD_CLASSES: dict[str, type[Method]] = {"dense": DenseMethod, "blocktopk": BlockTopK}
METHOD_CLASSES.update({name: ComposedMethod for name in (*PAPER_PRESETS, *IMPROVED_PRESETS)})


def build_method(config: AccelConfig) -> Method:
    """The method object for a validated config."""
    return METHOD_CLASSES[config.method](config)
