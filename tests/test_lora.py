"""LoRA through diffusers' loaders (peft layers on q/k/v/out of the attention modules our sites hook).

The LoRA is made here: peft adapters with random weights on a tiny Wan transformer, saved with the pipeline's
``save_lora_weights`` and loaded with ``load_lora_weights``, as a downloaded LoRA would be.
"""

import peft  # in the test extra: a missing peft fails here instead of skipping
import pytest
import torch

import dit_accel
from dit_accel.testing import tiny_pipeline

STEPS = 3
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def run(pipe, kwargs):
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames


def make_lora(path, seed):
    """Save a random LoRA for the tiny Wan transformer with the pipeline's own ``save_lora_weights``."""
    pipe, _ = tiny_pipeline("wan")
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False)
    pipe.transformer.add_adapter(config)
    with torch.no_grad():  # init_lora_weights=False already draws B at random; larger, it clearly shows
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    layers = peft.get_peft_model_state_dict(pipe.transformer)
    type(pipe).save_lora_weights(str(path), transformer_lora_layers=layers)
    return str(path)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return make_lora(root / "a", 1), make_lora(root / "b", 2)


@pytest.fixture(scope="module")
def refs(loras):
    """Outputs of never-accelerated pipelines: base, LoRA a, a+b weighted, a fused and unfused again, and a
    model with a merged into its weights (plain, and accelerated by sparse methods)."""
    pipe, kwargs = tiny_pipeline("wan")
    kwargs["num_inference_steps"] = STEPS
    out = {"base": run(pipe, kwargs)}
    pipe.load_lora_weights(loras[0], adapter_name="a")
    out["a"] = run(pipe, kwargs)
    pipe.load_lora_weights(loras[1], adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 1.5])
    out["ab"] = run(pipe, kwargs)
    pipe.set_adapters("a")
    pipe.fuse_lora(adapter_names=["a"])
    out["a_fused"] = run(pipe, kwargs)
    pipe.unfuse_lora()  # W + AB - AB is W up to rounding: the reference for an unfused LoRA after a fuse
    out["a_unfused"] = run(pipe, kwargs)
    pipe.fuse_lora(adapter_names=["a"])
    pipe.unload_lora_weights()  # after fuse_lora, unloading keeps the merged weights (diffusers' way to bake it)
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())
    out["merged"] = run(pipe, kwargs)
    assert torch.equal(out["merged"], out["a_fused"])
    for name, sparse in [("merged_sparse", "blocktopk"), ("merged_rett", "rettention")]:
        with dit_accel.accelerate(pipe, sparse, min_tokens=64):
            out[name] = run(pipe, kwargs)
    assert not torch.equal(out["a"], out["base"]) and not torch.equal(out["ab"], out["a"])
    return out, kwargs


@pytest.mark.parametrize("when", ["before", "after"])
def test_dense_with_lora_is_exact_and_remove_keeps_the_lora(loras, refs, when):
    out, kwargs = refs
    pipe, _ = tiny_pipeline("wan")
    if when == "before":
        pipe.load_lora_weights(loras[0], adapter_name="a")
    handle = dit_accel.accelerate(pipe, "dense", min_tokens=64)
    if when == "after":
        pipe.load_lora_weights(loras[0], adapter_name="a")
    assert torch.equal(run(pipe, kwargs), out["a"])  # tolerance: bit-exact, dense calls the same SDPA
    assert handle.stats()["overall"]["dense_calls"] == 2 * 2 * STEPS  # both sites still see every call
    pipe.load_lora_weights(loras[1], adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 1.5])
    assert torch.equal(run(pipe, kwargs), out["ab"])
    pipe.set_adapters("a")
    assert torch.equal(run(pipe, kwargs), out["a"])
    handle.remove()
    assert torch.equal(run(pipe, kwargs), out["a"])  # remove() leaves the LoRA in place
    handle = dit_accel.accelerate(pipe, "dense", min_tokens=64)
    pipe.unload_lora_weights()
    assert torch.equal(run(pipe, kwargs), out["base"])
    pipe.load_lora_weights(loras[0], adapter_name="a")
    pipe.fuse_lora(adapter_names=["a"])
    assert torch.equal(run(pipe, kwargs), out["a_fused"])
    assert handle.stats()["overall"]["dense_calls"] == 2 * 2 * 2 * STEPS  # the sites saw every call of both runs
    handle.remove()
    assert torch.equal(run(pipe, kwargs), out["a_fused"])  # and leaves the fused LoRA in place
    pipe.unfuse_lora()
    assert torch.equal(run(pipe, kwargs), out["a_unfused"])


@pytest.mark.parametrize("method", ["blocktopk", "rettention"])
def test_sparse_with_lora_equals_sparse_on_the_merged_model(loras, refs, method):
    out, kwargs = refs
    merged = out["merged_sparse" if method == "blocktopk" else "merged_rett"]
    pipe, _ = tiny_pipeline("wan")
    handle = dit_accel.accelerate(pipe, method, min_tokens=64)
    pipe.load_lora_weights(loras[0], adapter_name="a")
    unfused = run(pipe, kwargs)
    pipe.fuse_lora()
    fused = run(pipe, kwargs)
    stats = handle.stats()["overall"]
    assert stats["sparse_calls"] > 0
    assert torch.equal(fused, merged)  # fused LoRA weights are the merged model's weights
    # unfused: x W + (x A) B differs from x (W + A B) by rounding only
    torch.testing.assert_close(unfused, merged, rtol=1e-4, atol=1e-4)
    handle.remove()
    assert torch.equal(run(pipe, kwargs), out["a_fused"])
