import pytest
import torch
from diffusers import DDIMScheduler

import dit_accel
from dit_accel.site_state import BlockPattern, BranchState
from dit_accel.testing import tiny_pipeline


def test_accelerate_twice_replaces_the_old_installation():
    pipe, kwargs = tiny_pipeline("wan")
    first = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64)
    second = dit_accel.accelerate(pipe, "dense", min_tokens=64)
    assert not first.active and second.active
    pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    assert second.stats()["overall"]["dense_reasons"].keys() == {"method"}
    assert first.stats()["overall"]["sparse_calls"] == 0
    first.remove()  # a stale handle's remove is harmless
    assert second.active
    second.remove()
    assert not hasattr(pipe.transformer, "_dit_accel_accelerator")
    # nothing left behind: no (empty) hook registry, no instance-level forward on any module
    for name, module in pipe.transformer.named_modules():
        assert not hasattr(module, "_diffusers_hook"), name
        assert "forward" not in module.__dict__, name


def test_bare_transformer_and_default_method():
    pipe, _ = tiny_pipeline("wan")
    # dense_steps=0: the default's 10 % of 4 steps is one dense step, and two forwards would then run no sparse call
    handle = dit_accel.accelerate(pipe.transformer, min_tokens=64, num_steps=4, dense_steps=0)
    assert handle.method == dit_accel.DEFAULT_METHOD
    hs = torch.randn(1, 16, 3, 32, 32)
    ehs = torch.randn(1, 16, 32)
    for t in (900.0, 600.0):
        pipe.transformer(hidden_states=hs, timestep=torch.tensor([t]), encoder_hidden_states=ehs)
    stats = handle.stats()
    handle.remove()
    overall = stats["overall"]
    assert overall["sparse_calls"] + overall["refresh_calls"] + overall["dense_calls"] == 4  # 2 steps x 2 layers
    assert overall["sparse_calls"] > 0
    with dit_accel.accelerate(pipe.transformer, "blocktopk", min_tokens=64) as handle:
        for t in (900.0, 600.0):
            pipe.transformer(hidden_states=hs, timestep=torch.tensor([t]), encoder_hidden_states=ehs)
        assert handle.stats()["overall"]["sparse_calls"] == 4


def test_no_supported_transformer_is_a_clear_type_error():
    with pytest.raises(TypeError, match="no supported transformer.*WanTransformer3DModel"):
        dit_accel.accelerate(DDIMScheduler())
    with pytest.raises(TypeError, match="no supported transformer"):
        dit_accel.accelerate(torch.nn.Linear(2, 2))


def test_bad_option_leaves_pipeline_untouched():
    pipe, _ = tiny_pipeline("wan")
    with pytest.raises(ValueError, match="sparsity"):
        dit_accel.accelerate(pipe, "blocktopk", sparsity=2.0)
    assert not hasattr(pipe.transformer, "_dit_accel_accelerator")


def test_stats_shape():
    pipe, kwargs = tiny_pipeline("wan")
    with dit_accel.accelerate(pipe, "blocktopk", min_tokens=64) as handle:
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))
        stats = handle.stats()
    assert stats["method"] == "blocktopk" and stats["config"]["sparsity"] == 0.75
    # kernel_backend="auto" times the fused CPU kernels against the reference per call key
    chosen = {entry["backend"] for entry in stats["kernel_choices"].values()}
    assert chosen and chosen <= {"cpu", "reference"}
    assert stats["kernel_backend"] == (chosen.pop() if len(chosen) == 1 else "auto(cpu,reference)")
    assert stats["families"] == {"transformer": "wan"}
    for entry in [stats["overall"], *stats["sites"].values()]:
        assert set(entry) >= {"dense_calls", "sparse_calls", "dense_reasons", "block_density", "cache_bytes"}


def test_base_config_of_another_method_overrides_only_what_it_sets():
    # bug: the base config's defaults (pattern/compensation of blocktopk) replaced rettention's preset
    handle = dit_accel.accelerate(tiny_pipeline("wan")[0], "rettention", config=dit_accel.AccelConfig(sparsity=0.9))
    cfg = handle.config
    handle.remove()
    preset = dit_accel.PRESETS["rettention"]
    assert cfg.method == "rettention" and cfg.sparsity == 0.9
    assert (cfg.compensation, cfg.refresh_every, cfg.dense_steps) == (
        preset.compensation,
        preset.schedule.refresh_every,
        preset.schedule.dense_steps,
    )
    assert dit_accel.AccelConfig().method == dit_accel.DEFAULT_METHOD
    assert dit_accel.AccelConfig().compensation == dit_accel.PRESETS[dit_accel.DEFAULT_METHOD].compensation
    explicit = dit_accel.AccelConfig(method="rettention", compensation="none")
    assert explicit.compensation.kind == "none"  # a field given explicitly wins over the preset, even a default
    assert explicit.replace(sparsity=0.5).compensation.kind == "none"


def test_bare_transformer_with_fractional_dense_steps_needs_num_steps():
    pipe, _ = tiny_pipeline("wan")
    with pytest.raises(ValueError, match="num_steps"):
        dit_accel.accelerate(pipe.transformer)  # the default preset's 10 % dense steps cannot be counted
    assert not hasattr(pipe.transformer, "_dit_accel_accelerator")
    dit_accel.accelerate(pipe.transformer, dense_steps=1).remove()  # an int count needs no step total


def test_scheduler_replaced_after_accelerate_is_followed():
    # bug: steps were matched against the scheduler captured at accelerate(); after the common
    # `pipe.scheduler = X.from_config(...)` tiny Flux (6 steps) ran 10 refresh calls and no sparse call
    from diffusers import FlowMatchEulerDiscreteScheduler

    stats = []
    for swap in (False, True):
        pipe, kwargs = tiny_pipeline("flux")
        kwargs = dict(kwargs, num_inference_steps=6)
        handle = dit_accel.accelerate(pipe, "rettention", min_tokens=16, dense_steps=0)
        if swap:
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=2.0)
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))
        stats.append(handle.stats())
        handle.remove()
    for s in stats:  # 6 steps x 2 sites, one pass per step: a refresh at steps 0 and 5, sparse in between
        assert (s["overall"]["refresh_calls"], s["overall"]["sparse_calls"]) == (4, 8)
        assert s["steps_backwards"] == 0


def test_steps_going_backwards_are_counted_and_warned_once():
    pipe, kwargs = tiny_pipeline("wan")
    handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64)
    transformer = pipe.transformer
    pipe.scheduler.set_timesteps(4)
    hs, ehs = torch.randn(1, 16, 3, 32, 32), torch.randn(1, 16, 32)
    ts = pipe.scheduler.timesteps
    with pytest.warns(RuntimeWarning, match="went back") as record:
        for t in (ts[2], ts[0], ts[3], ts[1]):  # no pipeline call around them: one generation
            transformer(hidden_states=hs, timestep=t.reshape(1), encoder_hidden_states=ehs)
    stats = handle.stats()
    handle.remove()
    assert stats["steps_backwards"] == 2
    assert sum("went back" in str(w.message) for w in record) == 1


def test_refresh_without_statistics_takes_the_fast_dense_path(monkeypatch):
    # bug: refresh calls of methods without statistics ran the float32 chunked reference, even on CUDA
    from dit_accel import kernels

    def slow(*args, **kwargs):
        raise AssertionError("the chunked reference ran for a refresh that needs no statistics")

    monkeypatch.setattr(kernels, "dense_attention", slow)
    pipe, kwargs = tiny_pipeline("wan")
    with dit_accel.accelerate(pipe, "blocktopk", min_tokens=64, refresh_every=2) as handle:
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))
        assert handle.stats()["overall"]["refresh_calls"] > 0


def test_cache_bytes_now_and_the_simultaneous_peak():
    # bug: cache_bytes_peak summed per-site peaks; the ledger reports the most held at once
    pipe, kwargs = tiny_pipeline("wan")
    handle = dit_accel.accelerate(pipe, "rettention", min_tokens=64, dense_steps=0, cache_dtype="float32")
    acc = handle.accelerators["transformer"]
    seen = []

    def held_now(event):
        seen.append(sum(site.cache_bytes() for site in acc.sites))

    acc.observers.append(held_now)
    pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    stats = handle.stats()
    handle.remove()
    overall = stats["overall"]
    assert overall["cache_bytes"] == 0  # a pipeline call ends its generation: nothing is held after it
    assert overall["cache_bytes_peak"] == max(seen) > 0
    # a second call does not add up: the peak is what was held at once, not a running total
    handle = dit_accel.accelerate(pipe, "rettention", min_tokens=64, dense_steps=0, cache_dtype="float32")
    for seed in (0, 1):
        pipe(**kwargs, generator=torch.Generator().manual_seed(seed))
    assert handle.stats()["overall"]["cache_bytes_peak"] == max(seen)
    handle.remove()

    # sites that peak at different times: the peak is what was held at once, not the sum of the sites' peaks
    handle = dit_accel.accelerate(pipe, "rettention", min_tokens=64, dense_steps=0)
    first, second = handle.accelerators["transformer"].sites

    def holding(nbytes: int) -> BranchState:
        pattern = BlockPattern(torch.zeros(nbytes // 4), torch.zeros(0), torch.zeros(()), None, 0, (0, 0, 0))
        return BranchState(pattern=pattern)

    first.branches["cond"] = holding(996)  # 996 bytes of LUT, 4 of density: 1,000 bytes
    first.account()
    first.clear()
    second.branches["cond"] = holding(996)
    second.account()
    stats = handle.stats()
    handle.remove()
    assert stats["overall"]["cache_bytes"] == 1000 and stats["overall"]["cache_bytes_peak"] == 1000
    assert sum(s["cache_bytes_peak"] for s in stats["sites"].values()) == 2000
