"""The optional xformers dense backend: routed to when chosen, refused clearly when not installed."""

import sys
import types

import pytest
import torch

import dit_accel
from dit_accel.testing import tiny_pipeline


def test_missing_xformers_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("dit_accel.api.xformers_available", lambda: False)
    pipe, _ = tiny_pipeline("wan")
    with pytest.raises(ValueError, match="dense_backend='xformers'.*pip install"):
        dit_accel.accelerate(pipe, "dense", dense_backend="xformers")


def test_dense_calls_go_to_xformers_when_chosen(monkeypatch):
    calls = []

    def memory_efficient_attention(q, k, v, scale=None):  # (B, N, H, D) like xformers
        calls.append(q.shape)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
        )
        return out.transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    pkg = types.ModuleType("xformers")
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr("dit_accel.api.xformers_available", lambda: True)
    pipe, kwargs = tiny_pipeline("wan")
    base = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    with dit_accel.accelerate(pipe, "dense", dense_backend="xformers") as handle:
        out = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
        dense_calls = handle.stats()["overall"]["dense_calls"]
    assert len(calls) == dense_calls > 0
    assert calls[0][1] == 768 and calls[0][2] == 2  # (B, N, H, D) layout handed to xformers
    torch.testing.assert_close(out, base, atol=1e-5, rtol=1e-5)
