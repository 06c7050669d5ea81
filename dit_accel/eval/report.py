"""Sweep report: a markdown table sorted by speed, the best configuration per quality level, and a Pareto plot.

Records of the same configuration (different seeds/prompts) are averaged. The speed axis is the measured
end-to-end speed-up when the Triton kernels ran (GPU); on the CPU reference path measured times say nothing
about kernel speed, so the estimate from achieved density and the dense run's attention share is used and
labelled as such.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .metrics import PSNR_IDENTICAL

__all__ = ["QUALITY_LEVELS", "aggregate", "pareto_front", "speed_basis", "write_report"]

#: PSNR thresholds (dB) of the "best configuration per quality level" table.
QUALITY_LEVELS: tuple[tuple[str, float], ...] = (
    ("near-lossless", 40.0),
    ("high", 35.0),
    ("good", 30.0),
    ("fair", 25.0),
)

_NUMERIC = (
    "speedup",
    "est_speedup",
    "est_speedup_flops",
    "attention_speedup",
    "attention_share",
    "wall_s",
    "attention_s",
    "density",
    "psnr",
    "ssim",
    "lpips",
    "flicker_delta",
    "latent_rel_error",
    "attn_rel_error",
)


def _mean(values: Sequence[Any]) -> float | None:
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    nums = [v for v in nums if math.isfinite(v)]
    return sum(nums) / len(nums) if nums else None


def aggregate(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration: numeric fields averaged over its seeds and prompts."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if "error" in record:
            continue
        groups.setdefault(record["key"], []).append(record)
    rows = []
    for key, group in groups.items():
        first = group[0]
        row: dict[str, Any] = {
            "key": key,
            "method": first["method"],
            "options": first.get("options", {}),
            "paper": bool(first.get("paper")),
            "runs": len(group),
            "seeds": sorted({r["seed"] for r in group}),
            "kernel_backend": first.get("kernel_backend"),
            "lpips_skipped": first.get("lpips_skipped"),
        }
        for name in _NUMERIC:
            row[name] = _mean([r.get(name) for r in group])
        rows.append(row)
    return rows


def speed_basis(rows: Sequence[dict[str, Any]]) -> str:
    """``"speedup"`` (measured) when every row ran the Triton kernels; otherwise the transformer-FLOP estimate
    ``"est_speedup_flops"`` (CPU timings of the reference kernels and Python overhead say little about a GPU)."""
    if rows and all(r.get("kernel_backend") == "triton" and r.get("speedup") is not None for r in rows):
        return "speedup"
    if rows and all(r.get("est_speedup_flops") is not None for r in rows):
        return "est_speedup_flops"
    return "est_speedup"


def pareto_front(rows: Sequence[dict[str, Any]], speed: str, quality: str = "psnr") -> list[dict[str, Any]]:
    """Rows no other row beats on both speed and quality, fastest first."""
    points = [r for r in rows if r.get(speed) is not None and r.get(quality) is not None]
    points.sort(key=lambda r: (-r[speed], -r[quality]))
    front, best = [], -math.inf
    for row in points:
        if row[quality] > best:
            front.append(row)
            best = row[quality]
    return front


def _label(row: dict[str, Any]) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in sorted(row["options"].items()))
    return f"{row['method']}" + (f" ({opts})" if opts else "")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(rows: Sequence[dict[str, Any]], speed: str) -> list[str]:
    head = (
        "| configuration | kind | runs | speed-up | measured | est. (time) | est. (FLOPs) | density | PSNR dB | SSIM "
        "| LPIPS | flicker Δ | latent err | attn err |"
    )
    lines = [head, "|" + "---|" * 14]
    for row in sorted(rows, key=lambda r: -(r.get(speed) or 0.0)):
        lines.append(
            "| "
            + " | ".join(
                [
                    _label(row),
                    "paper" if row["paper"] else ("dense" if row["method"] == "dense" else "ours"),
                    str(row["runs"]),
                    _fmt(row.get(speed), 2),
                    _fmt(row.get("speedup"), 2),
                    _fmt(row.get("est_speedup"), 2),
                    _fmt(row.get("est_speedup_flops"), 2),
                    _fmt(row.get("density")),
                    _fmt(row.get("psnr"), 2),
                    _fmt(row.get("ssim"), 4),
                    _fmt(row.get("lpips"), 4),
                    _fmt(row.get("flicker_delta"), 4),
                    _fmt(row.get("latent_rel_error"), 4),
                    _fmt(row.get("attn_rel_error"), 3),
                ]
            )
            + " |"
        )
    return lines


def _best_per_level(rows: Sequence[dict[str, Any]], speed: str) -> list[str]:
    lines = [
        "| quality level | PSNR ≥ | fastest configuration | speed-up | PSNR dB | SSIM |",
        "|---|---|---|---|---|---|",
    ]
    candidates = [r for r in rows if r["method"] != "dense"]  # the baseline itself is no answer
    for name, threshold in QUALITY_LEVELS:
        ok = [
            r for r in candidates if r.get("psnr") is not None and r["psnr"] >= threshold and r.get(speed) is not None
        ]
        if not ok:
            lines.append(f"| {name} | {threshold:g} | none reached it | - | - | - |")
            continue
        best = max(ok, key=lambda r: (r[speed], r["psnr"]))
        lines.append(
            f"| {name} | {threshold:g} | {_label(best)} | {_fmt(best[speed], 2)} | {_fmt(best['psnr'], 2)} "
            f"| {_fmt(best.get('ssim'), 4)} |"
        )
    return lines


def _plot(rows: Sequence[dict[str, Any]], speed: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=110)
    # Identical-to-dense points (PSNR at the 100 dB cap) would squash the interesting range: draw them on a
    # "= dense" line just above the best finite PSNR.
    finite = [r["psnr"] for r in rows if r.get("psnr") is not None and r["psnr"] < PSNR_IDENTICAL]
    top = (max(finite) + max(3.0, 0.15 * (max(finite) - min(finite)))) if finite else PSNR_IDENTICAL

    def y(row: dict[str, Any]) -> float:
        return top if row["psnr"] >= PSNR_IDENTICAL else row["psnr"]

    groups = (("ours", False, "o", "tab:blue"), ("paper presets", True, "^", "tab:orange"))
    for label, paper, marker, color in groups:
        pts = [r for r in rows if r["paper"] == paper and r.get(speed) is not None and r.get("psnr") is not None]
        if pts:
            ax.scatter([r[speed] for r in pts], [y(r) for r in pts], marker=marker, color=color, label=label, s=40)
            for r in pts:
                ax.annotate(_short(r), (r[speed], y(r)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if finite and top < PSNR_IDENTICAL:
        ax.axhline(top, color="grey", linestyle="--", linewidth=0.8, label="identical to dense")
    front = pareto_front(rows, speed)
    if front:
        ax.plot(
            [r[speed] for r in front],
            [y(r) for r in front],
            drawstyle="steps-post",
            marker="D",
            markerfacecolor="none",
            markersize=9,
            color="tab:green",
            linewidth=1.5,
            label="Pareto frontier",
        )
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1, label="dense (1.0x)")
    axis = {
        "speedup": "measured end-to-end speed-up",
        "est_speedup_flops": "estimated transformer speed-up (density x attention FLOP share)",
    }.get(speed, "estimated speed-up (density x attention time share)")
    ax.set_xlabel(axis)
    ax.set_ylabel("PSNR vs dense (dB, higher is closer)")
    ax.set_title("Quality vs speed")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _short(row: dict[str, Any]) -> str:
    sparsity = row["options"].get("sparsity")
    return row["method"] + (f"@{sparsity:g}" if isinstance(sparsity, (int, float)) else "")


def write_report(
    records: Sequence[dict[str, Any]], out: str | Path, *, spec: dict[str, Any] | None = None
) -> dict[str, str]:
    """Write ``report.md`` and ``pareto.png`` into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records)
    speed = speed_basis(rows)
    errors = [r for r in records if "error" in r]
    lines = ["# dit_accel sweep report", ""]
    if spec:
        size = f"{spec.get('height') or 'default'} x {spec.get('width') or 'default'}"
        lines.append(
            f"Model `{spec.get('model')}`, steps {spec.get('steps') or 'default'}, "
            f"frames {spec.get('frames') or 'default'}, size {size}, seeds {list(spec.get('seeds', []))}."
        )
        lines.append("")
    basis = {
        "speedup": "measured end-to-end wall time (Triton kernels, device-synchronised)",
        "est_speedup_flops": "**estimated** transformer speed-up 1 / ((1 - a) + a * d), a = self-attention's share "
        "of the transformer FLOPs at these shapes, d = achieved density (the CPU reference kernels' timings say "
        "little about GPU kernel speed; `est. (time)` uses the dense run's measured attention time share instead "
        "and includes everything outside the transformer)",
    }.get(
        speed,
        "**estimated**: 1 / ((1 - a) + a * d), a = attention share of the dense run's wall time, d = achieved density",
    )
    lines += [
        f"Speed-up column: {basis}. Quality is measured against the dense video of the same prompt and seed "
        "(PSNR capped at 100 dB for identical output). `attn err` is the attention probe's mean relative error of "
        "sparse attention outputs against dense attention on the same inputs.",
        "",
    ]
    skipped = next((r.get("lpips_skipped") for r in rows if r.get("lpips_skipped")), None)
    if skipped:
        lines += [f"LPIPS: {skipped}.", ""]
    all_dense = [r for r in records if "error" not in r and not r.get("sparse_calls")]
    if records and len(all_dense) == len([r for r in records if "error" not in r]):
        reasons: dict[str, int] = {}
        for r in all_dense:
            for k, v in (r.get("dense_reasons") or {}).items():
                reasons[k] = reasons.get(k, 0) + v
        lines += [f"Warning: no configuration ran any sparse attention call (dense reasons: {reasons}).", ""]
    lines += ["## Configurations (fastest first)", ""] + _table(rows, speed) + [""]
    lines += ["## Best configuration per quality level", ""] + _best_per_level(rows, speed) + [""]
    front = pareto_front(rows, speed)
    lines += ["## Pareto frontier", ""] + [
        f"- {_label(r)}: {_fmt(r[speed], 2)}x, {_fmt(r['psnr'], 2)} dB" for r in front
    ]
    if errors:
        lines += ["", "## Failed runs", ""] + [f"- `{r['key']}` seed {r['seed']}: {r['error']}" for r in errors]
    lines += ["", "![quality vs speed](pareto.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    _plot(rows, speed, out / "pareto.png")
    return {"report": str(out / "report.md"), "pareto": str(out / "pareto.png")}
