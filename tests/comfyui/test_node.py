"""The ComfyUI node against stand-in comfy modules: installation, chaining, routing, callbacks, registration."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch

from dit_accel.methods import SiteCall, build_method
from dit_accel.site_state import BranchState
from dit_accel.state import DenoiseState
from dit_accel.testing import HostSyncCounter

OVERRIDE = "optimized_attention_override"
SIGMAS = [1.0, 0.75, 0.5, 0.25, 0.0]  # 4 steps; with start_percent=0.5 steps 2 and 3 are in the window


def _patch(model):
    return model.model_options["transformer_options"][OVERRIDE]._dit_accel_patch


def _recording_previous(log: list, tag: str = "previous", bias: float = 0.0):
    """An override of another node: logs each call (kind, sigma) and may add ``bias`` (another backend's numerics)."""

    def previous(func, *args, **kwargs):
        q, k = args[0], args[1]
        options = kwargs["transformer_options"]
        sigma = float(options["sigmas"].max()) if "sigmas" in options else None
        log.append((tag, "self" if q.shape == k.shape else "cross", sigma))
        return func(*args, **kwargs) + bias

    return previous


def _in_forward(comfy, patched, call, *, sigma: float = 0.5, x_shape=(1, 4, 2, 16, 16)):
    """Run ``call(transformer_options)`` inside one model forward as ComfyUI's sampler makes it: prepare-state, a
    fresh transformer_options with sigmas / sample_sigmas / cond_or_uncond / block_index, the DIFFUSION_MODEL
    wrappers around it."""
    options = dict(patched.model_options["transformer_options"])
    options.update(sigmas=torch.tensor([sigma]), sample_sigmas=torch.tensor(SIGMAS), cond_or_uncond=[0], block_index=1)
    patched.prepare_state(options["sigmas"])
    wrappers = [fn for fns in patched.wrappers.get("diffusion_model", {}).values() for fn in fns]
    executor = comfy.WrapperExecutor(lambda *a, **k: call(a[5]), comfy.FakeWan, wrappers)
    return executor.execute(torch.zeros(x_shape), options["sigmas"], None, None, None, options)


def test_override_installed_and_chained_without_touching_the_input(comfy):
    base = comfy.ModelPatcher(comfy.FakeWan())
    log: list = []
    previous = _recording_previous(log)
    base.model_options["transformer_options"][OVERRIDE] = previous

    (patched,) = comfy.package.NODE_CLASS_MAPPINGS["DiTSparseAttention"]().patch(
        base, "blocktopk", 0.5, 0.5, 1.0, "", 0
    )

    assert patched is not base
    assert base.model_options["transformer_options"] == {OVERRIDE: previous}  # input MODEL unchanged
    patch = _patch(patched)
    assert patch.fallback(patched.model_options["transformer_options"]) is previous
    assert not hasattr(patch, "previous")  # the fallback belongs to the model's options, not the shared patch
    assert comfy.node.KEY in patched.wrappers["diffusion_model"]
    assert comfy.node.KEY in patched.callbacks[comfy.CallbacksMP.ON_PREPARE_STATE]
    assert comfy.node.KEY in patched.callbacks[comfy.CallbacksMP.ON_CLEANUP]
    assert patch.config.sparsity == 0.5 and patch.config.min_tokens == 0


def test_routing_cross_attention_and_window_go_to_previous(comfy):
    base = comfy.ModelPatcher(comfy.FakeWan())
    log: list = []
    base.model_options["transformer_options"][OVERRIDE] = _recording_previous(log)
    patched = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.5, 1.0, "", 0)
    patch = _patch(patched)

    comfy.sample(patched, SIGMAS)

    cross = [s for _, kind, s in log if kind == "cross"]
    self_prev = sorted({s for _, kind, s in log if kind == "self"})
    assert len(cross) == 4 * 2  # every cross-attention call of 4 steps x 2 blocks was declined
    assert self_prev == [0.75, 1.0]  # only the out-of-window steps' self-attention reached the previous override
    assert patch.sparse_calls == 2 * 2  # steps 2, 3 x blocks 0, 1 went through dit_accel
    assert patch.dense_reasons["outside_window"] == 4
    assert patch.dense_reasons["cross_attention"] == 8
    assert patch.stats()["block_density"] == 0.5
    assert patch.window is None  # the sampled model's window is dropped by the clean-up


def test_dense_blocks_and_min_tokens_decline(comfy):
    base = comfy.ModelPatcher(comfy.FakeWan())
    patched = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.0, 1.0, "0", 0)
    patch = _patch(patched)
    comfy.sample(patched, SIGMAS)
    assert patch.dense_reasons["dense_layer"] == 4 and patch.sparse_calls == 4  # block 0 dense, block 1 sparse

    short = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.0, 1.0, "", 4096)
    patch = _patch(short)
    comfy.sample(short, SIGMAS)
    assert patch.sparse_calls == 0 and patch.dense_reasons["min_tokens"] == 8


def test_block_index_counted_when_comfyui_does_not_set_it(comfy):
    # ComfyUI < 0.5 sets no transformer_options["block_index"]: the self-attention calls of a forward are counted
    base = comfy.ModelPatcher(comfy.FakeWan(block_info=False))
    patched = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.0, 1.0, "1", 0)
    patch = _patch(patched)
    comfy.sample(patched, SIGMAS, cfg=True)
    assert [site.name for site in patch.sites.sites] == ["blocks.0", "blocks.1"]  # per forward, cond and uncond
    assert patch.dense_reasons["dense_layer"] == 4 * 2 and patch.sparse_calls == 4 * 2


def test_in_window_self_attention_runs_the_dit_accel_method(comfy):
    base = comfy.ModelPatcher(comfy.FakeWan())
    patched = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.0, 1.0, "", 0)
    patch = _patch(patched)
    g = torch.Generator().manual_seed(1)
    b, s, heads, d = 1, 128, 2, 16  # 128 video tokens: the (2, 8, 8) grid of a [1, 4, 2, 16, 16] latent
    q, k, v = (torch.randn(b, s, heads * d, generator=g) for _ in range(3))

    out = _in_forward(comfy, patched, lambda options: comfy.attention(q, k, v, heads, transformer_options=options))

    qh, kh, vh = (t.view(b, s, heads, d).transpose(1, 2) for t in (q, k, v))
    state = DenoiseState(step=2, num_steps=4, branch="0", active=True)
    call = SiteCall(qh, kh, vh, None, patch.config, state, None, 1, "blocks.1", BranchState())
    expected = build_method(patch.config).attend(call).out.transpose(1, 2).reshape(b, s, heads * d)
    dense = comfy.attention(q, k, v, heads, transformer_options={})
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, dense, atol=1e-3)  # it really was sparse

    # The (B, H, S, D) layout ComfyUI uses with skip_reshape / skip_output_reshape works the same.
    patch.sites.new_generation()

    def four_d(options):
        flags = {"skip_reshape": True, "skip_output_reshape": True}
        return comfy.attention(qh, kh, vh, heads, transformer_options=options, **flags)

    out4 = _in_forward(comfy, patched, four_d)
    assert torch.allclose(out4.transpose(1, 2).reshape(b, s, heads * d), expected, atol=1e-5)


def test_identical_runs_give_identical_outputs_with_a_later_override(comfy):
    # bug: prepare-state re-installed ours into the sampled clone's own model_options and kept the later node's
    # override on the shared patch, so the first run went later -> ours -> later and the second ours -> later
    base = comfy.ModelPatcher(comfy.FakeWan())
    patched = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.5, 1.0, "", 0)
    patch = _patch(patched)
    later = patched.clone()  # e.g. an attention-backend node after ours, with its own numerics
    log: list = []
    foreign = _recording_previous(log, "later", bias=1e-3)
    later.model_options["transformer_options"][OVERRIDE] = foreign

    runs = []
    for _ in range(2):
        del log[:]
        before = patch.stats()
        out = comfy.sample(later, SIGMAS)
        after = patch.stats()
        runs.append((out, len(log), after["sparse_calls"] - before["sparse_calls"]))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    assert runs[0][1:] == runs[1][1:] == (4 * 2 + 2 * 2, 2 * 2)  # cross + out-of-window self calls; sparse calls
    assert later.model_options["transformer_options"][OVERRIDE] is foreign  # the later model is left as it was


def test_each_clone_falls_back_to_its_own_later_override(comfy):
    # bug: the fallback lived on the patch every clone shares, so one branch's override leaked into the other
    base = comfy.ModelPatcher(comfy.FakeWan())
    log: list = []
    base.model_options["transformer_options"][OVERRIDE] = _recording_previous(log, "below")
    patched = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.5, 1.0, "", 0)
    one, two = patched.clone(), patched.clone()
    one.model_options["transformer_options"][OVERRIDE] = _recording_previous(log, "one")
    two.model_options["transformer_options"][OVERRIDE] = _recording_previous(log, "two")

    seen = {}
    for name, model in (("one", one), ("two", two), ("one again", one), ("patched", patched)):
        del log[:]
        comfy.sample(model, SIGMAS)
        seen[name] = sorted({tag for tag, _, _ in log})
    assert seen == {"one": ["one"], "two": ["two"], "one again": ["one"], "patched": ["below"]}


def test_a_later_override_wrapping_ours_reaches_ours_and_the_one_below(comfy):
    base = comfy.ModelPatcher(comfy.FakeWan())
    log: list = []
    base.model_options["transformer_options"][OVERRIDE] = _recording_previous(log, "below")
    patched = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.5, 1.0, "", 0)
    ours = patched.model_options["transformer_options"][OVERRIDE]
    patch = ours._dit_accel_patch

    def wrapping(func, *args, **kwargs):  # a later node chaining on top of ours
        log.append(("wrapping", None, None))
        return ours(func, *args, **kwargs)

    later = patched.clone()
    later.model_options["transformer_options"][OVERRIDE] = wrapping
    comfy.sample(later, SIGMAS)  # no infinite recursion through wrapping -> ours -> wrapping
    declined = 4 * 2 + 2 * 2  # cross-attention and out-of-window self-attention
    assert sum(tag == "wrapping" for tag, _, _ in log) == declined
    assert sum(tag == "below" for tag, _, _ in log) == declined  # ... and the override below ours still runs
    assert patch.sparse_calls == 2 * 2
    assert patch.install(patched.model_options["transformer_options"]) is None
    assert patch.fallback(patched.model_options["transformer_options"]) is not ours  # never chained onto itself


def test_cleanup_resets(comfy):
    base = comfy.ModelPatcher(comfy.FakeWan())
    patched = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.0, 1.0, "", 0)
    patch = _patch(patched)
    patched.prepare_state(torch.tensor([1.0]))
    assert patch.window == (1.0, 0.0)
    patch.sites.site(0).branches["0"] = BranchState()
    patched.cleanup()
    assert not any(site.branches for site in patch.sites.sites) and patch.window is None


def test_window_follows_a_shift_node_placed_after_the_node(comfy):
    # bug: start/end percent became sigmas when the node ran, from the unshifted model_sampling
    base = comfy.ModelPatcher(comfy.FakeWan())
    patched = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.5, 1.0, "", 0)
    patch = _patch(patched)
    shifted = comfy.model_sampling_sd3(patched, 8.0)
    sigmas = comfy.ModelSamplingFlow(8.0).schedule(4)  # [1.0, 0.96, 0.889, 0.727, 0.0]: steps 2, 3 from 0.5 on

    comfy.sample(shifted, sigmas)
    assert patch.sparse_calls == 2 * 2 and patch.dense_reasons["outside_window"] == 2 * 2

    comfy.sample(patched, sigmas)  # the unshifted model: percent 0.5 is sigma 0.5, no step of this schedule
    assert patch.sparse_calls == 2 * 2 and patch.dense_reasons["outside_window"] == 2 * 2 + 4 * 2


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0, 12.0, 17.0])
def test_float32_sigma_on_the_window_edges_is_inside(comfy, shift):
    # sigmas reach the model as float32 tensors, percent_to_sigma gives float64: float32(edge) may read above the
    # start edge (e.g. float32(0.6) = 0.60000002) or below the end edge; both count as on the edge
    sampling = comfy.ModelSamplingFlow(shift)
    above = below = 0
    for i in range(1, 100):
        edge = sampling.percent_to_sigma(i / 100)
        sigma = torch.tensor([edge], dtype=torch.float32).item()
        above, below = above + (sigma > edge), below + (sigma < edge)
        assert comfy.node.in_sigma_window(sigma, edge, 0.0), (shift, i, sigma, edge)  # start edge
        assert comfy.node.in_sigma_window(sigma, 1.0, edge), (shift, i, sigma, edge)  # end edge
        assert not comfy.node.in_sigma_window(edge * (1 + 1e-5), edge, 0.0)  # a real step outside stays out
        assert not comfy.node.in_sigma_window(edge * (1 - 1e-5), 1.0, edge)
    assert above and below  # both directions of rounding were exercised


def test_float32_sigma_on_the_window_edge_is_inside_end_to_end(comfy):
    base = comfy.ModelPatcher(comfy.FakeWan())
    patched = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.4, 1.0, "", 0)
    patch = _patch(patched)
    assert torch.tensor(0.6).item() > comfy.FakeWan().model_sampling.percent_to_sigma(0.4) == 0.6
    comfy.sample(patched, [1.0, 0.6, 0.2, 0.0])  # sigma 0.6 is the start of the window
    assert patch.sparse_calls == 2 * 2 and patch.dense_reasons["outside_window"] == 2


def test_the_presets_dense_steps_apply(comfy):
    # vmoba-paper keeps its first 25 % of steps dense: step 0 of 4; an explicit dense_steps=2 keeps steps 0 and 1
    for method, options, dense in (("vmoba-paper", {}, 1), ("blocktopk", {"dense_steps": 2}, 2)):
        base = comfy.ModelPatcher(comfy.FakeWan())
        patched = comfy.node.apply_sparse_attention(base, method, -1, 0.0, 1.0, "", 0, **options)
        patch = _patch(patched)
        comfy.sample(patched, SIGMAS, cfg=True)
        stats = patch.stats()
        assert stats["dense_reasons"]["dense_step"] == dense * 2 * 2, (method, stats)  # 2 blocks x 2 CFG passes
        assert stats["sparse_calls"] == (4 - dense) * 2 * 2, (method, stats)


_BAD_INPUTS = [
    ({"start_percent": 0.8, "end_percent": 0.2}, "start_percent"),
    ({"dense_blocks": "a-3"}, "dense_blocks"),
    ({"dense_blocks": "5-2"}, "dense_blocks"),
    ({"dense_blocks": "-1"}, "dense_blocks"),
    ({"start_percent": 1.5}, "start_percent"),  # ComfyUI skips its min/max check for inputs validated here
]


@pytest.mark.parametrize("v3", [False, True])
@pytest.mark.parametrize("bad, widget", _BAD_INPUTS)
def test_bad_inputs_are_rejected_when_the_prompt_is_queued(comfy, v3, bad, widget):
    if v3:
        (node_cls,) = asyncio.run(asyncio.run(comfy.package.comfy_entrypoint()).get_node_list())
    else:
        node_cls = comfy.package.NODE_CLASS_MAPPINGS["DiTSparseAttention"]
    good = {"method": "blocktopk", "sparsity": 0.9, "start_percent": 0.2, "end_percent": 1.0}
    good.update(dense_blocks="0, 1, 28-29", min_tokens=4096)
    assert comfy.validate(node_cls, good, v3=v3) == []
    errors = comfy.validate(node_cls, {**good, **bad}, v3=v3)
    assert errors and all(e["type"] == "custom_validation_failed" for e in errors), errors
    message = errors[0]["details"].split(" - ", 1)[1]
    assert message.startswith(f"{widget}="), message  # the message names the widget
    with pytest.raises(ValueError, match=widget):  # and running the node anyway refuses the same way
        comfy.node.apply_sparse_attention(
            comfy.ModelPatcher(comfy.FakeWan()),
            "blocktopk",
            0.9,
            bad.get("start_percent", 0.2),
            bad.get("end_percent", 1.0),
            bad.get("dense_blocks", ""),
            0,
        )


def test_validation_parses_dense_blocks_like_the_config():
    from dit_accel import AccelConfig
    from dit_accel.pipelines.comfyui.node import validate_node_inputs

    for text in ("", "0", "0, 1, 28-29", " 3 ,4-4"):
        assert validate_node_inputs(0.0, 1.0, text) is True
        AccelConfig(dense_layers=text)  # accepted by the library too
    for text in ("a-3", "5-2", "-1", "1.5"):
        assert isinstance(validate_node_inputs(0.0, 1.0, text), str)
        with pytest.raises(ValueError):
            AccelConfig(dense_layers=text)


def _count_syncs(comfy, start_percent: float, steps: int) -> tuple[dict[str, int], int]:
    base = comfy.ModelPatcher(comfy.FakeWan())
    patched = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, start_percent, 1.0, "", 0)
    patch = _patch(patched)
    counter = HostSyncCounter()
    for name, where in (("_attend", "attention"), ("_begin_forward", "forward")):
        original = getattr(patch, name)

        def spied(*args, _original=original, _where=where, **kwargs):
            outer, counter.where = counter.where, _where
            try:
                return _original(*args, **kwargs)
            finally:
                counter.where = outer

        setattr(patch, name, spied)  # on this instance only
    with counter:
        comfy.sample(patched, comfy.ModelSamplingFlow(3.0).schedule(steps), cfg=True)
    return counter.counts, patch.sparse_calls


def test_no_host_sync_per_attention_call(comfy):
    # bug: every attention call read the sigma (float(tensor)) and the schedule (.tolist()) to the host
    declined, sparse = _count_syncs(comfy, 1.0, 3)  # every call outside the window: the node's own work only
    assert sparse == 0 and declined.get("attention", 0) == 0, declined
    short, sparse = _count_syncs(comfy, 0.0, 3)
    long, _ = _count_syncs(comfy, 0.0, 6)
    assert sparse > 0
    assert long.get("attention", 0) == short.get("attention", 0), (short, long)  # not per call: the core's plan
    assert long.get("forward", 0) - short.get("forward", 0) == 3 * 2, (short, long)  # one (the sigma) per forward


def test_v3_registration(comfy):
    extension = asyncio.run(comfy.package.comfy_entrypoint())
    (node_cls,) = asyncio.run(extension.get_node_list())
    schema = node_cls.define_schema()
    assert schema.node_id == "DiTSparseAttention" and schema.display_name == "DiT Sparse Attention"
    v1 = comfy.package.NODE_CLASS_MAPPINGS["DiTSparseAttention"].INPUT_TYPES()["required"]
    assert [i.id for i in schema.inputs] == list(v1)
    for i in schema.inputs[1:]:  # the same defaults, limits and tooltips as the V1 node
        options = v1[i.id][1]
        assert {k: i.kwargs[k] for k in options if k in i.kwargs} == options, i.id
    base = comfy.ModelPatcher(comfy.FakeWan())
    result = node_cls.execute(base, "blocktopk", 0.5, 0.0, 1.0, "0, 1", 0)
    assert _patch(result.result[0]).config.dense_layers == (0, 1)


def test_v1_inputs_list_every_method(comfy):
    import dit_accel

    inputs = comfy.package.NODE_CLASS_MAPPINGS["DiTSparseAttention"].INPUT_TYPES()["required"]
    assert list(inputs["method"][0]) == list(dit_accel.METHODS)
    assert comfy.package.NODE_DISPLAY_NAME_MAPPINGS["DiTSparseAttention"] == "DiT Sparse Attention"


def test_core_library_never_imports_comfy():
    code = (
        "import sys, dit_accel, dit_accel.eval, dit_accel.cli, dit_accel.pipelines; "
        "bad = [m for m in sys.modules if m == 'comfy' or m.startswith(('comfy.', 'comfy_api'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_method_runs_through_the_node(comfy):
    import dit_accel

    for method in dit_accel.METHODS:
        base = comfy.ModelPatcher(comfy.FakeWan())
        patched = comfy.node.apply_sparse_attention(base, method, -1, 0.0, 1.0, "", 0)
        patch = _patch(patched)
        out = comfy.sample(patched, SIGMAS)
        assert torch.isfinite(out).all(), method
        stats = patch.stats()
        assert stats["sparse_calls"] + stats["dense_calls"] == 4 * 2 * 2, (method, stats)  # self + cross calls


def test_tokens_beside_the_grid_stay_dense(comfy):
    # bug: with text tokens in self-attention (joint attention) and no layout, a text query block kept 2 of 9
    # key blocks; the call now stays dense with a reason
    base = comfy.ModelPatcher(comfy.FakeWan())
    patched = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.0, 1.0, "", 0)
    patch = _patch(patched)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 128 + 16, 32, generator=g) for _ in range(3))  # 128 video + 16 text tokens
    out = _in_forward(comfy, patched, lambda options: comfy.attention(q, k, v, 2, transformer_options=options))
    assert patch.dense_reasons["no_layout"] == 1 and patch.sparse_calls == 0
    torch.testing.assert_close(out, comfy.attention(q, k, v, 2, transformer_options={}))


def test_min_tokens_default_is_the_apis(comfy):
    # issue 15: the node offered min_tokens=4096, apply_sparse_attention 0 and dit_accel.accelerate 1024, with no
    # reason given; all three are now the API's default (ScheduleConfig.min_tokens), read here from the code
    import dataclasses
    import inspect

    from dit_accel.config import resolve_config
    from dit_accel.parts import ScheduleConfig

    api_default = {f.name: f.default for f in dataclasses.fields(ScheduleConfig)}["min_tokens"]
    v1 = comfy.package.NODE_CLASS_MAPPINGS["DiTSparseAttention"].INPUT_TYPES()["required"]["min_tokens"][1]
    extension = asyncio.run(comfy.package.comfy_entrypoint())
    (node_cls,) = asyncio.run(extension.get_node_list())
    (v3,) = [i for i in node_cls.define_schema().inputs if i.id == "min_tokens"]
    assert v1["default"] == v3.kwargs["default"] == api_default
    for method in ("blocktopk", "rettention", comfy.node.DEFAULT_METHOD):
        assert resolve_config(method).min_tokens == api_default  # what accelerate(pipe, method) uses
        base = comfy.ModelPatcher(comfy.FakeWan())
        assert inspect.signature(comfy.node.apply_sparse_attention).parameters["min_tokens"].default is None
        patched = comfy.node.apply_sparse_attention(base, method)  # min_tokens left out: the API's value
        assert _patch(patched).config.min_tokens == api_default
