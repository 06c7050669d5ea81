"""What ``tile_permutation="per_forward"`` saves: the per-call gather / scatter against the sparse call itself.

    PYTHONPATH=. python scripts/bench_token_order.py                       # Wan2.1-1.3B head layout, CPU
    PYTHONPATH=. python scripts/bench_token_order.py --frames 5 --rows 30 --cols 52 --device cuda --dtype bfloat16

Per sparse call ``per_call`` gathers q, k, v into tile order and scatters the output back (4 permutations of
(B, H, N, D)); ``per_forward`` instead permutes the hidden states (B, N, C) once at the patch embedding, the RoPE
tables once, and un-permutes the output projection's (B, N, C') once per forward. Prints the milliseconds of each
piece (best of ``--repeats``) and of a block-sparse call at ``--density``, and the whole-forward balance for
``--layers`` sparse layers.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from dit_accel import kernels
from dit_accel.layout import tile_permutation


def _best(fn, device: torch.device, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--cols", type=int, default=52)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--out-channels", type=int, default=64, help="proj_out width (Wan: 16 x 1 x 2 x 2)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    grid = (args.frames, args.rows, args.cols)
    n, h, d = math.prod(grid), args.heads, args.head_dim
    perm = tile_permutation(grid, (1, 8, 8), device)
    inv = kernels.inverse_permutation(perm)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, h, d, generator=gen).to(device, dtype).transpose(1, 2) for _ in range(3))
    hidden = torch.randn(1, h * d, *grid, generator=gen).to(device, dtype)  # the patch embedding's output
    rope = torch.randn(1, n, 1, d, generator=gen).to(device)  # float32, as Wan keeps RoPE
    proj = torch.randn(1, n, args.out_channels, generator=gen).to(device, dtype)
    n_b = math.ceil(n / 64)
    keep = max(1, round(args.density * n_b))
    idx = torch.rand(1, h, n_b, n_b, generator=gen).topk(keep, -1).indices.sort(-1).values.to(torch.int32)
    idx, counts = idx.to(device), torch.full((1, h, n_b), keep, dtype=torch.int32, device=device)

    def per_call():
        qt, kt, vt = (kernels.permute_tokens(x, perm) for x in (q, k, v))
        return kernels.permute_tokens(qt, inv)  # the scatter of an output shaped like q

    def per_forward():
        hidden.flatten(2).index_select(2, perm)
        rope.index_select(1, perm), rope.index_select(1, perm)  # cos and sin
        proj.index_select(1, inv)

    def sparse():
        kernels.block_sparse_attention(q, k, v, idx, counts, block_m=64, block_n=64)

    gather = _best(per_call, device, args.repeats)
    once = _best(per_forward, device, args.repeats)
    call = _best(sparse, device, args.repeats)
    print(f"torch {torch.__version__}, {device}, {dtype}, threads {torch.get_num_threads()}")
    print(f"grid {grid} (N={n}), heads {h}, head dim {d}, density {args.density}, {args.layers} layers")
    print(f"per call : gather q, k, v + scatter out  {gather:8.2f} ms  ({100 * gather / call:.1f} % of the call)")
    print(f"           block-sparse call (fixed)    {call:8.2f} ms")
    print(f"per forward: hidden, RoPE, proj_out     {once:8.2f} ms")
    saved = args.layers * gather - once
    total = args.layers * (call + gather)
    print(f"per forward saved: {saved:.2f} ms of {total:.2f} ms of sparse attention ({100 * saved / total:.1f} %)")


if __name__ == "__main__":
    main()
