"""Quality evaluation: metrics against the dense video, the attention probe, ``evaluate()``, sweeps and reports.

from dit_accel.eval import evaluate
records = evaluate(pipe, ["blocktopk", {"method": "blocktopk", "sparsity": 0.9}], seeds=[0, 1])
"""

from .evaluate import BaselineCache, RunOutput, config_key, evaluate, run_once
from .metrics import (
    compare_videos,
    latent_relative_error,
    lpips_unavailable_reason,
    psnr,
    relative_error,
    ssim,
    temporal_flicker,
)
from .probe import AttentionProbe, ProbeEntry
from .report import write_report
from .sweep import SweepSpec, build_grid, run_sweep

__all__ = [
    "AttentionProbe",
    "BaselineCache",
    "ProbeEntry",
    "RunOutput",
    "SweepSpec",
    "build_grid",
    "compare_videos",
    "config_key",
    "evaluate",
    "latent_relative_error",
    "lpips_unavailable_reason",
    "psnr",
    "relative_error",
    "run_once",
    "run_sweep",
    "ssim",
    "temporal_flicker",
    "write_report",
]
