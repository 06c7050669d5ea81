"""Time each attention backend on random block-sparse calls, then show what ``kernel_backend="auto"`` picks.

    PYTHONPATH=. python scripts/bench_auto.py                 # CPU: cpu, flex (eager), reference
    PYTHONPATH=. python scripts/bench_auto.py --device cuda   # GPU: triton, flex (compiled), reference

Each backend is checked against the reference first (the auto check) and then timed as ``auto`` times it (best of
three calls after the check call). The table is what decided which backends are ``auto``'s candidates per device.
"""

from __future__ import annotations

import argparse
import functools
import math
import warnings

import torch

from dit_accel import kernels
from dit_accel.kernels import auto, reference


def _lut(b: int, h: int, n: int, block: int, density: float, gen: torch.Generator):
    n_b = math.ceil(n / block)
    keep = max(1, round(density * n_b))
    scores = torch.rand(b, h, n_b, n_b, generator=gen)
    idx = scores.topk(keep, dim=-1).indices.sort(-1).values.to(torch.int32)
    return idx, torch.full((b, h, n_b), keep, dtype=torch.int32)


def _modules(device: torch.device) -> dict[str, object]:
    from dit_accel.kernels import cpu, flex

    out: dict[str, object] = {"flex": flex, "reference": reference}
    if device.type == "cpu":
        out = {"cpu": cpu, **out}
    else:
        from dit_accel.kernels import triton_block_sparse

        out = {"triton": triton_block_sparse, **out}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--shapes", default="1x2x1024x64,1x4x4096x64", help="BxHxNxD, comma-separated")
    parser.add_argument("--densities", default="0.1,0.3,0.6")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    modules = _modules(device)
    print(f"torch {torch.__version__}, {device}, {dtype}, threads {torch.get_num_threads()}")
    print("| shape | density | " + " | ".join(f"{m} ms" for m in modules) + " | auto picks |")
    print("|---|---|" + "---|" * (len(modules) + 1))
    for spec in args.shapes.split(","):
        b, h, n, d = (int(x) for x in spec.split("x"))
        for density in (float(x) for x in args.densities.split(",")):
            q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device, dtype) for _ in range(3))
            idx, counts = _lut(b, h, n, 64, density, gen)
            idx, counts = idx.to(device), counts.to(device)
            kw = dict(block_m=64, block_n=64)
            expected = reference.block_sparse_attention(q, k, v, idx, counts, **kw)
            cells = []
            for module in modules.values():
                call = functools.partial(module.block_sparse_attention, q, k, v, idx, counts, **kw)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # eager FlexAttention warns that it is not compiled
                    why = auto.disagreement(call(), expected, dtype)
                    cells.append("fails" if why else f"{auto._time(call, device) * 1e3:.1f}")
            auto.clear()
            with kernels.use_backend("auto") as policy:
                kernels.block_sparse_attention(q, k, v, idx, counts, **kw)
            print(f"| {spec} | {density:.2f} | " + " | ".join(cells) + f" | {next(iter(policy.used.values()))} |")


if __name__ == "__main__":
    main()
