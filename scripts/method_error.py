"""Error of every preset against dense attention, at fixed block densities, and end to end on small pipelines.

Attention level: structured inputs (a smooth random 3D field seen through 3D RoPE, so most heads attend locally,
plus global heads whose keys hold a few strong "sink" tokens and content-driven queries), drifting slowly over
denoising steps. Each preset runs from step 0 (a refresh where its compensation needs one) through ``--steps``
steps; the relative L2 error of the output against dense attention is averaged over the sparse steps. The
preset's density knob (``sparsity``, or ``tau`` for threshold selections) is bisected until the achieved video
block density is the closest to each target, so presets are compared at equal kernel work.

End to end: the same presets at ``sparsity = 1 - density`` (published density pins lifted) on the tiny random
Wan pipeline and, when ``assets/toy-wan`` exists, on the trained toy model; relative L2 error of the final
latents against the dense pipeline, plus the achieved density and the cost proxy (dense and refresh calls
count 1, sparse calls their block density).

    python scripts/method_error.py --markdown docs/method_error.md --json method_error.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

import dit_accel
from dit_accel import kernels
from dit_accel.config import resolve_config
from dit_accel.layout import TokenLayout
from dit_accel.methods import ComposedMethod, SiteCall, build_method
from dit_accel.patterns import build_pattern, plan_for
from dit_accel.site_state import BranchState
from dit_accel.state import DenoiseState

DENSITIES = (0.03, 0.05, 0.10, 0.25)
UNPIN = {"rettention-paper": {"raster_fraction": None}, "vmoba-paper": {"vmoba_topk": None}}


def _rope_3d(x: torch.Tensor, grid: tuple[int, int, int], base: float = 20.0) -> torch.Tensor:
    """Rotary embedding over (frame, row, col) on thirds of the head dim (pairs of channels), like Wan's."""
    b, h, n, d = x.shape
    f, hh, ww = grid
    coords = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(hh), torch.arange(ww), indexing="ij"), -1).view(
        n, 3
    )
    pairs = d // 2
    split = [pairs - 2 * (pairs // 3), pairs // 3, pairs // 3]
    angles = []
    for axis, count in enumerate(split):
        # frequencies from 0.6 rad/token down by ``base``: no aliasing inside a few tens of tokens, so the
        # rotated dot product of a shared direction decays with the 3D distance
        freqs = 0.6 * base ** (-torch.arange(count, dtype=torch.float32) / max(1, count))
        angles.append(coords[:, axis, None].float() * freqs[None, :])
    theta = torch.cat(angles, -1)  # (n, pairs)
    cos, sin = theta.cos(), theta.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


def _smooth_field(grid: tuple[int, int, int], channels: int, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """(N, channels) Gaussian-blurred noise over the grid, unit variance per channel."""
    radius = int(3 * sigma)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1).float() / sigma) ** 2)
    taps = (taps / taps.sum()).view(1, 1, -1)
    x = torch.randn(*grid, channels, generator=gen)
    for axis in range(3):
        moved = x.movedim(axis, -1)
        shape = moved.shape
        flat = moved.reshape(-1, 1, shape[-1])
        flat = torch.nn.functional.conv1d(torch.nn.functional.pad(flat, (radius, radius), mode="replicate"), taps)
        x = flat.reshape(shape).movedim(-1, axis)
    x = x.reshape(-1, channels)
    return (x - x.mean(0)) / x.std(0)


def structured_inputs(
    grid: tuple[int, int, int] = (8, 16, 32),
    heads: int = 3,
    global_heads: int = 1,
    head_dim: int = 64,
    steps: int = 4,
    drift: float = 0.03,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """q, k, v (1, heads, N, head_dim) per step: local RoPE heads first, then global heads; inputs drift per step."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(grid)
    field = _smooth_field(grid, head_dim, 2.0, gen)
    drift_field = _smooth_field(grid, head_dim, 2.0, gen)
    proj = [torch.randn(head_dim, head_dim, generator=gen) / math.sqrt(head_dim) for _ in range(3 * heads)]
    anchor = torch.randn(heads, head_dim, generator=gen)
    sinks = torch.randperm(n, generator=gen)[: max(1, n // 200)]
    out = []
    for step in range(steps):
        x = field + drift * step * drift_field
        qs, ks, vs = [], [], []
        for head in range(heads):
            wq, wk, wv = proj[3 * head : 3 * head + 3]
            q, k, v = x @ wq, x @ wk, x @ wv
            if head < heads - global_heads:  # local: a shared direction makes RoPE's decay dominate
                a = anchor[head] * 2.5
                q, k = (a + 0.6 * q) * 1.2, a + 0.6 * k
                q = _rope_3d(q[None, None], grid)[0, 0]
                k = _rope_3d(k[None, None], grid)[0, 0]
            else:  # global: content-driven queries and a few strong sink keys
                k = k.clone()
                k[sinks] += anchor[head] * 2.5
                q = q + anchor[head] * 0.8
            qs.append(q), ks.append(k), vs.append(v)
        out.append(tuple(torch.stack(t)[None].contiguous() for t in (qs, ks, vs)))
    return out  # type: ignore[return-value]


def _call(q, k, v, cfg, layout, step, cache, site_index=0) -> SiteCall:
    state = DenoiseState(step=step, num_steps=50, branch="cond", layout=layout, active=True)
    return SiteCall(q, k, v, None, cfg, state, layout, site_index, f"site{site_index}", cache)


def _knob(cfg) -> str:
    if cfg.pattern.kind == "threshold" or (cfg.pattern.kind == "vmoba" and cfg.vmoba_select == "threshold"):
        return "tau"
    return "sparsity"


def pattern_density(cfg, inputs, layout, site_index: int = 0) -> float:
    """Achieved video block density of ``cfg``'s pattern on the step-0 inputs."""
    q, k, _ = inputs[0]
    plan = plan_for(cfg, layout, q.shape[2], site_index, q.device)
    if plan.perm is not None:
        q, k = kernels.permute_tokens(q, plan.perm), kernels.permute_tokens(k, plan.perm)
    return float(build_pattern(cfg, plan, q, k, layout, None).mask.float().mean())


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"rettention[pattern=topk,tiled=True]"`` -> ("rettention", {"pattern": "topk", "tiled": True})."""
    if "[" not in spec:
        return spec, {}
    name, rest = spec.split("[", 1)
    options: dict[str, Any] = {}
    for item in rest.rstrip("]").split(";"):
        key, value = item.split("=", 1)
        try:
            options[key] = json.loads(value.replace("'", '"'))
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def calibrate(spec: str, target: float, inputs, layout, site_index: int = 0, **options: Any):
    """The config of ``spec`` whose achieved density is closest to ``target`` (bisection on its knob)."""
    method, extra = parse_spec(spec)
    base = resolve_config(method, **{**UNPIN.get(method, {}), **extra, **options})
    knob = _knob(base)
    lo, hi = (0.0, 0.9999) if knob == "sparsity" else (1e-4, 1.0)
    best = None
    for _ in range(14):
        mid = 0.5 * (lo + hi)
        cfg = base.replace(**{knob: mid})
        dens = pattern_density(cfg, inputs, layout, site_index)
        if best is None or abs(dens - target) < abs(best[1] - target):
            best = (cfg, dens)
        # density falls with sparsity and rises with tau
        if (dens > target) == (knob == "sparsity"):
            lo = mid
        else:
            hi = mid
    return best


_REFERENCES: dict[int, torch.Tensor] = {}


def _reference(inputs, step: int) -> torch.Tensor:
    key = id(inputs[step][0])
    if key not in _REFERENCES:
        _REFERENCES[key] = kernels.dense_attention(*inputs[step])[0]
    return _REFERENCES[key]


def attention_error(cfg, inputs, layout, site_index: int = 0) -> dict[str, float]:
    """Mean relative L2 error over the sparse steps, running the method from step 0 with one cache."""
    method = build_method(cfg.replace(dense_steps=0))
    assert isinstance(method, ComposedMethod)
    cache = BranchState()
    errors, dens = [], []
    for step, (q, k, v) in enumerate(inputs):
        result = method.attend(_call(q, k, v, method.config, layout, step, cache, site_index))
        if result.kind != "sparse":
            continue
        ref = _reference(inputs, step)
        errors.append(float((result.out.detach().float() - ref).norm() / ref.norm()))
        dens.append(float(result.density))
    if not errors:
        return {"error": float("nan"), "density": float("nan")}
    return {"error": sum(errors) / len(errors), "density": sum(dens) / len(dens)}


def attention_table(methods, densities, inputs, layout, sites=(0, 1, 2)) -> dict[str, dict[float, dict]]:
    """error and achieved density per method and target density (averaged over VMoBA's three partitions)."""
    table: dict[str, dict[float, dict]] = {}
    for method in methods:
        table[method] = {}
        for target in densities:
            runs = []
            name, extra = parse_spec(method)
            for site in sites if resolve_config(name, **extra).pattern.kind == "vmoba" else (0,):
                cfg, _ = calibrate(method, target, inputs, layout, site)
                runs.append(attention_error(cfg, inputs, layout, site))
            table[method][target] = {key: sum(r[key] for r in runs) / len(runs) for key in ("error", "density")}
            print(f"attn {method:18s} target {target:.2f}: {table[method][target]}", flush=True)
    return table


def _toy_pipeline(path: Path):
    from dit_accel.toy import ToyVideoPipeline

    pipe = ToyVideoPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red circle moves right over a blue background", num_frames=8, output_type="latent")
    return pipe, kwargs


def e2e_table(methods, densities, pipelines) -> dict[str, dict[str, dict[float, dict]]]:
    """Final-latent relative L2 error vs the dense pipeline, achieved density and cost per method and density."""
    out: dict[str, dict[str, dict[float, dict]]] = {}
    for name, (pipe, kwargs) in pipelines.items():
        ref = _latents(pipe, kwargs)
        out[name] = {}
        for method in methods:
            out[name][method] = {}
            for target in densities:
                name_, extra = parse_spec(method)
                options = dict(UNPIN.get(name_, {}), **extra, sparsity=1.0 - target, min_tokens=64)
                with dit_accel.accelerate(pipe, name_, **options) as handle:
                    got = _latents(pipe, kwargs)
                    stats = handle.stats()["overall"]
                calls = stats["dense_calls"] + stats["sparse_calls"] + stats["refresh_calls"]
                measured = stats["sparse_calls"] + stats["refresh_calls"]
                density_sum = (stats["block_density"] or 0.0) * measured
                sparse_density = (density_sum - stats["refresh_calls"]) / max(1, stats["sparse_calls"])
                cost = (stats["dense_calls"] + density_sum) / max(1, calls)
                row = {
                    "error": float((got - ref).norm() / ref.norm()),
                    "density": sparse_density,
                    "cost": cost,
                }
                out[name][method][target] = row
                print(f"e2e {name} {method:18s} target {target:.2f}: {row}", flush=True)
    return out


def _latents(pipe, kwargs) -> torch.Tensor:
    result = pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    frames = result.frames if hasattr(result, "frames") else result[0]
    return frames.float() if isinstance(frames, torch.Tensor) else torch.as_tensor(frames).float()


def markdown(attn, e2e, args, seconds: float) -> str:
    lines = [
        f"Command: `python scripts/method_error.py {args.argv}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU: {platform.processor() or platform.machine()}"
        f", {torch.get_num_threads()} threads, torch {torch.__version__}; {seconds:.0f} s.",
        "",
        f"Attention level: grid {args.grid}, {args.heads} heads ({args.global_heads} global), head dim "
        f"{args.head_dim}, {args.steps} steps drifting by {args.drift}; relative L2 error averaged over the sparse "
        "steps (achieved video block density in brackets).",
        "",
        "| preset | " + " | ".join(f"{d:.0%}" for d in args.densities) + " |",
        "|---|" + "---|" * len(args.densities),
    ]
    for method, row in attn.items():
        cells = [f"{row[d]['error']:.3f} ({row[d]['density']:.3f})" for d in args.densities]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for name, table in e2e.items():
        lines += [
            "",
            f"End to end, {name}: relative L2 error of the final latents (achieved sparse-call block density / "
            "cost proxy with dense and refresh calls at 1).",
            "",
            "| preset | " + " | ".join(f"{d:.0%}" for d in args.densities) + " |",
            "|---|" + "---|" * len(args.densities),
        ]
        for method, row in table.items():
            cells = [f"{row[d]['error']:.4f} ({row[d]['density']:.2f} / {row[d]['cost']:.2f})" for d in args.densities]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--methods",
        default=",".join(m for m in dit_accel.METHODS if m != "dense"),
        help="presets, or variants like 'rettention[pattern=topk;tiled=false]' (options separated by ';')",
    )
    parser.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    parser.add_argument("--grid", default="8,16,32")
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--global-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--drift", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pipelines", default="wan,toy", help="comma list of 'wan' (tiny random) and 'toy'")
    parser.add_argument("--toy-path", default="assets/toy-wan")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    import sys

    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    args.argv = " ".join(raw)
    args.densities = [float(d) for d in args.densities.split(",")]
    args.grid = tuple(int(g) for g in args.grid.split(","))
    methods = [m for m in args.methods.split(",") if m]
    start = time.time()
    layout = TokenLayout(grid=args.grid)
    inputs = structured_inputs(
        args.grid, args.heads, args.global_heads, args.head_dim, args.steps, args.drift, args.seed
    )
    attn = attention_table(methods, args.densities, inputs, layout)
    pipelines = {}
    for name in [p for p in args.pipelines.split(",") if p]:
        if name == "wan":
            from dit_accel.testing import tiny_pipeline

            pipe, kwargs = tiny_pipeline("wan")
            kwargs["num_inference_steps"] = 6
            pipelines["tiny-wan (random weights, 768 tokens, 6 steps)"] = (pipe, kwargs)
        elif name == "toy" and Path(args.toy_path).exists():
            pipelines["toy-wan (trained, 8 x 16 x 16 = 2048 tokens, 10 steps)"] = _toy_pipeline(Path(args.toy_path))
    e2e = e2e_table(methods, args.densities, pipelines)
    seconds = time.time() - start
    text = markdown(attn, e2e, args, seconds)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"attention": attn, "e2e": e2e}, indent=1, default=str))


if __name__ == "__main__":
    main()
