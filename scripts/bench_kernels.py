"""Kernel benchmark: dit_accel's Triton block-sparse attention against dense SDPA (cuDNN, flash) and FlexAttention
with the same blocks, all measured in the same run, plus the cost of building the pattern.

    python scripts/bench_kernels.py --out runs/bench_kernels.json          # the full sweep (about 5 min on an H200)
    python scripts/bench_kernels.py --quick --out /tmp/k.json              # one shape, three sparsities

Method: bf16, batch 1, CUDA events, median of ``--reps`` timed runs after ``--warmup`` runs (the first call of our
kernel also autotunes it; that happens in the warm-up). Block sparsity s means each query block attends to
round((1 - s) * n_blocks) key blocks (at least 1). "random" picks them uniformly per head and query block;
"window" is a 3D window of tiles (tile volume = block_m) whose radius is chosen to come closest to s, the achieved
sparsity is what is reported. TFLOP/s counts only the computed blocks (4 * block_m * block_n * D per block pair).
Pattern building = pooled Q/K + scores + top-k + LUT on the device, as a share of the dense cuDNN time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_accel import layout  # noqa: E402
from dit_accel.kernels import reference  # noqa: E402
from dit_accel.kernels import triton_block_sparse as tbs  # noqa: E402

SHAPES = {
    # name: (B, H, N, D, latent grid (frames, rows, cols) of the video tokens, text tokens in front)
    "wan1.3b-480p": (1, 12, 32760, 128, (21, 30, 52), 0),
    "cogvideox5b": (1, 48, 17776, 64, (13, 30, 45), 226),
}
TILES = {128: (2, 8, 8), 64: (1, 8, 8)}
TARGETS = {0.0: 0.85, 0.9: 8.5, 0.95: 16.0, 0.97: 25.0}  # issue 4: speed-up over dense cuDNN SDPA


def cuda_time(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` CUDA-event-timed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def random_mask(
    b: int, h: int, n_q: int, n_k: int, sparsity: float, gen: torch.Generator, device: str = "cuda"
) -> torch.Tensor:
    keep = max(1, round((1.0 - sparsity) * n_k))
    ranks = torch.rand(b, h, n_q, n_k, generator=gen, device=device).argsort(-1)
    return ranks < keep


def window_mask(
    b: int, h: int, n_q: int, n_k: int, grid, block: int, sparsity: float, device: str = "cuda"
) -> torch.Tensor:
    """A 3D tile window (same for all heads) whose density comes closest to 1 - sparsity."""
    tiles = layout.tile_grid(grid, TILES[block])
    best, best_err = None, float("inf")
    for rf in range(tiles[0]):
        for rh in range(tiles[1]):
            for rw in range(tiles[2]):
                m = layout.block_window_mask(tiles, (rf, rh, rw), device=device)[:n_q, :n_k]
                if m.shape != (n_q, n_k):
                    m = torch.nn.functional.pad(m, (0, n_k - m.shape[1], 0, n_q - m.shape[0]))
                    m[m.sum(-1) == 0, 0] = True
                err = abs(1.0 - m.float().mean().item() - sparsity)
                if err < best_err:
                    best, best_err = m, err
    return best.expand(b, h, n_q, n_k).contiguous()


def flex_runner(q, k, v, mask: torch.Tensor, block_m: int, block_n: int):
    """FlexAttention given the same blocks as *full* blocks (the compiled kernel visits only the listed blocks and
    never evaluates a mask_mod inside them), compiled once per shape. Its eager CPU path would ignore the blocks:
    FlexAttention takes the mask_mod (here none) as the truth and the blocks as an optimisation."""
    import inspect

    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    n = q.shape[2]
    full_idx, full_cnt = reference.lut_from_mask(mask)  # full width, as FlexAttention builds them
    kwargs = {"BLOCK_SIZE": (block_m, block_n), "seq_lengths": (n, n)}
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["compute_q_blocks"] = False  # forward only: no transposed LUT
    block_mask = BlockMask.from_kv_blocks(torch.zeros_like(full_cnt), full_idx, full_cnt, full_idx, **kwargs)
    compiled = _compiled_flex(flex_attention)
    return lambda: compiled(q, k, v, block_mask=block_mask)


_FLEX = {}


def _compiled_flex(fn):
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(fn, dynamic=False)
    return _FLEX["fn"]


#: optional backends timed through dit_accel's wrappers when they import: name -> (module, extra keyword arguments)
EXTRA = {
    "fa4": ("fa4", {}),  # FlashAttention-4, our 64-blocks merged into its 128 x 128 (sm90) tiles
    "fa4_64": ("fa4", {"tile": (64, 64)}),  # sm90 only: FA4 fitting its tile to our 64-blocks, no merging
    "flex_flash": ("flex_flash", {}),  # FlexAttention's FLASH backend (FA4 through Inductor)
    "cudnn_bsa": ("cudnn_bsa", {}),  # cuDNN frontend's block-sparse attention
}


def extra_backends(spec: str, block_m: int, block_n: int) -> dict:
    """The ``--extra`` backends that can run here: name -> block_sparse_attention(q, k, v, idx, cnt)."""
    import importlib

    from dit_accel import kernels

    names = (
        [n for n in spec.split(",") if n] if spec not in ("auto", "none") else ([] if spec == "none" else list(EXTRA))
    )
    out = {}
    for name in names:
        if name not in EXTRA:
            sys.exit(f"--extra {name!r} is unknown; allowed: {', '.join(EXTRA)}, auto, none")
        module, extra = EXTRA[name]
        if not kernels._optional_installed(module) or (
            name == "fa4_64" and (torch.cuda.get_device_capability()[0] != 9 or (block_m, block_n) != (64, 64))
        ):
            print(f"[extra] {name}: not available here, skipped", flush=True)
            continue
        fn = importlib.import_module(f"dit_accel.kernels.{module}").block_sparse_attention
        out[name] = lambda q, k, v, idx, cnt, fn=fn, extra=extra: fn(
            q, k, v, idx, cnt, block_m=block_m, block_n=block_n, **extra
        )
    return out


def sdpa_runner(q, k, v, backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def run():
        with sdpa_kernel([chosen]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def try_time(fn_factory: Callable[[], Callable[[], object]], warmup: int, reps: int) -> tuple[float | None, str]:
    try:
        fn = fn_factory()
        return cuda_time(fn, warmup, reps), ""
    except Exception as exc:  # a baseline that is unavailable on this build is reported, not fatal
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"


def bench_shape(name: str, args, block_m: int, block_n: int, sparsities, patterns, gen) -> tuple[list[dict], dict]:
    """Dense baselines, pattern-building cost, and ours vs FlexAttention at every (pattern, sparsity) of a shape."""
    b, h, n, d, grid, _text = SHAPES[name]
    q, k, v = (torch.randn(b, h, n, d, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    n_q, n_k = math.ceil(n / block_m), math.ceil(n / block_n)
    dense_flops = 4.0 * n * n * d * h * b
    extras = extra_backends(args.extra, block_m, block_n)
    cudnn, cudnn_err = try_time(lambda: sdpa_runner(q, k, v, "cudnn"), args.warmup, args.reps)
    flash, flash_err = try_time(lambda: sdpa_runner(q, k, v, "flash"), args.warmup, args.reps)
    print(f"[{name}] dense cuDNN {cudnn} ms {cudnn_err}  flash {flash} ms {flash_err}", flush=True)

    # pattern building on the device: pooled top-k straight to a LUT, and the cumulative-threshold variant
    keep = max(1, round(0.1 * n_k))

    def topk_build():
        return tbs.pooled_topk_lut(q, k, block_m, block_n, keep)

    def threshold_build():
        scores = torch.matmul(tbs.mean_pool(q, block_m), tbs.mean_pool(k, block_n, smooth=True).transpose(-1, -2))
        return tbs.lut_from_mask(tbs.threshold_mask(scores / math.sqrt(d), 0.9))

    topk_ms, err = try_time(lambda: topk_build, args.warmup, args.reps)
    thr_ms, thr_err = try_time(lambda: threshold_build, args.warmup, args.reps)
    cost = {
        "shape": name,
        "pooled_topk_lut_ms": topk_ms,
        "threshold_lut_ms": thr_ms,
        "share_of_dense_cudnn_topk": (topk_ms / cudnn) if topk_ms and cudnn else None,
        "share_of_dense_cudnn_threshold": (thr_ms / cudnn) if thr_ms and cudnn else None,
        "errors": [e for e in (err, thr_err) if e],
    }
    print(f"[{name}] pattern build: top-k {topk_ms} ms, threshold {thr_ms} ms", flush=True)

    rows = []
    for pattern in patterns:
        for s in sparsities:
            if pattern == "random":
                mask = random_mask(b, h, n_q, n_k, s, gen)
            else:
                mask = window_mask(b, h, n_q, n_k, grid, block_m, s)
            idx, cnt = reference.lut_from_mask(mask)
            idx = idx[..., : max(1, int(cnt.max()))].contiguous()
            computed = int(cnt.sum())
            actual = 1.0 - computed / (b * h * n_q * n_k)

            def ours_fn(idx=idx, cnt=cnt):
                return tbs.block_sparse_attention(q, k, v, idx, cnt, block_m=block_m, block_n=block_n)

            ours, ours_err = try_time(lambda ours_fn=ours_fn: ours_fn, args.warmup, args.reps)
            flex, flex_err, flex_diff = None, "", None
            if not args.no_flex:
                flex, flex_err = try_time(lambda mask=mask: flex_runner(q, k, v, mask, block_m, block_n), args.warmup,
                                          args.reps)  # fmt: skip
                if flex is not None and s == sparsities[-1]:  # same blocks, same result up to bf16 noise
                    flex_out = flex_runner(q, k, v, mask, block_m, block_n)()
                    flex_diff = (ours_fn()[0].float() - flex_out.float()).abs().max().item()
            extra_ms, extra_diff, extra_err = {}, {}, []
            for ename, efn in extras.items():
                ms, err = try_time(lambda efn=efn, idx=idx, cnt=cnt: lambda: efn(q, k, v, idx, cnt), args.warmup,
                                   args.reps)  # fmt: skip
                extra_ms[ename] = ms
                if err:
                    extra_err.append(f"{ename}: {err}")
                elif s == sparsities[-1]:
                    extra_diff[ename] = (ours_fn()[0].float() - efn(q, k, v, idx, cnt)[0].float()).abs().max().item()
            block_flops = 4.0 * computed * block_m * block_n * d
            row = {
                "shape": name,
                "pattern": pattern,
                "target_sparsity": s,
                "sparsity": round(actual, 4),
                "ideal_speedup": 1.0 / max(1e-9, 1.0 - actual),
                "ours_ms": ours,
                "flex_ms": flex,
                "cudnn_ms": cudnn,
                "flash_ms": flash,
                "ours_vs_cudnn": (cudnn / ours) if ours and cudnn else None,
                "ours_vs_flash": (flash / ours) if ours and flash else None,
                "flex_vs_cudnn": (cudnn / flex) if flex and cudnn else None,
                "ours_vs_flex": (flex / ours) if ours and flex else None,
                "ours_tflops_computed": (block_flops / ours / 1e9) if ours else None,
                "cudnn_tflops": (dense_flops / cudnn / 1e9) if cudnn else None,
                "target_vs_cudnn": TARGETS.get(s),
                "ours_vs_flex_max_abs_diff": flex_diff,
                **{f"{e}_ms": ms for e, ms in extra_ms.items()},
                **{f"{e}_vs_cudnn": (cudnn / ms) if ms and cudnn else None for e, ms in extra_ms.items()},
                **{f"ours_vs_{e}_max_abs_diff": diff for e, diff in extra_diff.items()},
                "errors": [e for e in (ours_err, flex_err, cudnn_err, flash_err, *extra_err) if e],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    cost["fixed"] = fixed_cost(q, k, v, block_m, block_n, args)
    print(f"[{name}] fixed cost: {cost['fixed']}", flush=True)
    return rows, cost


def fixed_cost(q, k, v, block_m: int, block_n: int, args) -> dict:
    """What a program costs beyond its key blocks: our kernel with every LUT row empty (Q load, epilogue, launch) and
    with one block per row; per program = time x SMs / programs (one resident program per SM, as tuned dense)."""
    b, h, n, _ = q.shape
    n_q = math.ceil(n / block_m)
    programs = b * h * n_q
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = {}
    for blocks in (0, 1):
        idx = torch.zeros(b, h, n_q, 1, dtype=torch.int32, device=q.device)
        cnt = torch.full((b, h, n_q), blocks, dtype=torch.int32, device=q.device)
        ms, err = try_time(
            lambda idx=idx, cnt=cnt: lambda: tbs.block_sparse_attention(q, k, v, idx, cnt, block_m=block_m,
                                                                      block_n=block_n),
            args.warmup, args.reps,
        )  # fmt: skip
        out[f"blocks_{blocks}_ms"] = ms
        out[f"blocks_{blocks}_us_per_program"] = None if ms is None else ms * 1000 * sms / programs
        if err:
            out[f"blocks_{blocks}_error"] = err
    return out


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--sparsities", default="0,0.5,0.75,0.9,0.95,0.97")
    ap.add_argument("--patterns", default="random,window")
    ap.add_argument("--block", default="128x128", help="block_m x block_n")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a minute)")
    ap.add_argument("--extra", default="auto", help=f"comma list of {', '.join(EXTRA)}; auto: those that import")
    ap.add_argument("--quick", action="store_true", help="first shape, sparsities 0, 0.9, 0.97, random only")
    ap.add_argument("--out", type=Path, required=True, help="JSON results path")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    block_m, block_n = (int(x) for x in args.block.lower().split("x"))
    shapes = args.shapes.split(",")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    patterns = args.patterns.split(",")
    if args.quick:
        shapes, sparsities, patterns = shapes[:1], [0.0, 0.9, 0.97], ["random"]

    gen = torch.Generator(device="cuda").manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "card": props.name,
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "block": [block_m, block_n],
        "autotune_cache": str(tbs._cache_path()),
        "env": {k: v for k, v in os.environ.items() if k.startswith("DIT_ACCEL_")},
    }
    rows: list[dict] = []
    patterns_cost: list[dict] = []
    for name in shapes:
        shape_rows, cost = bench_shape(name, args, block_m, block_n, sparsities, patterns, gen)
        rows += shape_rows
        patterns_cost.append(cost)
        torch.cuda.empty_cache()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows, "pattern_building": patterns_cost}, indent=1))

    def f(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    print(
        f"\n# {meta['card']}  torch {meta['torch']}  triton {meta['triton']}  commit {meta['commit']}  {meta['date']}"
    )
    print("| shape | pattern | sparsity | ours ms | flex ms | cuDNN ms | flash ms | ours/cuDNN | flex/cuDNN | ideal "
          "| target | ours TFLOP/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['pattern']} | {r['sparsity']:.3f} | {f(r['ours_ms'])} | {f(r['flex_ms'])} | "
            f"{f(r['cudnn_ms'])} | {f(r['flash_ms'])} | {f(r['ours_vs_cudnn'])}x | {f(r['flex_vs_cudnn'])}x | "
            f"{r['ideal_speedup']:.1f}x | {f(r['target_vs_cudnn'], '.2f')} | {f(r['ours_tflops_computed'], '.0f')} |"
        )
    for p in patterns_cost:
        print(
            f"pattern building [{p['shape']}]: pooled top-k {f(p['pooled_topk_lut_ms'], '.3f')} ms "
            f"({f(100 * p['share_of_dense_cudnn_topk'] if p['share_of_dense_cudnn_topk'] else None, '.1f')}% of "
            f"dense), threshold {f(p['threshold_lut_ms'], '.3f')} ms "
            f"({f(100 * p['share_of_dense_cudnn_threshold'] if p['share_of_dense_cudnn_threshold'] else None, '.1f')}%)"
        )
    for p in patterns_cost:
        fx = p.get("fixed", {})
        print(
            f"fixed cost [{p['shape']}]: empty LUT {f(fx.get('blocks_0_ms'), '.3f')} ms "
            f"({f(fx.get('blocks_0_us_per_program'), '.1f')} us per program), one block per row "
            f"{f(fx.get('blocks_1_ms'), '.3f')} ms ({f(fx.get('blocks_1_us_per_program'), '.1f')} us)"
        )
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
