"""``tile_permutation="per_forward"``: the Wan forward runs in 3D-tile order, with the same outputs as per call."""

from __future__ import annotations

import pytest
import torch

import dit_accel
from dit_accel import kernels
from dit_accel.testing import tiny_pipeline


@pytest.fixture(scope="module")
def wan():
    return tiny_pipeline("wan")


def _render(pipe, kwargs, **options):
    with dit_accel.accelerate(pipe, min_tokens=64, **options) as handle:
        out = pipe(**kwargs, generator=torch.Generator().manual_seed(0))
        stats = handle.stats()
        forwards = handle.accelerators["transformer"].order
        forwards = forwards.forwards if forwards is not None else 0
    return torch.as_tensor(out.frames), stats, forwards


def _count_permutes(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = kernels.permute_tokens

    def counted(x, perm):
        calls.append(1)
        return original(x, perm)

    monkeypatch.setattr(kernels, "permute_tokens", counted)
    return calls


@pytest.mark.parametrize(
    "method, options",
    # static, reshape + refresh, linear branch; the residual's mean update reduces over v, whose memory layout
    # differs between the modes (a reduction's order follows it), so that variant is checked to float tolerance
    [
        ("window", {}),
        ("rettention", {"tiled": True, "residual_update": "none"}),
        ("sla", {}),
        ("rettention", {"tiled": True}),
    ],
)
def test_per_forward_equals_per_call_and_skips_the_per_call_gathers(wan, monkeypatch, method, options):
    pipe, kwargs = wan
    calls = _count_permutes(monkeypatch)
    per_call, stats, _ = _render(pipe, kwargs, method=method, dense_steps=0, **options)
    gathers = len(calls)
    assert gathers > 0 and stats["overall"]["sparse_calls"] > 0
    calls.clear()
    per_forward, stats_f, forwards = _render(
        pipe, kwargs, method=method, dense_steps=0, tile_permutation="per_forward", **options
    )
    assert forwards == 6 and not calls  # every forward in tile order, no gather or scatter per call
    # the kernels see the same q, k, v in the same order either way: the same bits
    exact = options.get("residual_update", "mean" if method == "rettention" else "none") == "none"
    tol = 0 if exact else 1e-5
    torch.testing.assert_close(per_forward, per_call, atol=tol, rtol=tol)
    assert stats_f["overall"]["sparse_calls"] == stats["overall"]["sparse_calls"]
    assert stats_f["config"]["tile_permutation"] == "per_forward"


def test_dense_calls_inside_a_tiled_forward_match_to_float_tolerance(wan):
    pipe, kwargs = wan
    options = dict(method="window", dense_steps=0, dense_layers="0")  # layer 0 dense: SDPA over permuted keys
    a, _, _ = _render(pipe, kwargs, **options)
    b, stats, forwards = _render(pipe, kwargs, tile_permutation="per_forward", **options)
    assert forwards == 6 and stats["overall"]["dense_reasons"] == {"dense_layer": 6}
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:dit_accel. dense_steps=3 keeps all")
def test_dense_steps_stay_in_the_model_order_and_remove_restores_bit_exactly(wan):
    pipe, kwargs = wan
    plain = torch.as_tensor(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames)
    dense, _, forwards = _render(pipe, kwargs, method="window", dense_steps=3, tile_permutation="per_forward")
    assert forwards == 0  # no sparse call possible: the forward is the model's own
    torch.testing.assert_close(dense, plain, atol=0, rtol=0)
    handle = dit_accel.accelerate(pipe, "window", tile_permutation="per_forward")
    handle.remove()
    for name in ("patch_embedding", "proj_out", "rope", "condition_embedder"):
        assert not hasattr(pipe.transformer.get_submodule(name), "_diffusers_hook"), name
    again = torch.as_tensor(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames)
    torch.testing.assert_close(again, plain, atol=0, rtol=0)


def test_per_token_timesteps_are_permuted_with_the_tokens(wan):
    # Wan 2.2 TI2V passes a (B, N) timestep: its per-token modulation must follow the tokens into tile order
    pipe, kwargs = wan
    transformer = pipe.transformer
    gen = torch.Generator().manual_seed(1)
    cfg = transformer.config
    latents = torch.randn(1, cfg.in_channels, 3, 32, 32, generator=gen)
    n = 3 * 16 * 16
    timestep = torch.linspace(900, 100, n)[None]
    text = torch.randn(1, 16, cfg.text_dim, generator=gen)
    outs = []
    for order in ("per_call", "per_forward"):
        with dit_accel.accelerate(transformer, "window", min_tokens=64, num_steps=1, tile_permutation=order) as h:
            with torch.no_grad():
                outs.append(transformer(latents, timestep, text, return_dict=False)[0])
            assert h.stats()["overall"]["sparse_calls"] > 0
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)


def test_per_forward_is_refused_where_it_cannot_hold():
    with pytest.raises(ValueError, match="tile_permutation='per_forward' does not apply to pattern 'vmoba'"):
        dit_accel.AccelConfig(method="vmoba", tile_permutation="per_forward")
    with pytest.raises(ValueError, match="pattern 'topk' with tiled=False"):
        dit_accel.AccelConfig(method="blocktopk", tile_permutation="per_forward")
    with pytest.raises(ValueError, match="tile_permutation='bogus' is not allowed; choose one of 'per_call'"):
        dit_accel.AccelConfig(tile_permutation="bogus")
    pipe, _ = tiny_pipeline("cogvideox")
    with pytest.raises(ValueError, match="not supported for transformer .*supported families: wan"):
        dit_accel.accelerate(pipe, "window", tile_permutation="per_forward")
    assert not hasattr(pipe.transformer, "_dit_accel_accelerator")
    assert not any(hasattr(m, "_diffusers_hook") for m in pipe.transformer.modules())  # nothing was installed
