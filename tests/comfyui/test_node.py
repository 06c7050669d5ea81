"""The ComfyUI node against stand-in comfy modules: installation, chaining, routing, callbacks, registration."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import torch

from dit_accel.methods import SiteCall, build_method
from dit_accel.site_state import BranchState
from dit_accel.state import DenoiseState

OVERRIDE = "optimized_attention_override"
SIGMAS = [1.0, 0.75, 0.5, 0.25, 0.0]  # 4 steps; with start_percent=0.5 steps 2 and 3 are in the window


def _recording_previous(log: list):
    def previous(func, *args, **kwargs):
        q, k = args[0], args[1]
        sigma = (
            float(kwargs["transformer_options"]["sigmas"].max()) if "sigmas" in kwargs["transformer_options"] else None
        )
        log.append(("self" if q.shape == k.shape else "cross", sigma))
        return func(*args, **kwargs)

    return previous


def test_override_installed_and_chained_without_touching_the_input(comfy):
    base = comfy.ModelPatcher(comfy.FakeWan())
    log: list = []
    previous = _recording_previous(log)
    base.model_options["transformer_options"][OVERRIDE] = previous

    (patched,) = comfy.package.NODE_CLASS_MAPPINGS["DiTSparseAttention"]().patch(
        base, "blocktopk", 0.5, 0.5, 1.0, "", 0
    )

    assert patched is not base
    assert base.model_options["transformer_options"][OVERRIDE] is previous  # input MODEL unchanged
    override = patched.model_options["transformer_options"][OVERRIDE]
    patch = override._dit_accel_patch
    assert patch.previous is previous
    assert comfy.node.KEY in patched.wrappers["diffusion_model"]
    assert comfy.node.KEY in patched.callbacks[comfy.CallbacksMP.ON_PREPARE_STATE]
    assert comfy.node.KEY in patched.callbacks[comfy.CallbacksMP.ON_CLEANUP]
    assert patch.config.sparsity == 0.5 and patch.config.min_tokens == 0


def test_routing_cross_attention_and_window_go_to_previous(comfy):
    base = comfy.ModelPatcher(comfy.FakeWan())
    log: list = []
    base.model_options["transformer_options"][OVERRIDE] = _recording_previous(log)
    patched = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.5, 1.0, "", 0)
    patch = patched.model_options["transformer_options"][OVERRIDE]._dit_accel_patch

    comfy.sample(patched, SIGMAS)

    cross = [s for kind, s in log if kind == "cross"]
    self_prev = sorted({s for kind, s in log if kind == "self"})
    assert len(cross) == 4 * 2  # every cross-attention call of 4 steps x 2 blocks was declined
    assert self_prev == [0.75, 1.0]  # only the out-of-window steps' self-attention reached the previous override
    assert patch.sparse_calls == 2 * 2  # steps 2, 3 x blocks 0, 1 went through dit_accel
    assert patch.dense_reasons["outside_window"] == 4
    assert patch.dense_reasons["cross_attention"] == 8
    assert patch.stats()["block_density"] == 0.5
    assert patch.grid == (2, 8, 8) or patch.grid is None  # reset by clean-up after sampling


def test_dense_blocks_and_min_tokens_decline(comfy):
    base = comfy.ModelPatcher(comfy.FakeWan())
    patched = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.0, 1.0, "0", 0)
    patch = patched.model_options["transformer_options"][OVERRIDE]._dit_accel_patch
    comfy.sample(patched, SIGMAS)
    assert patch.dense_reasons["dense_layer"] == 4 and patch.sparse_calls == 4  # block 0 dense, block 1 sparse

    short = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.0, 1.0, "", 4096)
    patch = short.model_options["transformer_options"][OVERRIDE]._dit_accel_patch
    comfy.sample(short, SIGMAS)
    assert patch.sparse_calls == 0 and patch.dense_reasons["min_tokens"] == 8


def test_in_window_self_attention_runs_the_dit_accel_method(comfy):
    base = comfy.ModelPatcher(comfy.FakeWan())
    patched = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.0, 1.0, "", 0)
    options = patched.model_options["transformer_options"]
    patch = options[OVERRIDE]._dit_accel_patch
    g = torch.Generator().manual_seed(1)
    b, s, heads, d = 1, 128, 2, 16
    q, k, v = (torch.randn(b, s, heads * d, generator=g) for _ in range(3))
    options.update(sigmas=torch.tensor([0.5]), sample_sigmas=torch.tensor(SIGMAS), cond_or_uncond=[0], block_index=1)
    patch.grid = (2, 8, 8)  # what the diffusion-model wrapper reads from x: 128 video tokens

    out = comfy.attention(q, k, v, heads, transformer_options=options)

    qh, kh, vh = (t.view(b, s, heads, d).transpose(1, 2) for t in (q, k, v))
    state = DenoiseState(step=2, num_steps=4, branch="0", active=True)
    call = SiteCall(qh, kh, vh, None, patch.config, state, None, 1, "blocks.1", BranchState())
    expected = build_method(patch.config).attend(call).out.transpose(1, 2).reshape(b, s, heads * d)
    dense = comfy.attention(q, k, v, heads, transformer_options={})
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, dense, atol=1e-3)  # it really was sparse

    # The (B, H, S, D) layout ComfyUI uses with skip_reshape / skip_output_reshape works the same.
    out4 = comfy.attention(qh, kh, vh, heads, skip_reshape=True, skip_output_reshape=True, transformer_options=options)
    assert torch.allclose(out4.transpose(1, 2).reshape(b, s, heads * d), expected, atol=1e-5)


def test_prepare_state_reinstalls_on_top_and_cleanup_resets(comfy):
    base = comfy.ModelPatcher(comfy.FakeWan())
    patched = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.0, 1.0, "", 0)
    ours = patched.model_options["transformer_options"][OVERRIDE]
    patch = ours._dit_accel_patch

    seen = {"foreign": 0}

    def foreign(func, *args, **kwargs):  # a later node chaining on top of us
        seen["foreign"] += 1
        return ours(func, *args, **kwargs)

    patched.model_options["transformer_options"][OVERRIDE] = foreign
    patched.prepare_state(None, patched.model_options)
    assert patched.model_options["transformer_options"][OVERRIDE] is ours
    assert patch.previous is foreign
    patched.prepare_state(None, patched.model_options)
    assert patch.previous is foreign  # idempotent: no double wrapping

    comfy.sample(patched, SIGMAS)  # no infinite recursion through foreign -> ours -> foreign
    assert seen["foreign"] > 0 and patch.sparse_calls > 0

    patch.sites.site(0).branches["0"] = BranchState()
    patched.cleanup()
    assert not any(site.branches for site in patch.sites.sites) and patch.grid is None


def test_v3_registration(comfy):
    extension = asyncio.run(comfy.package.comfy_entrypoint())
    (node_cls,) = asyncio.run(extension.get_node_list())
    schema = node_cls.define_schema()
    assert schema.node_id == "DiTSparseAttention" and schema.display_name == "DiT Sparse Attention"
    assert [i.id for i in schema.inputs] == [
        "model",
        "method",
        "sparsity",
        "start_percent",
        "end_percent",
        "dense_blocks",
        "min_tokens",
    ]
    base = comfy.ModelPatcher(comfy.FakeWan())
    result = node_cls.execute(base, "blocktopk", 0.5, 0.0, 1.0, "0, 1", 0)
    patch = result.result[0].model_options["transformer_options"][OVERRIDE]._dit_accel_patch
    assert patch.config.dense_layers == (0, 1)


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
        patch = patched.model_options["transformer_options"][OVERRIDE]._dit_accel_patch
        out = comfy.sample(patched, SIGMAS)
        assert torch.isfinite(out).all(), method
        stats = patch.stats()
        assert stats["sparse_calls"] + stats["dense_calls"] == 4 * 2 * 2, (method, stats)  # self + cross calls


def test_tokens_beside_the_grid_stay_dense(comfy):
    # bug: with text tokens in self-attention (joint attention) and no layout, a text query block kept 2 of 9
    # key blocks; the call now stays dense with a reason
    base = comfy.ModelPatcher(comfy.FakeWan())
    patched = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.0, 1.0, "", 0)
    options = patched.model_options["transformer_options"]
    patch = options[OVERRIDE]._dit_accel_patch
    patch.grid = (2, 8, 8)
    options.update(sigmas=torch.tensor([0.5]), sample_sigmas=torch.tensor(SIGMAS), cond_or_uncond=[0], block_index=1)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 128 + 16, 32, generator=g) for _ in range(3))  # 128 video + 16 text tokens
    out = comfy.attention(q, k, v, 2, transformer_options=options)
    assert patch.dense_reasons["no_layout"] == 1 and patch.sparse_calls == 0
    torch.testing.assert_close(out, comfy.attention(q, k, v, 2, transformer_options={}))


def test_float32_sigma_on_the_window_edge_is_inside(comfy):
    # bug: float32(0.6) = 0.60000002 > 0.6, so the step at the window's start edge ran outside it
    base = comfy.ModelPatcher(comfy.FakeWan())
    patched = comfy.node.apply_sparse_attention(base, "blocktopk", 0.5, 0.4, 1.0, "", 0)
    patch = patched.model_options["transformer_options"][OVERRIDE]._dit_accel_patch
    assert patch.sigma_start == 0.6 and torch.tensor(0.6).item() > 0.6
    comfy.sample(patched, [1.0, 0.6, 0.2, 0.0])  # sigma 0.6 is the start of the window
    assert patch.sparse_calls == 2 * 2 and patch.dense_reasons["outside_window"] == 2


def test_the_presets_dense_steps_apply(comfy):
    # vmoba-paper keeps its first 25 % of steps dense: step 0 of 4; an explicit dense_steps=2 keeps steps 0 and 1
    for method, options, dense in (("vmoba-paper", {}, 1), ("blocktopk", {"dense_steps": 2}, 2)):
        base = comfy.ModelPatcher(comfy.FakeWan())
        patched = comfy.node.apply_sparse_attention(base, method, -1, 0.0, 1.0, "", 0, **options)
        patch = patched.model_options["transformer_options"][OVERRIDE]._dit_accel_patch
        comfy.sample(patched, SIGMAS)
        assert patch.dense_reasons["dense_step"] == dense * 2, (method, patch.stats())  # 2 blocks per step
        assert patch.sparse_calls == (4 - dense) * 2, (method, patch.stats())
