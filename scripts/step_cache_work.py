"""Attention work of a step cache (diffusers' FirstBlockCache), sparse attention (a dit_accel preset) and both.

On the toy model (``assets/toy-wan``, docs/toy_model.md). Work counts every self-attention call the model would
make (transformer forwards x sites): a dense call and a refresh (full attention) count 1, a sparse call its
achieved block density, a call the cache skipped 0 (``stats()["overall"]["skipped_calls"]``). The cache alone is
measured through ``method="dense"``, which is bit-exact and only counts. Error: relative L2 of the frames against
the plain pipeline (no cache, dense).

    python scripts/step_cache_work.py --frames 8 --size 32 --steps 10
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import FirstBlockCacheConfig

import dit_accel
from dit_accel.toy import ToyVideoPipeline

PROMPT = "a red circle moves left over a striped background"


def measure(pipe, call, method, cache_threshold):
    """(work fraction, skipped fraction, seconds, frames) of one generation."""
    if cache_threshold is not None:
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=cache_threshold))
    handle = dit_accel.accelerate(pipe, method, min_tokens=64)
    work = [0.0]

    def observe(event):
        work[0] += 1.0 if event.kind != "sparse" else float(event.density)

    next(iter(handle.accelerators.values())).observers.append(observe)
    start = time.perf_counter()
    frames = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    seconds = time.perf_counter() - start
    overall = handle.stats()["overall"]
    handle.remove()
    if cache_threshold is not None:
        pipe.transformer.disable_cache()
    total = overall["dense_calls"] + overall["sparse_calls"] + overall["refresh_calls"] + overall["skipped_calls"]
    return work[0] / total, overall["skipped_calls"] / total, seconds, torch.as_tensor(frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--method", default=dit_accel.DEFAULT_METHOD)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1])
    args = parser.parse_args()
    pipe = ToyVideoPipeline.from_pretrained("assets/toy-wan")
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=PROMPT, num_frames=args.frames, height=args.size, width=args.size)
    call["num_inference_steps"] = args.steps
    _, _, _, reference = measure(pipe, call, "dense", None)
    rows = [("none (dense)", "dense", None)]
    rows += [(f"first-block cache {t}", "dense", t) for t in args.thresholds]
    rows.append((f"`{args.method}`", args.method, None))
    rows += [(f"`{args.method}` + first-block cache {t}", args.method, t) for t in args.thresholds]
    print(f"{args.frames} x {args.size} x {args.size} px, {args.steps} steps, CFG; {torch.__version__}, CPU")
    print("| run | attention work | skipped calls | rel. L2 vs dense | seconds |")
    print("|---|---|---|---|---|")
    for name, method, threshold in rows:
        work, skipped, seconds, frames = measure(pipe, call, method, threshold)
        error = float((frames - reference).norm() / reference.norm())
        print(f"| {name} | {work:.3f} | {skipped:.3f} | {error:.4f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
