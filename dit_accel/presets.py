"""The named methods: each a :class:`Preset` of the three typed parts (pattern x compensation x schedule).

A preset only supplies defaults: ``accelerate(pipe, "rettention", sparsity=0.95)`` or
``AccelConfig(method="vmoba", compensation="none")`` override any part or field of it. docs/methods.md has the
measurements behind the choices. The presets are built here once; nothing adds to or edits them at import time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .parts import CompensationConfig, PatternConfig, ScheduleConfig

__all__ = ["DEFAULT_METHOD", "METHODS", "PRESETS", "Preset"]


@dataclass(frozen=True)
class Preset:
    """A named method: its three parts and one line saying what it is.

    Attributes:
        name: the method name (``accelerate(pipe, name)``).
        doc: one line: what the preset is and where its values come from.
        pattern / compensation / schedule: the parts; any field left at its default is the part's default.
        family_schedules: model family name (``dit_accel.pipelines.families``) -> the schedule used on that
            family instead of ``schedule`` (a paper's schedule is set per model); schedule fields you pass still
            win.
    """

    name: str
    doc: str
    pattern: PatternConfig = field(default_factory=PatternConfig)
    compensation: CompensationConfig = field(default_factory=CompensationConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    family_schedules: Mapping[str, ScheduleConfig] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "family_schedules", MappingProxyType(dict(self.family_schedules)))

    def parts(self) -> dict[str, PatternConfig | CompensationConfig | ScheduleConfig]:
        return {"pattern": self.pattern, "compensation": self.compensation, "schedule": self.schedule}

    def flat(self) -> dict[str, Any]:
        """Every option of the preset by its flat name (``pattern`` and ``compensation`` give the kind)."""
        out: dict[str, Any] = {}
        for part_name, part in self.parts().items():
            for key, value in vars(part).items():
                out[part_name if key == "kind" else key] = value
        return out


_PRESETS = (
    Preset(
        "dense",
        "full attention through the plugin (every call dense, reason 'method'): the A/B reference",
        PatternConfig(sparsity=0.0),
    ),
    Preset(
        "blocktopk",
        "pooled smooth-K top-k per query block, no compensation, every step sparse",
        PatternConfig(kind="topk", sparsity=0.75),
    ),
    # -- published training-free defaults, reproduced as exactly as a block-sparse framework allows ---------------
    # Re-ttention (NeurIPS 2025; cccrrrccc/Re-ttention): 1D raster band of 1/32 of a frame's tokens at the same
    # in-frame positions in every frame, lambda 0.04, no clamp; the schedule is the official one of each model
    # (module/Cog_processor.py: steps 0-14 dense, refresh when step % 5 == 0; module/pixart_processor.py: steps 0-4
    # dense, refresh at 5, 10, 15), and on other families CogVideoX's 15 of 50 steps as a fraction.
    Preset(
        "rettention-paper",
        "Re-ttention as published: raster band 1/32, reshape (rho, R), lambda 0.04, the official schedule per model",
        PatternConfig(kind="raster", sparsity=0.96875, raster_fraction=0.03125, block_m=64, block_n=64),
        CompensationConfig(kind="reshape", ramp=0.04, rho_clamp=False),
        ScheduleConfig(dense_steps=0.3, refresh_every=5),
        family_schedules={
            "cogvideox": ScheduleConfig(dense_steps=15, refresh_every=5),
            "pixart": ScheduleConfig(dense_steps=5, refresh_every=5),
        },
    ),
    # SLA as its official code selects (thu-ml/SLA, branch SLA-1, sparse_linear_attention/utils.py get_block_map):
    # mean-centred keys, 64-token mean pooling, the top int(topk * K) key blocks of each query block (truncated,
    # no forced diagonal block), every other block through the linear branch (softmax phi) and a zero-initialised
    # proj: sparse-only until fine-tuned. The paper's "negligible" class is in neither official branch.
    Preset(
        "sla-paper",
        "SLA as its official code: top int(5% K) blocks (no forced diagonal), the rest linear, zero-init proj",
        PatternConfig(
            kind="topk",
            sparsity=0.95,
            smooth_k=True,
            self_block=False,
            keep_rounding="floor",
            block_m=64,
            block_n=64,
        ),  # fmt: skip
        CompensationConfig(kind="linear", linear_weight="proj", feature_map="softmax", negligible=0.0),
    ),
    # VMoBA training-free (arXiv 2506.23858, Table 4, 480p): local + top-k over 1D/2D/3D chunks cycling with the
    # layer (7 | 6x4 | 3x6x4 chunks, k = 2 | 6 | 18), first 25 % of steps dense, no compensation; selection as the
    # official code (KwaiVGI/VMoBA 4da72ff, src/vmoba.py): every query token gated against each chunk's mean key,
    # dense when only the own chunks are chosen (tests/methods/test_paper_vmoba.py re-implements it).
    Preset(
        "vmoba-paper",
        "VMoBA training-free: 1D/2D/3D chunks, per-token local + top-k (2|6|18 of 7|24|72), 25% dense",
        PatternConfig(
            kind="vmoba",
            sparsity=0.75,
            vmoba_select="topk",
            vmoba_gate="token",
            vmoba_chunks=((7,), (6, 4), (3, 6, 4)),
            vmoba_topk=(2, 6, 18),
            block_m=64,
            block_n=64,
        ),  # fmt: skip
        CompensationConfig(kind="none"),
        ScheduleConfig(dense_steps=0.25),
    ),
    # -- ours (defaults chosen by scripts/method_error.py, see docs/methods.md) -----------------------------------
    # Re-ttention's reshape on a content-adaptive block pattern (pooled top-k, held from refresh to refresh),
    # rho clamped at 1, no ramp, the residual moved with the mean value between refreshes, 10 % dense steps
    # instead of 30 %, refresh every 5 steps.
    Preset(
        "rettention",
        "ours: Re-ttention reshape on pooled top-k blocks, rho clamped, 10% dense, refresh/5",
        PatternConfig(kind="topk", sparsity=0.9),
        CompensationConfig(kind="reshape", ramp=0.0, rho_clamp=True, residual_update="mean"),
        ScheduleConfig(dense_steps=0.1, refresh_every=5),
    ),
    # SLA training-free: pooled top-k on 3D tiles; the linear branch weighted by the missing mass 1 - alpha,
    # alpha estimated per row from block moments (no refresh: cost stays close to the density). With
    # refresh_every=5, alpha is measured at full refreshes instead (SLA2's alpha, Re-ttention's rho).
    Preset(
        "sla",
        "ours: tiled top-k + linear branch weighted by 1 - alpha (alpha estimated from block moments), 10% dense",
        PatternConfig(kind="topk", tiled=True, sparsity=0.9),
        CompensationConfig(kind="linear", linear_weight="mass", negligible=0.0),
        ScheduleConfig(dense_steps=0.1, refresh_every=0),
    ),
    # VMoBA's 1D/2D/3D chunks cycling with the layer (local + top-k per query block), compensated by
    # Re-ttention's reshape.
    Preset(
        "vmoba",
        "ours: VMoBA chunks (block-gated local + top-k) with Re-ttention's reshape, 10% dense, refresh/5",
        PatternConfig(kind="vmoba", sparsity=0.85, vmoba_select="topk", vmoba_gate="block", vmoba_topk=None),
        CompensationConfig(kind="reshape", ramp=0.0, rho_clamp=True, residual_update="mean"),
        ScheduleConfig(dense_steps=0.1, refresh_every=5),
    ),
    # FreeSwim's inward window, block-dense on 3D tiles (every query keeps a window of constant size).
    Preset(
        "window",
        "ours: FreeSwim inward window on 3D tiles, block-dense, no compensation",
        PatternConfig(kind="inward", sparsity=0.85),
        CompensationConfig(kind="none"),
    ),
)

#: name -> :class:`Preset`, read-only.
PRESETS: MappingProxyType[str, Preset] = MappingProxyType({p.name: p for p in _PRESETS})
#: the method names, in the order UIs list them.
METHODS: tuple[str, ...] = tuple(PRESETS)
DEFAULT_METHOD = "rettention"  # chosen by scripts/method_error.py; evidence in docs/methods.md
