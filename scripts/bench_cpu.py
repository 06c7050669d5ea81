"""CPU speed of the accelerated path against dense, measured: per attention call and for a whole toy render.

Part 1 times one self-attention call at the toy's default shape (B 1, H 2, N 4,096, D 64, 64-token blocks): dense
SDPA, dense with LSE (a refresh step's dense half) and block-sparse attention at several densities, each through
the fused CPU kernels (``dit_accel.kernels.cpu``) and the references. Part 2 renders the shipped toy model at its
default settings densely and with a preset, for each kernel backend, interleaved over ``--repeats`` rounds so load
on the machine hits every variant alike; it reports the median and the ratio to dense.

    python scripts/bench_cpu.py                         # both parts, 2 threads, 3 rounds
    python scripts/bench_cpu.py --part calls --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dit_accel.kernels import cpu, reference


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _lut(n_blocks: int, keep: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.rand(1, 2, n_blocks, n_blocks, generator=gen).argsort(-1)[..., :keep].sort(-1).values
    idx = torch.nn.functional.pad(order, (0, n_blocks - keep)).to(torch.int32)
    return idx, torch.full((1, 2, n_blocks), keep, dtype=torch.int32)


def bench_calls(repeats: int, densities: tuple[float, ...]) -> list[tuple[str, float]]:
    """(label, median ms) per call at the toy's shape."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4096, 64, generator=gen) for _ in range(3))
    rows = [("dense SDPA", _median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), repeats))]
    rows.append(("dense + LSE, cpu", _median_ms(lambda: cpu.dense_attention(q, k, v), repeats)))
    rows.append(("dense + LSE, reference", _median_ms(lambda: reference.dense_attention(q, k, v), repeats)))
    for density in densities:
        keep = max(1, round(density * 64))
        idx, counts = _lut(64, keep, gen)
        for name, mod in (("cpu", cpu), ("reference", reference)):

            def call(m=mod, i=idx, c=counts):
                return m.block_sparse_attention(q, k, v, i, c, block_m=64, block_n=64)

            ms = _median_ms(call, repeats)
            rows.append((f"block-sparse {keep}/64 blocks, {name}", ms))
    return rows


def bench_render(model: str, method: str, repeats: int) -> dict[str, list[float]]:
    """Seconds per default render for dense and ``method`` on each backend, interleaved rounds."""
    import dit_accel
    from dit_accel.toy import ToyVideoPipeline

    pipe = ToyVideoPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle moves left over a striped background"
    variants = [("dense", None), (f"{method}, cpu kernels", "cpu"), (f"{method}, reference kernels", "reference")]
    times: dict[str, list[float]] = {label: [] for label, _ in variants}
    pipe(prompt=prompt, num_frames=4, height=32, width=32, num_inference_steps=2)  # warm the allocator
    for _ in range(repeats):
        for label, backend in variants:
            os.environ["DIT_ACCEL_KERNELS"] = backend or "auto"
            handle = dit_accel.accelerate(pipe, method) if backend else None
            start = time.perf_counter()
            pipe(prompt=prompt, generator=torch.Generator().manual_seed(0))
            times[label].append(time.perf_counter() - start)
            if handle is not None:
                handle.remove()
    os.environ.pop("DIT_ACCEL_KERNELS", None)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("calls", "render", "both"), default="both")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the render part (calls: 5x this)")
    ap.add_argument("--model", default="assets/toy-wan")
    ap.add_argument("--method", default="rettention")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs")
    if args.part in ("calls", "both"):
        rows = bench_calls(5 * args.repeats, (0.1, 0.2, 0.3, 0.5))
        dense = rows[0][1]
        print("\n| call (B 1, H 2, N 4096, D 64) | median ms | vs dense SDPA |\n|---|---|---|")
        for label, ms in rows:
            print(f"| {label} | {ms:.1f} | {dense / ms:.2f}x |")
    if args.part in ("render", "both"):
        if not Path(args.model).exists():
            raise SystemExit(f"--model {args.model!r}: no such directory")
        times = bench_render(args.model, args.method, args.repeats)
        dense = statistics.median(times["dense"])
        print("\n| default toy render (16 x 64 x 64, 10 steps, CFG 4) | median s | all rounds | speed-up |")
        print("|---|---|---|---|")
        for label, values in times.items():
            med = statistics.median(values)
            rounds = ", ".join(f"{t:.1f}" for t in values)
            print(f"| {label} | {med:.2f} | {rounds} | {dense / med:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
