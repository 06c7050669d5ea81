"""The accelerated transformer under torch.compile: runs, matches eager, and does not recompile every step."""

import torch
import torch._dynamo

import dit_accel
from dit_accel.testing import tiny_pipeline


def test_compiled_transformer_runs_without_per_step_recompiles():
    torch._dynamo.reset()
    pipe, kwargs = tiny_pipeline("wan")
    handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64, dense_steps=1)
    eager = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    transformer = pipe.transformer
    compiled = torch.compile(transformer, backend="aot_eager")
    pipe.transformer = compiled
    try:
        out = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
        frames_after_first = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        kwargs = dict(kwargs, num_inference_steps=5)
        pipe(**kwargs, generator=torch.Generator().manual_seed(1))
        frames_after_second = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        pipe.transformer = transformer
    stats = handle.stats()
    handle.remove()
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    assert stats["overall"]["sparse_calls"] > 0 and stats["overall"]["dense_reasons"]["dense_step"] > 0
    # more steps (and the dense->sparse switch) must not add graphs: the step lives outside the graph
    assert frames_after_second == frames_after_first
