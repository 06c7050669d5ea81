"""Fine-tune SLA's per-site projections (and optionally LoRA on the attention projections) by distillation.

SLA's linear branch only helps once ``proj`` is trained (the paper fine-tunes the whole DiT). This script does the
cheap part without any data set, from the pipeline itself:

1. run the pipeline with the SLA method installed and record, at every sparse self-attention call, q, k, v as the
   site sees them (the on-policy inputs);
2. per sample, compute once (no gradient) the critical-block output O_s, the linear branch O_l, the kept-mass
   estimate alpha and the dense attention output O (the teacher);
3. fit each site's zero-initialised ``proj`` so that ``combine(O_s, O_l; proj, alpha)`` matches O (MSE, Adam).

With ``--lora-rank R`` it additionally trains rank-R LoRA adapters on to_q/to_k/to_v/to_out of every accelerated
attention site, end to end: the recorded transformer inputs are replayed with gradients and the sparse model's
output is matched to the dense transformer's output (needs the reference kernels: the Triton ones have no
backward; the script sets ``DIT_ACCEL_KERNELS=reference``).

    python scripts/finetune_sla.py --model tiny-wan --steps 200 --out sla_weights.safetensors
    python scripts/finetune_sla.py --model assets/toy-wan --lora-rank 4 --out toy_sla.safetensors

Load the result with ``dit_accel.compensation.load_sla_weights(handle, path)`` after ``accelerate(pipe, "sla-paper")``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

import dit_accel
from dit_accel import kernels
from dit_accel.compensation import combine_linear, load_sla_weights, save_sla_weights
from dit_accel.compensation.linear import add_lora, lora_parameters
from dit_accel.methods import ComposedMethod


def _methods(handle) -> dict[str, ComposedMethod]:
    out = {}
    for name, acc in handle.accelerators.items():
        if not isinstance(acc.method, ComposedMethod) or acc.method.config.compensation.kind != "linear":
            raise ValueError(f"method={handle.method!r} has no linear branch to fine-tune; use 'sla' or 'sla-paper'")
        out[name] = acc.method
    return out


def collect(pipe: Any, calls: list[dict[str, Any]], handle, max_samples: int = 64) -> list[dict[str, Any]]:
    """Run the pipeline with SLA installed; keep the inputs of its sparse calls and precompute the branches."""
    samples: list[dict[str, Any]] = []
    patched = []
    for component, method in _methods(handle).items():
        original = method.attend

        def spy(call, _orig=original, _method=method, _component=component):
            result = _orig(call)
            if result.kind == "sparse" and len(samples) < max_samples:
                samples.append(_branches(_method, call, _component))
            return result

        method.attend = spy
        patched.append((method, original))
    try:
        for i, kwargs in enumerate(calls):
            pipe(**kwargs, generator=torch.Generator().manual_seed(i))
    finally:
        for method, original in patched:
            method.attend = original
    return samples


@torch.no_grad()
def _branches(method: ComposedMethod, call, component: str) -> dict[str, Any]:
    cfg, cache = method.config, call.cache
    plan = method.plan(call)
    q, k, v = call.q, call.k, call.v
    if plan.perm is not None:
        q, k, v = (kernels.permute_tokens(x, plan.perm) for x in (q, k, v))
    b, h = q.shape[:2]
    pattern = cache.pattern
    idx, counts = method._lut(pattern, b, h)
    negligible = pattern.negligible
    if negligible is not None:
        negligible = negligible.expand(b, h, -1, -1)
    o_s, o_l, lse = kernels.sparse_linear_attention(
        q, k, v, idx, counts, block_m=cfg.block_m, block_n=cfg.block_n, negligible=negligible,
        feature_map=cfg.feature_map, scale=call.scale,
    )  # fmt: skip
    alpha = None
    if cfg.linear_weight == "mass":
        alpha = cache.statistics.alpha if cache.statistics is not None else None
        if alpha is None:
            n_kb = -(-q.shape[2] // cfg.block_n)  # the LUT may be narrower than the key blocks (top-k)
            outside = ~kernels.reference.selected_block_mask(idx, counts, n_kb)
            alpha = kernels.kept_mass(q, k, lse, outside, block_m=cfg.block_m, block_n=cfg.block_n, scale=call.scale)
    target, _ = kernels.dense_attention(q, k, v, scale=call.scale)
    return {
        "component": component, "site": call.site_index, "o_s": o_s.float(), "o_l": o_l.float(),
        "alpha": None if alpha is None else alpha.float(), "target": target.float(),
    }  # fmt: skip


def train_projections(handle, samples: list[dict[str, Any]], steps: int, lr: float) -> list[float]:
    """Adam on the per-site projections; returns the loss per step (mean over samples)."""
    methods = _methods(handle)
    params = []
    for sample in samples:
        method = methods[sample["component"]]
        layer = method.projections.get(sample["site"], sample["o_l"].shape[-1], sample["o_l"].device)
        params += [p for p in layer.parameters() if all(p is not q for q in params)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        total = 0.0
        for sample in samples:
            proj = methods[sample["component"]].projections.get(sample["site"], 0, sample["o_l"].device)
            pred = combine_linear(sample["o_s"], sample["o_l"], proj, sample["alpha"])
            loss = torch.mean((pred - sample["target"]) ** 2) / len(samples)
            loss.backward()
            total += float(loss.detach())
        opt.step()
        losses.append(total)
    for p in params:
        p.requires_grad_(False)
    for method in _methods(handle).values():
        method.projections.trained = True
    return losses


def record_transformer_inputs(pipe: Any, calls: list[dict[str, Any]], limit: int = 8) -> list[tuple[dict, Any]]:
    """(kwargs, dense output) of the transformer's forwards during dense pipeline runs (the LoRA teacher)."""
    transformer = pipe.transformer
    records: list[tuple[dict, Any]] = []

    def hook(module, args, kwargs, output):
        if len(records) < limit:
            sample = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            records.append(({**kwargs, "return_dict": False}, sample.detach().clone()))

    remove = transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        for i, kwargs in enumerate(calls):
            pipe(**kwargs, generator=torch.Generator().manual_seed(i))
    finally:
        remove.remove()
    return records


def train_lora(pipe: Any, handle, records: list[tuple[dict, Any]], rank: int, steps: int, lr: float) -> list[float]:
    """End-to-end: LoRA on the attention projections plus the per-site proj, sparse output vs dense output."""
    transformer = pipe.transformer
    add_lora(transformer, [site.module for acc in handle.accelerators.values() for site in acc.sites], rank)
    with torch.no_grad():  # create every site's proj
        transformer(**records[0][0])
    params = lora_parameters(transformer)
    for method in _methods(handle).values():
        params += list(method.projections.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        total = 0.0
        for kwargs, target in records:
            with torch.enable_grad():
                out = transformer(**kwargs)[0]
                loss = torch.mean((out.float() - target.float()) ** 2) / len(records)
                loss.backward()
            total += float(loss.detach())
        opt.step()
        losses.append(total)
    for p in params:
        p.requires_grad_(False)
    for method in _methods(handle).values():
        method.projections.trained = True
    return losses


def build(model: str) -> tuple[Any, dict[str, Any]]:
    if model == "tiny-wan":
        from dit_accel.testing import tiny_pipeline

        pipe, kwargs = tiny_pipeline("wan")
        kwargs["num_inference_steps"] = 3
        return pipe, kwargs
    from dit_accel.toy import ToyVideoPipeline

    pipe = ToyVideoPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(prompt="a red circle moves right over a blue background", num_frames=8, output_type="latent")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-wan", help="'tiny-wan' or a ToyVideoPipeline folder")
    parser.add_argument("--method", default="sla-paper")
    parser.add_argument("--sparsity", type=float, default=None)
    parser.add_argument("--runs", type=int, default=1, help="pipeline runs (different seeds) to collect from")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--out", default="sla_weights.safetensors")
    args = parser.parse_args(argv)
    if args.lora_rank:
        os.environ["DIT_ACCEL_KERNELS"] = "reference"
    pipe, kwargs = build(args.model)
    calls = [kwargs] * args.runs
    options = {"min_tokens": 64}
    if args.sparsity is not None:
        options["sparsity"] = args.sparsity
    records = record_transformer_inputs(pipe, calls) if args.lora_rank else []
    handle = dit_accel.accelerate(pipe, args.method, **options)
    start = time.time()
    samples = collect(pipe, calls, handle, args.samples)
    losses = train_projections(handle, samples, args.steps, args.lr)
    print(f"proj: {len(samples)} samples, loss {losses[0]:.4g} -> {losses[-1]:.4g} ({time.time() - start:.1f} s)")
    if args.lora_rank:
        lora_losses = train_lora(pipe, handle, records, args.lora_rank, max(1, args.steps // 10), args.lr * 0.1)
        print(f"lora: loss {lora_losses[0]:.4g} -> {lora_losses[-1]:.4g}")
    save_sla_weights(handle, args.out)
    print(f"saved {args.out}; load with dit_accel.compensation.load_sla_weights(handle, {args.out!r})")
    load_sla_weights(handle, args.out)  # round trip check


if __name__ == "__main__":
    main()
