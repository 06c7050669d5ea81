"""The attention probe on a tiny Wan transformer: exact for dense calls, measures sparse error and density."""

from __future__ import annotations

import pytest
import torch

import dit_accel
from dit_accel.eval import AttentionProbe
from dit_accel.testing import tiny_pipeline


@pytest.fixture(scope="module")
def transformer_inputs():
    pipe, _ = tiny_pipeline("wan")
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 2, 16, 16, generator=g),  # 2 x 8 x 8 = 128 tokens
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 16, 32, generator=g),
        "return_dict": False,
    }
    return pipe.transformer, inputs


def _run(transformer, inputs, method, **options):
    handle = dit_accel.accelerate(transformer, method, min_tokens=0, num_steps=1, **options)
    try:
        with AttentionProbe(handle, steps=None, layers=[1]) as probe:
            transformer(**inputs)
    finally:
        handle.remove()
    return probe


def test_probe_dense_is_exact_and_sparse_is_measured(transformer_inputs):
    transformer, inputs = transformer_inputs
    dense = _run(transformer, inputs, "dense")
    assert [e.layer for e in dense.entries] == [1]  # layer filter
    assert dense.entries[0].kind == "dense" and dense.entries[0].rel_error < 1e-5
    assert dense.calls == 2 and dense.attention_seconds() > 0  # both sites timed, one probed

    sparse = _run(transformer, inputs, "blocktopk", sparsity=0.5)
    (entry,) = sparse.entries
    assert entry.kind == "sparse" and entry.density == pytest.approx(0.5)
    assert 0 < entry.rel_error < 1
    summary = sparse.summary()
    assert summary["attn_rel_error"] == pytest.approx(entry.rel_error)
    assert summary["per_step_layer"][0]["layer"] == 1


def test_probe_step_selection(transformer_inputs):
    transformer, inputs = transformer_inputs
    handle = dit_accel.accelerate(transformer, "blocktopk", min_tokens=0, num_steps=1, sparsity=0.5)
    try:
        with AttentionProbe(handle, steps=()) as none:
            transformer(**inputs)
    finally:
        handle.remove()
    assert none.entries == [] and none.calls == 2
    # Observers are removed with the probe: the accelerator has none left.
    assert all(not acc.observers for acc in handle._accelerators.values())
