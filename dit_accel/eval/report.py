"""Sweep report: a markdown table sorted by speed, the best configuration per quality level, and a Pareto plot.

Records of the same configuration (different seeds/prompts) are averaged. The speed axis is the measured
end-to-end speed-up when the Triton kernels ran (GPU); elsewhere the estimate from achieved density and attention's
FLOP share, labelled as such, with the measured times beside it in their own column, named with the device they
hold for. A contact sheet (dense first, then every configuration) sits beside the report; when no configuration
reaches the lowest quality level, they are ranked by PSNR instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

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
    "attention_work",
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
            "device": first.get("device"),
            "lpips_skipped": first.get("lpips_skipped"),
        }
        for name in _NUMERIC:
            row[name] = _mean([r.get(name) for r in group])
        rows.append(row)
    return rows


def _gpu_kernels(backend: Any) -> bool:
    """Whether a ``stats()["kernel_backend"]`` string names only GPU kernels."""
    if not isinstance(backend, str):
        return False
    names = backend[5:-1].split(",") if backend.startswith("auto(") and backend.endswith(")") else [backend]
    return all(name in ("triton", "flex", "fa4", "flex_flash", "cudnn_bsa") for name in names)


def speed_basis(rows: Sequence[dict[str, Any]]) -> str:
    """``"speedup"`` (measured) when every row ran GPU kernels (Triton or FlexAttention; ``kernel_backend="auto"``
    reports its picks as ``auto(flex,triton)``); otherwise the transformer-FLOP estimate ``"est_speedup_flops"``
    (CPU timings of the reference kernels and Python overhead say little about a GPU)."""
    if rows and all(_gpu_kernels(r.get("kernel_backend")) and r.get("speedup") is not None for r in rows):
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


def _where(rows: Sequence[dict[str, Any]]) -> str:
    """The device and kernels the measured times hold for, e.g. ``cpu, cpu kernels``."""
    devices = sorted({str(r.get("device")) for r in rows if r.get("device")}) or ["unknown device"]
    backends = sorted({str(r.get("kernel_backend")) for r in rows if r.get("kernel_backend")})
    return ", ".join(devices) + (f"; {', '.join(backends)} kernels" if backends else "")


def _table(rows: Sequence[dict[str, Any]], speed: str) -> list[str]:
    where = _where(rows)
    head = (
        f"| configuration | kind | runs | speed-up | measured ({where}) | est. (time) | est. (FLOPs, GPU kernels) "
        "| density | attention work | PSNR dB | SSIM | LPIPS | flicker Δ | latent err | attn err |"
    )
    lines = [head, "|" + "---|" * 15]
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
                    _fmt(row.get("attention_work")),
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
    lowest = QUALITY_LEVELS[-1][1]
    scored = [r for r in candidates if r.get("psnr") is not None]
    if scored and all(r["psnr"] < lowest for r in scored):
        lines += ["", f"No configuration reached {lowest:g} dB; closest to dense first (ties: faster first):", ""]
        lines += ["| rank | configuration | PSNR dB | SSIM | speed-up |", "|---|---|---|---|---|"]
        ranked = sorted(scored, key=lambda r: (-r["psnr"], -(r.get(speed) or 0.0)))
        for i, r in enumerate(ranked, 1):
            lines.append(
                f"| {i} | {_label(r)} | {_fmt(r['psnr'], 2)} | {_fmt(r.get('ssim'), 4)} | {_fmt(r.get(speed), 2)} |"
            )
    return lines


def _plot(rows: Sequence[dict[str, Any]], speed: str, path: Path) -> list[str]:
    """Draw ``pareto.png``; returns the legend's labels (what the reader is told each mark is)."""
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
        pts = [
            r
            for r in rows
            if r["paper"] == paper and r["method"] != "dense" and r.get(speed) is not None and r.get("psnr") is not None
        ]
        if pts:
            ax.scatter([r[speed] for r in pts], [y(r) for r in pts], marker=marker, color=color, label=label, s=40)
            for r in pts:
                ax.annotate(_short(r), (r[speed], y(r)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    # the reference itself: 1.0x, drawn on the top line (its PSNR against itself is infinite)
    ax.scatter([1.0], [top], marker="*", s=160, color="black", zorder=5, label="dense (the reference, 1.0x)")
    identical = [r for r in rows if r["method"] != "dense" and (r.get("psnr") or 0.0) >= PSNR_IDENTICAL]
    if identical and finite:
        ax.axhline(top, color="grey", linestyle="--", linewidth=0.8, label="output identical to dense")
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
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    axis = {
        "speedup": f"measured end-to-end speed-up ({_where(rows)})",
        "est_speedup_flops": "estimated transformer speed-up for GPU kernels (density x attention FLOP share)",
    }.get(speed, "estimated speed-up (density x attention time share)")
    ax.set_xlabel(axis)
    ax.set_ylabel("PSNR vs dense (dB, higher is closer)")
    ax.set_title("Quality vs speed")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return labels


def _contact_sheet(records: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], speed: str, out: Path) -> bool:
    """``contact.png``: the dense strip, then every configuration's (fastest first), for the first prompt and seed
    (first, middle and last frame, as the sweep saved them under ``frames/``). False when no strip exists."""
    from .evaluate import config_key
    from .sweep import FRAMES, strip_name

    ok = [r for r in records if "error" not in r]
    if not ok:
        return False
    prompt, seed = ok[0].get("prompt"), ok[0]["seed"]
    dense_key = config_key({"method": "dense"})
    entries = [("dense (reference)", out / FRAMES / strip_name(dense_key, seed, prompt))]
    by_key = {r["key"]: r for r in ok if r.get("prompt") == prompt and r["seed"] == seed}
    for row in sorted(rows, key=lambda r: -(r.get(speed) or 0.0)):
        record = by_key.get(row["key"])
        if record is None or row["method"] == "dense":
            continue
        psnr = record.get("psnr")
        label = f"{_label(row)}: {_fmt(record.get(speed), 2)}x, {_fmt(psnr, 1)} dB"
        entries.append((label, out / FRAMES / strip_name(record["key"], seed, prompt)))
    entries = [(label, path) for label, path in entries if path.exists()]
    if not entries:
        return False
    import imageio.v3 as iio
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    strips = [iio.imread(path) for _, path in entries]
    aspect = strips[0].shape[1] / strips[0].shape[0]
    fig, axes = plt.subplots(len(strips), 1, figsize=(min(12.0, 2.2 * aspect), 2.4 * len(strips)), dpi=90)
    for ax, (label, _), strip in zip(np.atleast_1d(axes), entries, strips):
        ax.imshow(strip, interpolation="nearest")
        ax.set_title(label, fontsize=8, loc="left")
        ax.axis("off")
    shown = "the model's own input" if prompt is None else repr(prompt)
    fig.suptitle(f"first, middle and last frame; prompt: {shown}, seed {seed}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "contact.png")
    plt.close(fig)
    return True


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
    done = [r for r in records if "error" not in r]
    sizes = sorted({tuple(r["size"]) for r in done if r.get("size")})
    steps = sorted({r["steps"] for r in done if r.get("steps")})
    prompts = list(dict.fromkeys(r.get("prompt") for r in records))
    if spec or done:
        spec = spec or {}
        size = ", ".join(f"{f} frames x {h} x {w} px" for f, h, w in sizes) or (
            f"{spec.get('frames') or 'default'} frames x {spec.get('height') or 'default'} x "
            f"{spec.get('width') or 'default'} px"
        )
        shown = [("the model's own input" if p is None else repr(p)) for p in prompts] or ["-"]
        n_steps = ", ".join(map(str, steps)) or spec.get("steps") or "default"
        seeds = list(spec.get("seeds", sorted({r["seed"] for r in done})))
        lines += [
            f"Model `{spec.get('model')}`, rendered at {size}, {n_steps} steps, seeds {seeds}, on {_where(rows)}.",
            "",
            "Prompts: " + "; ".join(shown) + ".",
            "",
        ]
    basis = {
        "speedup": f"measured end-to-end wall time on {_where(rows)} (device-synchronised)",
        "est_speedup_flops": "**estimated** transformer speed-up 1 / ((1 - a) + a * d), a = self-attention's share "
        "of the transformer FLOPs at these shapes, d = achieved density (the CPU reference kernels' timings say "
        "little about GPU kernel speed; `est. (time)` uses the dense run's measured attention time share instead "
        "and includes everything outside the transformer)",
    }.get(
        speed,
        "**estimated**: 1 / ((1 - a) + a * d), a = attention share of the dense run's wall time, d = achieved density",
    )
    lines += [
        f"Speed-up column: {basis}. Measured speed-ups (`measured`) hold for {_where(rows)} only; the estimates "
        "hold where the kernels' cost follows the kept blocks (the Triton kernels on a GPU). Quality is measured "
        "against the dense video of the same prompt and seed "
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
    files = {"report": str(out / "report.md"), "pareto": str(out / "pareto.png")}
    if _contact_sheet(records, rows, speed, out):
        lines += ["## Contact sheet", "", "Every configuration beside dense (frame strips in `frames/`):", "",
                  "![contact sheet](contact.png)", ""]  # fmt: skip
        files["contact"] = str(out / "contact.png")
    (out / "report.md").write_text("\n".join(lines))
    _plot(rows, speed, out / "pareto.png")
    return files
