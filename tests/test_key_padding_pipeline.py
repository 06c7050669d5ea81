"""HunyuanVideo with a padded prompt (its (B, 1, 1, N) boolean self-attention mask) runs sparse, and exactly.

Before, every call with a mask that was not all true went dense (reason ``attn_mask``), after a host sync to find
out; a real prompt is always padded, so HunyuanVideo never ran sparse.
"""

from __future__ import annotations

import torch

import dit_accel
from dit_accel.testing import tiny_pipeline


def _run(pipe, kwargs):
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames


def test_tiny_hunyuan_prompt_is_padded():
    _, kwargs = tiny_pipeline("hunyuan_video")
    mask = kwargs["prompt_attention_mask"]
    assert mask.shape == (1, 80) and int(mask.sum()) == 20 and not mask[0, 20:].any()


def test_hunyuan_padded_prompt_runs_sparse_and_matches_masked_dense():
    """All live key blocks kept (sparsity 0): the sparse path must give the dense (masked SDPA) result; the
    fully padded last key block is out of the pattern, so the density is below 1."""
    pipe, kwargs = tiny_pipeline("hunyuan_video")
    base = _run(pipe, kwargs)
    with dit_accel.accelerate(pipe, "blocktopk", sparsity=0.0, min_tokens=64) as handle:
        out = _run(pipe, kwargs)
        overall = handle.stats()["overall"]
    assert overall["dense_calls"] == 0 and overall["sparse_calls"] > 0, overall["dense_reasons"]
    assert overall["block_density"] < 1.0  # 848 tokens, 14 key blocks: the 14th holds padding only
    torch.testing.assert_close(out, base, atol=1e-4, rtol=1e-4)


def test_attention_probe_compares_against_dense_under_the_calls_own_mask():
    """The probe's reference is masked like the call: with every live block kept, dense and sparse calls alike
    score about 0 (against unmasked dense attention a padded prompt's calls scored far from it)."""
    from dit_accel.eval.probe import AttentionProbe

    pipe, kwargs = tiny_pipeline("hunyuan_video")
    with dit_accel.accelerate(pipe, "blocktopk", sparsity=0.0, min_tokens=64, dense_steps=1) as handle:
        with AttentionProbe(handle, steps=None) as probe:
            _run(pipe, kwargs)
    kinds = {e.kind for e in probe.entries}
    assert kinds == {"dense", "sparse"}, kinds
    worst = max(e.rel_error for e in probe.entries)
    assert worst < 1e-4, worst


def test_hunyuan15_square_padding_mask_runs_sparse_and_matches_masked_dense():
    """HunyuanVideo 1.5 hands SDPA a (B, 1, N, N) mask, the outer product of its padding with itself (729 masked
    image tokens in text-to-video, padded ByT5 and MLLM tokens). Its first row is the key padding: with every
    live block kept the sparse path gives the masked dense result (the padded text rows, which the mask hides
    as queries, differ, but only ever feed padded tokens), and the padding-only key blocks are out of the pattern."""
    pipe, kwargs = tiny_pipeline("hunyuan_video15")
    base = _run(pipe, kwargs)
    with dit_accel.accelerate(pipe, "blocktopk", sparsity=0.0, min_tokens=64) as handle:
        out = _run(pipe, kwargs)
        overall = handle.stats()["overall"]
    assert overall["dense_calls"] == 0 and overall["sparse_calls"] > 0, overall["dense_reasons"]
    assert overall["block_density"] < 0.7  # 1,265 tokens in 20 key blocks: the last 11 hold padding only
    torch.testing.assert_close(out, base, atol=1e-4, rtol=1e-4)
