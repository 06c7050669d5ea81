"""Helpers for the method tests: synthetic site calls with a chosen step, branch and layout (imported by them)."""

from __future__ import annotations

import math

import torch

from dit_accel.config import resolve_config
from dit_accel.layout import TokenLayout
from dit_accel.methods import SiteCall, build_method
from dit_accel.site_state import BranchState
from dit_accel.state import DenoiseState


def make_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config,
    *,
    layout: TokenLayout | None = None,
    step: int = 0,
    num_steps: int = 10,
    branch: str = "cond",
    cache: BranchState | None = None,
    site_index: int = 0,
) -> SiteCall:
    state = DenoiseState(step=step, num_steps=num_steps, branch=branch, layout=layout, active=True)
    return SiteCall(
        q=q, k=k, v=v, scale=None, config=config, state=state, layout=layout, site_index=site_index,
        site_name=f"site{site_index}", cache=BranchState() if cache is None else cache,
    )  # fmt: skip


def qkv(rng: torch.Generator, b: int, h: int, n: int, d: int = 16, sharp: float = 2.0):
    """Random q, k, v with peaked (not uniform) attention."""
    q = torch.randn(b, h, n, d, generator=rng) * sharp
    k = torch.randn(b, h, n, d, generator=rng)
    v = torch.randn(b, h, n, d, generator=rng)
    return q, k, v


def brute_attention(q, k, v, token_mask=None, scale=None):
    """Exact softmax attention with an optional bool token mask (N, N) or (B, H, N, N); float64."""
    s = (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale
    scores = torch.matmul(q.double(), k.double().transpose(-1, -2)) * s
    if token_mask is not None:
        scores = scores.masked_fill(~token_mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.matmul(torch.softmax(scores, -1), v.double()), lse


def token_mask_from_method(method, call) -> torch.Tensor:
    """The (B, H, N, N) token-level key set the method's cached pattern allows, in native token order."""
    plan = method.plan(call)
    cfg = call.config
    idx, counts = call.cache.pattern.kv_indices, call.cache.pattern.kv_counts
    n = call.q.shape[2]
    n_k = math.ceil(n / cfg.block_n)
    slot = torch.arange(idx.shape[-1])
    hits = torch.zeros(*idx.shape[:-1], n_k, dtype=torch.int32)
    hits.scatter_add_(-1, idx.long(), (slot < counts[..., None]).to(torch.int32))
    block_mask = hits > 0  # (B|1, H|1, n_q, n_k) in kernel order
    pos = torch.arange(n)
    tok = block_mask[..., pos // cfg.block_m, :][..., pos // cfg.block_n]  # kernel order
    if plan.perm is not None:
        inv = plan.inv
        tok = tok[..., inv, :][..., inv]
    return tok


def run_method(method_name: str, q, k, v, *, layout=None, step=0, cache=None, site_index=0, **options):
    cfg = resolve_config(method_name, **options)
    method = build_method(cfg)
    call = make_call(q, k, v, cfg, layout=layout, step=step, cache=cache, site_index=site_index)
    return method, call, method.attend(call)
