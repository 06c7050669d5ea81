"""One generation spread over several GPUs: diffusers Ulysses context parallelism + dit_accel sparse attention.

Launch one process per GPU with torchrun (see docs/parallel.md)::

    torchrun --nproc-per-node 2 scripts/generate_parallel.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers \\
        --prompt "a red fox running through snow" --method rettention --out fox.mp4

Every rank runs the transformer on its slice of the heads (the sequence is all-to-all'd inside attention); rank 0
alone decodes and writes the video and ``<out>.json`` (timing, the Ulysses degree, rank 0's attention stats).
Without CUDA it runs on CPU over gloo, which is only meant for a smoke test with ``--model tiny-wan``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-wan", help="diffusers directory, cached hub id, or tiny-wan")
    parser.add_argument("--prompt", default="", help="text prompt (ignored by tiny-wan, which has no text encoder)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--method", default=None, help="dit_accel method; 'none' runs dense attention without it")
    parser.add_argument("--option", action="append", default=[], help="dit_accel option name=value (repeatable)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: bfloat16 on CUDA)")
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--out", default="video.mp4")
    return parser.parse_args()


def _option(text: str) -> tuple[str, object]:
    name, _, raw = text.partition("=")
    try:
        return name.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return name.strip(), raw


def _one_device_on_cpu() -> contextlib.AbstractContextManager:
    """For the CPU smoke run: diffusers 0.42.1's ``enable_parallelism`` picks the device as
    ``rank % torch.accelerator.device_count()``, which divides by zero without an accelerator."""
    if torch.accelerator.device_count() > 0:
        return contextlib.nullcontext()
    return mock.patch.object(torch.accelerator, "device_count", return_value=1)


def main() -> None:
    args = _parse()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import ContextParallelConfig

    import dit_accel
    from dit_accel.batch import local_rank
    from dit_accel.render import apply_request, check_output, check_size, frames_of, load_pipeline, write_video

    try:  # before the (long) parallel render: write_video would refuse an unsupported --out only afterwards
        check_output(args.out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{local_rank()}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    dtype = args.dtype or ("bfloat16" if cuda else None)
    pipe, kwargs = load_pipeline(args.model, device=device, dtype=dtype, progress=rank == 0)
    kwargs = apply_request(
        pipe, kwargs, prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
        frames=args.frames, height=args.height, width=args.width, guidance_scale=None,
    )  # fmt: skip
    check_size(pipe, kwargs)
    if rank != 0:
        kwargs["output_type"] = "latent"  # the transformer's collectives are over before decoding: rank 0 decodes
    for name in ("transformer", "transformer_2"):  # Wan 2.2 has two experts; both must be parallel
        transformer = getattr(pipe, name, None)
        if transformer is None:
            continue
        heads = transformer.config.num_attention_heads
        config = ContextParallelConfig(ulysses_degree=world, ulysses_anything=heads % world != 0)
        with _one_device_on_cpu():
            transformer.enable_parallelism(config=config)
    handle = None
    if args.method != "none":
        handle = dit_accel.accelerate(pipe, args.method, **dict(_option(o) for o in args.option))
    generator = torch.Generator().manual_seed(args.seed)  # the same noise on every rank
    dist.barrier()
    start = time.perf_counter()
    output = pipe(**kwargs, generator=generator)
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        path = write_video(frames_of(output), args.out, args.fps)
        summary = {
            "out": str(path),
            "seconds": seconds,
            "world_size": world,
            "model": args.model,
            "method": args.method,
            "stats_rank0": handle.stats() if handle is not None else None,
        }
        Path(str(path) + ".json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"wrote {path} in {seconds:.1f} s on {world} process(es) (Ulysses degree {world})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
