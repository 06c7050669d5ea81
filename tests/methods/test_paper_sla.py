"""``sla-paper`` selects exactly what SLA's official code selects, and computes what it computes.

The official rule, re-implemented here from its description (thu-ml/SLA, branch SLA-1, commit 325cc75,
``sparse_linear_attention/utils.py``, ``get_block_map`` and ``mean_pool``; ``core.py``
``SparseLinearAttention.forward``): keys minus their mean over all tokens (smooth-K); the mean of each block of
64 queries and 64 centred keys (a ragged last block averages the tokens it has); block scores are the products of
those means; each query block keeps the top ``min(K, int(topk * K))`` key blocks, with no block forced; the output
is softmax attention over the kept blocks plus ``proj_l`` of linear attention (phi = softmax over the head dim)
over all other blocks (SLA-1's kernel), ``proj_l`` zero-initialised.
"""

from __future__ import annotations

import math

import pytest
import torch
from _method_helpers import brute_attention, make_call

from dit_accel import kernels
from dit_accel.config import resolve_config
from dit_accel.methods import build_method


def official_block_map(q: torch.Tensor, k: torch.Tensor, topk_ratio: float, block: int = 64) -> torch.Tensor:
    """bool (B, H, n_q, n_k): the official selection (see the module docstring)."""
    centred = k - k.mean(dim=-2, keepdim=True)

    def pooled(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-2]
        blocks = [x[..., i : i + block, :].mean(dim=-2) for i in range(0, n, block)]
        return torch.stack(blocks, dim=-2)

    score = pooled(q) @ pooled(centred).transpose(-1, -2)
    n_k = score.shape[-1]
    keep = min(n_k, int(topk_ratio * n_k))
    mask = torch.zeros_like(score, dtype=torch.bool)
    return mask.scatter_(-1, torch.topk(score, keep, dim=-1).indices, True)


def official_output(q, k, v, block_map, proj: torch.nn.Linear | None, block: int = 64) -> torch.Tensor:
    n = q.shape[-2]
    pos = torch.arange(n)
    token_map = block_map[..., pos // block, :][..., pos // block]  # (B, H, N, N)
    o_s, _ = brute_attention(q, k, v, token_map)
    if proj is None:
        return o_s
    phi_q, phi_k = torch.softmax(q.double(), -1), torch.softmax(k.double(), -1)
    outside = (~token_map).double()
    weights = (phi_q @ phi_k.transpose(-1, -2)) * outside  # linear attention over the other blocks only
    o_l = (weights @ v.double()) / weights.sum(-1, keepdim=True)
    return o_s + proj.double()(o_l)


def _structured(rng: torch.Generator, n_blocks: int, n: int, d: int = 16):
    """Each query block aligned with the keys of a block 7 further on, not with its own: a forced diagonal block
    (our own default) would change the selection."""
    centres = torch.randn(n_blocks, d, generator=rng) * 3
    pos = torch.arange(n) // 64
    q = centres[(pos + 7) % n_blocks] + 0.3 * torch.randn(1, 2, n, d, generator=rng)
    k = centres[pos] + 0.3 * torch.randn(1, 2, n, d, generator=rng)
    v = torch.randn(1, 2, n, d, generator=rng)
    return q, k, v


@pytest.mark.parametrize(
    ("n", "topk_ratio"),
    [
        (64 * 29 + 5, 0.05),  # K = 30: int(1.5) = 1 block where rounding would keep 2
        (64 * 32 + 40, 0.2),  # K = 33: int(6.6) = 6 where rounding would keep 7
        (64 * 24, 0.25),  # K = 24, no ragged block: exactly 6
    ],
)
@pytest.mark.parametrize("inputs", ["random", "structured"])
def test_selection_and_output_match_the_official_code(rng, n, topk_ratio, inputs):
    n_blocks = math.ceil(n / 64)
    if inputs == "random":
        q, k, v = (torch.randn(1, 2, n, 16, generator=rng) for _ in range(3))
        q = q * 2
    else:
        q, k, v = _structured(rng, n_blocks, n)
    cfg = resolve_config("sla-paper", sparsity=1.0 - topk_ratio, min_tokens=0)
    method = build_method(cfg)
    call = make_call(q, k, v, cfg)
    result = method.attend(call)
    ours = kernels.reference.selected_block_mask(
        call.cache.pattern.kv_indices, call.cache.pattern.kv_counts, n_blocks
    ).expand(1, 2, -1, -1)
    theirs = official_block_map(q, k, topk_ratio)
    assert int(theirs[0, 0, 0].sum()) == int(topk_ratio * n_blocks)
    assert torch.equal(ours, theirs)
    # proj_l zero-initialised: the output is the sparse branch alone
    torch.testing.assert_close(result.out.double(), official_output(q, k, v, theirs, None), atol=1e-5, rtol=1e-5)
    # a trained proj_l adds the linear branch over every block that was not kept (SLA-1)
    proj = method.projections.get(0, 16, q.device)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(16, 16, generator=rng) * 0.5)
        proj.bias.copy_(torch.randn(16, generator=rng) * 0.1)
    method.projections.trained = True
    out = method.attend(make_call(q, k, v, cfg, step=1, cache=call.cache)).out
    torch.testing.assert_close(out.double(), official_output(q, k, v, theirs, proj), atol=1e-4, rtol=1e-4)


def test_the_paper_preset_differs_from_ours_where_the_official_code_does():
    """What sla-paper turns off stays available in ``sla`` and ``blocktopk``: the forced diagonal block and
    rounding half up."""
    paper, ours = resolve_config("sla-paper"), resolve_config("blocktopk")
    assert (paper.self_block, paper.keep_rounding, paper.negligible) == (False, "floor", 0.0)
    assert (ours.self_block, ours.keep_rounding) == (True, "half_up")
    assert resolve_config("sla", negligible=0.1).negligible == 0.1  # the paper's negligible class stays an option
