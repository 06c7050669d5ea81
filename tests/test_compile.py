"""The accelerated transformer under torch.compile: one graph with no break, outputs and schedule equal to eager,
no per-step recompiles; the custom ops behind it agree with their fake implementations."""

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

import dit_accel
from dit_accel.kernels import ops
from dit_accel.testing import tiny_pipeline

_COUNTED = ("dense_calls", "sparse_calls", "refresh_calls", "pattern_builds", "pattern_reuses", "adaptive_refreshes")


def _frames(pipe, kwargs, seed: int = 0) -> torch.Tensor:
    return pipe(**kwargs, generator=torch.Generator().manual_seed(seed)).frames


def _compiled_run(pipe, kwargs, **compile_options) -> tuple[torch.Tensor, int, int]:
    """Frames of one pipeline call with the transformer compiled, and the graph breaks and graphs it took."""
    torch._dynamo.reset()
    counters.clear()
    transformer = pipe.transformer
    pipe.transformer = torch.compile(transformer, backend="aot_eager", **compile_options)
    try:
        out = _frames(pipe, kwargs)
    finally:
        pipe.transformer = transformer
    return out, sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


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


def test_compiled_accelerated_transformer_has_no_graph_break():
    """As many breaks and graphs as the compiled un-accelerated transformer (0 and 1), the same frames as eager,
    and the same schedule: rettention with a drift check, so refreshes, pattern reuse and the adaptive refresh
    read at the end of each forward all happen (an end_forward pruned from the graph or run early loses them)."""
    pipe, kwargs = tiny_pipeline("wan")
    kwargs = dict(kwargs, num_inference_steps=4)
    _, plain_breaks, plain_graphs = _compiled_run(pipe, kwargs)
    handle = dit_accel.accelerate(pipe, "rettention", min_tokens=64, dense_steps=1, refresh_drift=1e-6)
    try:
        eager = _frames(pipe, kwargs)
        before = handle.stats()["overall"]
        out, breaks, graphs = _compiled_run(pipe, kwargs)
        after = handle.stats()["overall"]
    finally:
        handle.remove()
        torch._dynamo.reset()
    assert (breaks, graphs) == (plain_breaks, plain_graphs) == (0, 1)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    assert before["sparse_calls"] > 0 and before["refresh_calls"] > 0 and before["adaptive_refreshes"] > 0
    assert {k: after[k] - before[k] for k in _COUNTED} == {k: before[k] for k in _COUNTED}


def test_fullgraph_compile_in_place_and_removal():
    """``transformer.compile(fullgraph=True)`` (which refuses any break) runs accelerated; after ``remove()`` the
    same compiled transformer gives the frames of a pipeline never accelerated."""
    pipe, kwargs = tiny_pipeline("wan")
    plain = _frames(pipe, kwargs)
    handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64, dense_steps=1)
    eager = _frames(pipe, kwargs)
    torch._dynamo.reset()
    pipe.transformer.compile(backend="aot_eager", fullgraph=True)
    try:
        out = _frames(pipe, kwargs)
        assert handle.stats()["overall"]["sparse_calls"] > 0
        handle.remove()
        removed = _frames(pipe, kwargs)
    finally:
        handle.remove()
        pipe.transformer._compiled_call_impl = None
        torch._dynamo.reset()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(removed, plain, atol=1e-5, rtol=1e-5)


def test_compiled_training_step_keeps_gradients():
    """With gradients the attention call stays an eager island (the op has no backward): same loss gradients."""
    pipe, kwargs = tiny_pipeline("wan")
    handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64, dense_steps=0)
    transformer = pipe.transformer
    calls = []
    grab = transformer.register_forward_pre_hook(lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True)
    _frames(pipe, dict(kwargs, num_inference_steps=1))
    grab.remove()
    args, call_kwargs = calls[0]
    weight = transformer.blocks[0].attn1.to_q.weight
    grads = []
    try:
        with torch.enable_grad():
            transformer.requires_grad_(True)
            for fn in (transformer, torch.compile(transformer, backend="aot_eager")):
                weight.grad = None
                fn(*args, **call_kwargs)[0].square().mean().backward()
                grads.append(weight.grad.clone())
    finally:
        transformer.requires_grad_(False)
        handle.remove()
        torch._dynamo.reset()
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


@pytest.fixture
def wan_accelerator():
    pipe, _ = tiny_pipeline("wan")
    handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64, dense_steps=0, num_steps=4)
    yield handle.accelerators["transformer"]
    handle.remove()


def _qkv(rng: torch.Generator, tokens: int = 256) -> tuple[torch.Tensor, ...]:
    # the dispatcher's layout: (B, N, H, D) tensors permuted to (B, H, N, D), so not contiguous
    return tuple(torch.randn(1, tokens, 2, 16, generator=rng).permute(0, 2, 1, 3) for _ in range(3))


def _attention_args(accelerator, q, k, v, site: int = 0) -> tuple:
    return (None, q, k, v, None, 0.0, False, None, False, accelerator._op_id, site)


def test_site_attention_op_matches_its_fake_and_the_site(wan_accelerator, rng):
    """torch.library.opcheck (schema, fake tensor, AOT) on dense and sparse calls; the op's output is the site's."""
    accelerator = wan_accelerator
    q, k, v = _qkv(rng)
    state = accelerator.tracker.state
    torch.library.opcheck(torch.ops.dit_accel.site_attention.default, _attention_args(accelerator, q, k, v))
    overall = accelerator.stats()["overall"]
    assert set(overall["dense_reasons"]) == {"outside_forward"} and overall["sparse_calls"] == 0
    state.active, state.step, state.num_steps = True, 2, 4
    torch.library.opcheck(torch.ops.dit_accel.site_attention.default, _attention_args(accelerator, q, k, v))
    assert accelerator.stats()["overall"]["sparse_calls"] > 0
    out = torch.ops.dit_accel.site_attention(*_attention_args(accelerator, q, k, v))
    fake = ops.site_attention_layout(q, v)
    assert (
        (out.shape, out.stride(), out.dtype)
        == (fake.shape, fake.stride(), fake.dtype)
        == (q.shape, q.stride(), q.dtype)
    )
    site = accelerator.sites[0]
    expected = site.attend(q, k, v, state=state, dense=lambda: F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert not torch.equal(out, F.scaled_dot_product_attention(q, k, v))  # the sparse path ran, not the dense one


def test_site_attention_op_gives_the_fake_layout_whatever_the_site_returns(wan_accelerator, rng):
    """A sparse kernel returns a contiguous (B, H, N, D) output; the op hands back the query's layout the fake
    promised (a compiled graph may take views that only fit that layout), with the same values."""
    accelerator = wan_accelerator
    q, k, v = _qkv(rng)
    state = accelerator.tracker.state
    state.active, state.step, state.num_steps = True, 2, 4
    direct = accelerator.attention_from_op(0, dict(query=q, key=k, value=v))
    assert direct.is_contiguous() and not q.is_contiguous()
    state.step = 3  # same pattern schedule for the op's call: reuse_pattern_every=1 builds again either way
    out = torch.ops.dit_accel.site_attention(*_attention_args(accelerator, q, k, v))
    assert out.stride() == q.stride()
    torch.testing.assert_close(out, direct, atol=0, rtol=0)


def test_state_ops_match_their_fakes_and_set_the_eager_state(wan_accelerator, rng):
    accelerator = wan_accelerator
    hidden = torch.randn(1, 16, 3, 32, 32, generator=rng)
    timestep = torch.tensor([999.0])
    args = (accelerator._op_id, 1, "0,timestep", [hidden, timestep], "", [], "", [])
    torch.library.opcheck(torch.ops.dit_accel.begin_forward.default, args)
    token = torch.ops.dit_accel.begin_forward(*args)
    state = accelerator.tracker.state
    assert state.active and state.layout is not None and state.layout.grid == (3, 16, 16)
    torch.library.opcheck(torch.ops.dit_accel.end_forward.default, (accelerator._op_id, token, hidden))
    assert not state.active


def test_ops_of_a_removed_accelerator_refuse_to_run(rng):
    pipe, _ = tiny_pipeline("wan")
    handle = dit_accel.accelerate(pipe, "blocktopk")
    accelerator = handle.accelerators["transformer"]
    key = accelerator._op_id
    handle.remove()
    q, k, v = _qkv(rng)
    with pytest.raises(RuntimeError, match="removed"):
        torch.ops.dit_accel.site_attention(None, q, k, v, None, 0.0, False, None, False, key, 0)
