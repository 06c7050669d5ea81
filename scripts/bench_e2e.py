"""End-to-end transformer benchmark: time per denoising step, dense attention against each preset.

Builds the full-size Wan2.1 transformer with random weights (no download), runs a short denoising loop per
method (so dense warm-up, refresh and sparse steps are all counted as a user would pay them) and reports the
mean time per step, the speed-up over dense, and the attention share of the dense forward (from the profiler).

    python scripts/bench_e2e.py --model wan-1.3b --steps 10 --out bench_e2e.json          # on a GPU
    python scripts/bench_e2e.py --dry-run                                                # tiny, CPU, smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

import dit_accel

MODELS: dict[str, dict[str, Any]] = {
    # Wan2.1-T2V-1.3B at 480x832, 81 frames: latent 21 x 60 x 104 -> 21 x 30 x 52 = 32,760 tokens
    "wan-1.3b": dict(
        config=dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
        latent=(16, 21, 60, 104),
    ),
    # Wan2.1-T2V-14B at 720x1280, 81 frames: latent 21 x 90 x 160 -> 21 x 45 x 80 = 75,600 tokens
    "wan-14b": dict(
        config=dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
        latent=(16, 21, 90, 160),
    ),
    "tiny": dict(
        config=dict(num_attention_heads=2, attention_head_dim=64, ffn_dim=256, num_layers=2),
        latent=(16, 3, 32, 32),
    ),
}
COMMON = dict(
    patch_size=(1, 2, 2),
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)


def build(name: str, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from diffusers import WanTransformer3DModel

    spec = MODELS[name]
    common = dict(COMMON, text_dim=64) if name == "tiny" else COMMON
    with torch.device(device):
        model = WanTransformer3DModel(**common, **spec["config"]).to(dtype).eval()
    c, f, h, w = spec["latent"]
    inputs = dict(
        hidden_states=torch.randn(1, c, f, h, w, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(1, 512, common["text_dim"], device=device, dtype=dtype),
    )
    return model, inputs


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_loop(model: torch.nn.Module, inputs: dict[str, torch.Tensor], steps: int, device: str) -> list[float]:
    """Seconds per step over a denoising loop of ``steps`` timesteps (1000 -> 0)."""
    times = []
    for t in torch.linspace(999, 0, steps):
        sync(device)
        start = time.perf_counter()
        model(**inputs, timestep=t.view(1).to(device), return_dict=False)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def attention_share(model: torch.nn.Module, inputs: dict[str, torch.Tensor], device: str) -> float | None:
    """Share of GPU kernel time spent in attention kernels during one dense forward."""
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(**inputs, timestep=torch.tensor([500.0], device=device), return_dict=False)
        torch.cuda.synchronize()
    total = attn = 0.0
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        total += t
        if any(k in evt.key.lower() for k in ("attention", "fmha", "flash", "cudnn", "block_sparse")):
            attn += t
    return attn / total if total else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan-1.3b", choices=sorted(MODELS))
    parser.add_argument("--methods", default=",".join(m for m in dit_accel.METHODS if m != "dense"))
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per method (schedules count)")
    parser.add_argument("--sparsity", type=float, default=None, help="override every preset's sparsity")
    parser.add_argument("--warmup-steps", type=int, default=2, help="dense forwards before the dense timing")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled forward (attention share)")
    parser.add_argument(
        "--compile", action="store_true",
        help="torch.compile the repeated transformer blocks (dense and accelerated runs alike): shrinks the "
        "non-attention time that bounds the speed-up",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU: checks the script runs")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    name = "tiny" if args.dry_run else args.model
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, inputs = build(name, device, dtype)
    if args.compile:
        model.compile_repeated_blocks(fullgraph=False)
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"

    time_loop(model, inputs, args.warmup_steps, device)  # warm-up
    dense = time_loop(model, inputs, args.steps, device)
    dense_ms = statistics.mean(dense) * 1000
    rows = [{"method": "dense (stock SDPA)", "ms_per_step": dense_ms, "speedup": 1.0, "density": 1.0,
             "step_ms": [round(t * 1000, 2) for t in dense]}]  # fmt: skip
    share = None if args.no_profile else attention_share(model, inputs, device)
    for method in [m for m in args.methods.split(",") if m]:
        options = {"num_steps": args.steps, "min_tokens": 256}
        if args.sparsity is not None:
            options["sparsity"] = args.sparsity
        handle = dit_accel.accelerate(model, method, **options)
        try:
            time_loop(model, inputs, args.steps, device)  # warm-up: compile kernels, fill caches
            times = time_loop(model, inputs, args.steps, device)
            stats = handle.stats()["overall"]
        finally:
            handle.remove()
        ms = statistics.mean(times) * 1000
        rows.append({"method": method, "ms_per_step": ms, "speedup": dense_ms / ms, "density": stats["block_density"],
                     "step_ms": [round(t * 1000, 2) for t in times]})  # fmt: skip

    result = {
        "card": card,
        "model": name,
        "steps": args.steps,
        "compiled": args.compile,
        "attention_share_dense": share,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    print(f"\n{name} on {card}, {args.steps} steps{', compiled blocks' if args.compile else ''}, attention share of "
          f"dense forward: {share}")  # fmt: skip
    print(f"{'method':24s} {'ms/step':>10s} {'speed-up':>9s} {'density':>8s} {'fastest step ms':>16s}")
    for row in rows:
        density = "-" if row["density"] is None else f"{row['density']:.3f}"
        print(f"{row['method']:24s} {row['ms_per_step']:10.1f} {row['speedup']:9.2f}x {density:>8s} "
              f"{min(row['step_ms']):16.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
