"""Accelerated renders against the dense render of the same prompt and seed: PSNR, SSIM, mean brightness, work.

A quick single-configuration comparison without the sweep's grid, resume or report (docs/methods.md's
``residual_update`` table was measured with it):

    python scripts/compare_configs.py --steps 10 --configs '["rettention", {"method": "vmoba", "sparsity": 0.8}]'
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dit_accel.eval.evaluate import run_once
from dit_accel.eval.metrics import compare_videos
from dit_accel.render import apply_request, default_model, load_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory; default: the shipped toy model")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--configs", default='["rettention"]', help="JSON list of method names or option dicts")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--prompt", action="append", default=None, help="prompt (repeatable); default: the model's")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = json.loads(args.configs)
    pipe, defaults = load_pipeline(args.model or default_model())
    for prompt in args.prompt or [None]:
        kwargs = apply_request(pipe, {**defaults, "output_type": "np"}, prompt=prompt, steps=args.steps)
        for seed in (int(s) for s in args.seeds.split(",")):
            base = run_once(pipe, kwargs, seed, "dense", probe_steps=())
            for config in configs:
                start = time.perf_counter()
                run = run_once(pipe, kwargs, seed, config, probe_steps=())
                m = compare_videos(run.frames, base.frames, use_lpips=False)
                work = run.stats["overall"]["attention_work"]
                print(
                    f"{json.dumps(config):60s} prompt={prompt!r} seed={seed} psnr={m['psnr']:.2f} "
                    f"ssim={m['ssim']:.3f} mean={run.frames.mean():.3f} (dense {base.frames.mean():.3f}) "
                    f"work={work:.3f} {time.perf_counter() - start:.0f}s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
