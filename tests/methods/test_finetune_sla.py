"""scripts/finetune_sla.py on a tiny Wan pipeline: the distillation loss falls and the weights round-trip."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import dit_accel
from dit_accel.compensation import load_sla_weights, save_sla_weights
from dit_accel.compensation.linear import LoRALinear
from dit_accel.testing import tiny_pipeline

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("finetune_sla", ROOT / "scripts" / "finetune_sla.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_projection_distillation_loss_falls_and_round_trips(tmp_path):
    ft = _script()
    pipe, kwargs = tiny_pipeline("wan")
    kwargs["num_inference_steps"] = 2
    handle = dit_accel.accelerate(pipe, "sla-paper", min_tokens=64, sparsity=0.75)
    samples = ft.collect(pipe, [kwargs], handle, max_samples=4)
    assert len(samples) == 4
    losses = ft.train_projections(handle, samples, steps=25, lr=1e-2)
    assert losses[-1] < 0.85 * losses[0] and sum(losses[-5:]) / 5 < 0.9 * losses[0], losses
    before = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    path = tmp_path / "sla.safetensors"
    save_sla_weights(handle, str(path))
    handle.remove()
    trained = {
        k: p.detach().clone() for k, p in next(iter(handle.accelerators.values())).method.projections.named_parameters()
    }
    assert any(bool(p.any()) for p in trained.values())  # no longer the zero initialisation
    # a fresh installation starts from zero projections; loading restores the trained weights and output exactly
    fresh = dit_accel.accelerate(pipe, "sla-paper", min_tokens=64, sparsity=0.75)
    load_sla_weights(fresh, str(path))
    loaded = dict(next(iter(fresh._accelerators.values())).method.projections.named_parameters())
    assert trained.keys() == loaded.keys()
    for key, value in trained.items():
        assert torch.equal(value, loaded[key])
    after = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    fresh.remove()
    torch.testing.assert_close(after, before)


def test_lora_end_to_end_loss_falls():
    ft = _script()
    pipe, kwargs = tiny_pipeline("wan")
    kwargs["num_inference_steps"] = 2
    kwargs["num_inference_steps"] = 1
    records = ft.record_transformer_inputs(pipe, [kwargs], limit=1)
    handle = dit_accel.accelerate(pipe, "sla-paper", min_tokens=64, sparsity=0.75)
    losses = ft.train_lora(pipe, handle, records, rank=2, steps=3, lr=1e-3)
    handle.remove()
    assert losses[-1] < losses[0] and losses[1] < losses[0], losses
    assert any(isinstance(m, LoRALinear) for m in pipe.transformer.modules())


def test_untrained_projections_cost_nothing_at_inference():
    """Zero-initialised projections add nothing, so a pipeline run (no grad) neither creates nor applies them."""
    pipe, kwargs = tiny_pipeline("wan")
    kwargs["num_inference_steps"] = 2
    handle = dit_accel.accelerate(pipe, "sla", min_tokens=64, sparsity=0.75, dense_steps=0)
    pipe(**kwargs)
    method = next(iter(handle.accelerators.values())).method
    assert handle.stats()["overall"]["sparse_calls"] > 0
    assert len(method.projections.proj) == 0 and not method.projections.trained
    handle.remove()


def test_remove_lora_restores_the_original_modules_and_output(rng):
    from dit_accel.compensation import remove_lora
    from dit_accel.compensation.linear import LoRALinear, add_lora

    pipe, kwargs = tiny_pipeline("wan")
    transformer = pipe.transformer
    before = {name: module for name, module in transformer.named_modules()}
    hs, ehs = torch.randn(1, 16, 3, 32, 32, generator=rng), torch.randn(1, 16, 32, generator=rng)
    call = dict(hidden_states=hs, timestep=torch.tensor([500.0]), encoder_hidden_states=ehs)
    with torch.no_grad():
        reference = transformer(**call).sample
        sites = [m for n, m in transformer.named_modules() if n.endswith("attn1")]
        added = add_lora(transformer, sites, rank=2)
        for module in transformer.modules():
            if isinstance(module, LoRALinear):
                torch.nn.init.normal_(module.up.weight)  # a trained adapter changes the output
        assert not torch.equal(transformer(**call).sample, reference)
        assert remove_lora(transformer) == added > 0
        assert torch.equal(transformer(**call).sample, reference)
    assert {name: module for name, module in transformer.named_modules()} == before
