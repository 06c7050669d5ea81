"""FreeSwim benchmark: the Wan2.1-1.3B transformer (random weights, bf16) at a 1088 x 1920 x 81 target
(21 x 68 x 120 = 171,360 tokens) from a 480 x 832 base (window 30 x 52 tokens over all frames).

Rows (each a transformer forward, i.e. one CFG branch, and a denoising-step estimate):

* ``dense``: stock SDPA everywhere (what FreeSwim's F branch costs);
* ``official``: the window at the official scheme's density: FreeSwim's per-token inward mask in raster order,
  coarsened to 128 x 128 blocks (FlexAttention's block size; it computes every partially active block in full),
  run through our block-sparse kernel so that only the pattern differs;
* ``ours-b64`` / ``ours-b128``: the inward window on 3D tiles (block-dense), through ``FreeSwimHooks``;
* ``flex`` (``--flex`` with ``--attention-only``): the official implementation itself,
  ``torch.nn.attention.flex_attention`` with the compiled per-token block mask, when it builds on this machine.

A FreeSwim step with cache is W conditional (attn2 from the cache) + W unconditional + F / cache_every; a dense CFG
step is two dense forwards. ``--attention-only`` times one self-attention call per row instead (cheap).

    python scripts/bench_freeswim.py --out bench_freeswim.json              # on a GPU
    python scripts/bench_freeswim.py --layers 4 --attention-only           # quicker
    python scripts/bench_freeswim.py --dry-run                             # tiny shapes on the CPU: smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from dit_accel import kernels
from dit_accel.layout import TokenLayout
from dit_accel.methods import ComposedMethod, Method, SiteCall, SparseResult
from dit_accel.pipelines.freeswim import Branch, FreeSwimHooks, FreeSwimOptions
from dit_accel.pipelines.freeswim_window import WindowGeometry, freeswim_scale, latent_grid, window_geometry
from dit_accel.state import DenoiseState

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip
TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=64, text_dim=32, ffn_dim=64, num_layers=2)


def official_block_mask(grid: tuple[int, int, int], half: tuple[int, int], block: int, device: str) -> torch.Tensor:
    """Bool (n_blocks, n_blocks): raster blocks holding a (query, key) pair of FreeSwim's per-token inward window
    (``init_mask_flex``: rows h - d_h - d_u .. h + d_h + d_b, cols likewise, all frames)."""
    f, h, w = grid
    d_h, d_w = half
    n = f * h * w

    def allowed(size: int, d: int) -> torch.Tensor:  # (size, size): query position -> allowed key positions
        c = torch.arange(size, device=device)
        below = torch.clamp(d - c, min=0)
        above = torch.clamp(d + c - size + 1, min=0)
        lo, hi = c - d - above, c + d + below
        return (c[None, :] >= lo[:, None]) & (c[None, :] <= hi[:, None])

    rows_ok, cols_ok = allowed(h, d_h), allowed(w, d_w)
    tokens = torch.arange(n, device=device)
    th, tw = tokens // w % h, tokens % w
    n_blocks = math.ceil(n / block)
    pad = n_blocks * block - n
    r = torch.nn.functional.pad(rows_ok[th].float(), (0, 0, 0, pad)).view(n_blocks, block, h)
    c = torch.nn.functional.pad(cols_ok[tw].float(), (0, 0, 0, pad)).view(n_blocks, block, w)
    reach = (torch.bmm(r.transpose(1, 2), c) > 0).view(n_blocks, h * w)  # union of the block's windows
    cover = torch.zeros(n_blocks, h * w, device=device)
    cover[tokens // block, th * w + tw] = 1.0
    return (reach.float() @ cover.T) > 0


class FixedMask(Method):
    """Block-sparse attention on one fixed block mask in the native token order (the official density)."""

    name = "fixed"

    def __init__(self, config: Any, mask: torch.Tensor, block: int) -> None:
        super().__init__(config)
        self.block = block
        self.lut = kernels.lut_from_mask(mask[None, None])
        self.density = float(mask.float().mean())

    def attend(self, call: SiteCall) -> SparseResult:
        b, h = call.q.shape[:2]
        idx, counts = (x.expand(b, h, *x.shape[2:]).contiguous() for x in self.lut)
        out = kernels.block_sparse_attention(
            call.q, call.k, call.v, idx, counts, block_m=self.block, block_n=self.block, scale=call.scale,
            return_lse=False,
        )  # fmt: skip
        return SparseResult(out=out, density=self.density)


def timed(fn: Callable[[], Any], device: str, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flex_attention_fn(grid: tuple[int, int, int], half: tuple[int, int], scale: float, device: str) -> Callable:
    """The official window: compiled FlexAttention with FreeSwim's per-token inward mask (raises if unavailable)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    f, h, w = grid
    d_h, d_w = half

    def mask_mod(b, hh, q_idx, kv_idx):
        qh, qw = q_idx // w % h, q_idx % w
        kh, kw = kv_idx // w % h, kv_idx % w
        d_b = torch.clamp(d_h - qh, min=0)
        d_u = torch.clamp(d_h + qh - h + 1, min=0)
        d_r = torch.clamp(d_w - qw, min=0)
        d_l = torch.clamp(d_w + qw - w + 1, min=0)
        return (kh >= qh - d_h - d_u) & (kh <= qh + d_h + d_b) & (kw >= qw - d_w - d_l) & (kw <= qw + d_w + d_r)

    n = f * h * w
    block_mask = create_block_mask(mask_mod, None, None, n, n, device=device, _compile=True)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, scale=scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=1088)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--base-height", type=int, default=480)
    parser.add_argument("--base-width", type=int, default=832)
    parser.add_argument("--layers", type=int, default=30, help="transformer blocks (30 in Wan2.1-1.3B)")
    parser.add_argument("--cache-every", type=int, default=2, help="guide step period for the step estimate")
    parser.add_argument("--blocks", default="64,128", help="our kernel block sizes to time")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--attention-only", action="store_true", help="time one self-attention call per row")
    parser.add_argument("--flex", action="store_true", help="with --attention-only: also time official FlexAttention")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    args = parser.parse_args()

    if args.dry_run:
        args.height, args.width, args.frames, args.base_height, args.base_width = 256, 256, 5, 128, 128
        args.layers, args.iters, args.warmup = 2, 1, 0
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = dict(TINY if args.dry_run else WAN_1_3B, num_layers=args.layers)
    grid = latent_grid(args.height, args.width, args.frames)
    base = (args.base_height // 16, args.base_width // 16)
    half = (base[0] // 2, base[1] // 2)  # the official d_h, d_w
    n = math.prod(grid)
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    scale = freeswim_scale(base[0] * base[1], head_dim)
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"grid {grid} = {n} tokens, window {base} over all frames, {card}, {dtype}")

    official = official_block_mask(grid, half, 128, device)
    token_density = (2 * half[0] + 1) * (2 * half[1] + 1) / (grid[1] * grid[2])
    factories: dict[str, Callable[[WindowGeometry], Method]] = {
        "official": lambda geo: FixedMask(geo.config(), official, 128),
    }
    for block in [int(b) for b in args.blocks.split(",") if b]:
        factories[f"ours-b{block}"] = None  # type: ignore[assignment]  # FreeSwimHooks' default method

    rows: list[dict[str, Any]] = []
    if args.attention_only:
        q, k, v = (torch.randn(1, heads, n, head_dim, device=device, dtype=dtype) for _ in range(3))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        dense_s = timed(lambda: sdpa(q, k, v, scale=scale), device, args.iters, args.warmup)
        rows.append({"name": "dense", "seconds": dense_s, "block_density": 1.0})
        layout = TokenLayout(grid)
        for name, factory in factories.items():
            block = 128 if name == "official" else int(name.removeprefix("ours-b"))
            geo = window_geometry(grid, base, block=block)
            method = factory(geo) if factory else ComposedMethod(geo.config())
            cache: dict[str, Any] = {}

            def call(method: Method = method, cache: dict[str, Any] = cache) -> SparseResult:
                state = DenoiseState(step=0, layout=layout, active=True)
                site = SiteCall(q=q, k=k, v=v, scale=scale, config=method.config, state=state, layout=layout,
                                site_index=0, site_name="attn1", cache=cache)  # fmt: skip
                return method.attend(site)

            seconds = timed(call, device, args.iters, args.warmup)
            rows.append({"name": name, "seconds": seconds, "block_density": float(call().density),
                         "tile": list(geo.tile), "window_span": list(geo.span)})  # fmt: skip
        if args.flex and device == "cuda":
            try:
                flex = flex_attention_fn(grid, half, scale, device)
                rows.append({"name": "flex", "seconds": timed(lambda: flex(q, k, v), device, args.iters, 1)})
            except Exception as exc:  # noqa: BLE001 - report, do not fail the benchmark
                rows.append({"name": "flex", "error": repr(exc)})
        for row in rows:
            if "seconds" in row:
                row["speedup"] = dense_s / row["seconds"]
    else:
        from diffusers import WanTransformer3DModel

        with torch.device(device):
            model = WanTransformer3DModel(**config).to(dtype).eval()
        latent = (1, 16, grid[0], args.height // 8, args.width // 8)
        inputs = dict(
            hidden_states=torch.randn(*latent, device=device, dtype=dtype),
            encoder_hidden_states=torch.randn(1, 512, config["text_dim"], device=device, dtype=dtype),
            timestep=torch.tensor([500.0], device=device),
            return_dict=False,
        )

        @torch.no_grad()
        def forward():
            return model(**inputs)

        dense_s = timed(forward, device, args.iters, args.warmup)
        rows.append({"name": "dense", "forward_s": dense_s, "step_s": 2 * dense_s, "block_density": 1.0})
        full_s = None
        for name, factory in factories.items():
            block = 128 if name == "official" else int(name.removeprefix("ours-b"))
            opts = FreeSwimOptions(block_size=block, cache_every=args.cache_every)
            hooks = FreeSwimHooks(model, base, opts, scale=scale, method_factory=factory)
            with hooks:
                hooks.force_branch = Branch.FULL
                forward()  # fills the attn2 cache (and builds nothing else)
                if full_s is None:
                    full_s = timed(forward, device, args.iters, args.warmup)
                hooks.force_branch = Branch.WINDOW_COND
                cond_s = timed(forward, device, args.iters, args.warmup)
                hooks.force_branch = Branch.WINDOW_UNCOND
                uncond_s = timed(forward, device, args.iters, args.warmup)
                stats = hooks.stats.as_dict()
                geo = hooks.geometry
            rows.append({
                "name": name, "forward_s": uncond_s, "cond_forward_s": cond_s,
                "step_s": cond_s + uncond_s + full_s / args.cache_every, "block_density":
                stats["window_block_density"], "tile": list(geo.tile), "window_span": list(geo.span),
                "cache_bytes": stats["cache_bytes_peak"],
            })  # fmt: skip
        rows.insert(1, {"name": "full branch (F)", "forward_s": full_s, "block_density": 1.0})
        for row in rows:
            if "step_s" in row:
                row["step_speedup"] = rows[0]["step_s"] / row["step_s"]

    result = {
        "card": card, "dtype": str(dtype), "grid": list(grid), "tokens": n, "window": list(base),
        "official_token_density": token_density, "official_block_density_128": float(official.float().mean()),
        "layers": args.layers, "cache_every": args.cache_every, "attention_only": args.attention_only, "rows": rows,
    }  # fmt: skip
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    print(
        f"official window: token density {token_density:.3f}, 128-block density "
        f"{result['official_block_density_128']:.3f}"
    )
    key = "seconds" if args.attention_only else "forward_s"
    print(f"{'row':18s} {'s/call' if args.attention_only else 's/forward':>10s} {'density':>8s} {'s/step':>9s} "
          f"{'speed-up':>8s}")  # fmt: skip
    for row in rows:
        if key not in row:
            print(f"{row['name']:18s} {row.get('error', '')}")
            continue
        step = row.get("step_s")
        speed = row.get("step_speedup", row.get("speedup"))
        density = row.get("block_density")
        print(
            f"{row['name']:18s} {row[key]:10.3f} {'-' if density is None else f'{density:.3f}':>8s} "
            f"{'-' if step is None else f'{step:.3f}':>9s} {'-' if speed is None else f'{speed:.2f}x':>8s}"
        )


if __name__ == "__main__":
    main()
