"""Typed method parts: presets are objects of three parts, options that do not apply are refused by name."""

import dataclasses
import types

import pytest

import dit_accel
from dit_accel import AccelConfig
from dit_accel.config import resolve_config
from dit_accel.parts import CompensationConfig, PatternConfig, ScheduleConfig
from dit_accel.presets import Preset
from dit_accel.testing import tiny_pipeline


@pytest.mark.parametrize(
    ("method", "option", "value", "needs"),
    [
        ("rettention", "tau", 0.5, "pattern 'threshold'"),  # top-k has no mass threshold
        ("rettention", "raster_fraction", 0.1, "pattern 'raster'"),
        ("rettention", "vmoba_topk", (1, 2, 3), "pattern 'vmoba'"),
        ("rettention", "window", (1, 2, 2), "pattern 'window' or 'inward'"),
        ("rettention", "tile", (1, 8, 8), "tiled=True"),
        ("rettention", "threshold_scope", "head", "pattern 'threshold'"),
        ("window", "smooth_k", False, "pattern 'topk' or 'threshold'"),
        ("vmoba", "tau", 0.5, "vmoba_select='threshold'"),
        ("vmoba-paper", "vmoba_scope", "head_global", "vmoba_gate='token' and vmoba_select='threshold'"),
        ("vmoba", "vmoba_scope", "head_global", "vmoba_gate='token' and vmoba_select='threshold'"),
        ("rettention", "vmoba_gate", "token", "pattern 'vmoba'"),
        ("rettention", "vmoba_chunk_size", ((3,), (5, 13), (7, 5, 13)), "pattern 'vmoba'"),
        ("blocktopk", "feature_map", "elu", "compensation 'linear'"),  # no linear branch to map
        ("blocktopk", "linear_weight", "proj", "compensation 'linear'"),
        ("sla", "ramp", 0.1, "compensation 'reshape'"),
        ("sla", "rho_clamp", False, "compensation 'reshape'"),
        ("sla", "cache_offload", True, "compensation 'reshape'"),
        ("rettention", "negligible", 0.1, "compensation 'linear'"),
    ],
)
def test_an_option_that_does_not_apply_is_refused_by_name(method, option, value, needs):
    with pytest.raises(ValueError, match=rf"^{option}=.*does not apply to .*it needs .*{needs}"):
        resolve_config(method, **{option: value})
    pipe, _ = tiny_pipeline("wan")
    with pytest.raises(ValueError, match=rf"^{option}="):
        dit_accel.accelerate(pipe, method, **{option: value})
    assert not hasattr(pipe.transformer, "_dit_accel_accelerator")  # nothing was installed


def test_vmoba_chunk_options_are_checked():
    sizes = ((3,), (5, 13), (7, 5, 13))
    with pytest.raises(ValueError, match=r"^vmoba_chunks=.*it needs .*vmoba_chunk_size=None"):
        resolve_config("vmoba-paper", vmoba_chunk_size=sizes, vmoba_chunks=((2,), (2, 2), (2, 2, 3)))
    for bad in (((3,), (5,), (7, 5, 13)), ((0,), (5, 13), (7, 5, 13)), (3, 5, 7)):
        with pytest.raises(ValueError, match=r"^vmoba_chunk_size=.*three tuples of positive chunk sizes"):
            resolve_config("vmoba-paper", vmoba_chunk_size=bad)
    with pytest.raises(ValueError, match=r"compensation='linear' does not apply to pattern 'vmoba' with vmoba_gate"):
        resolve_config("vmoba-paper", compensation="linear")
    assert resolve_config("vmoba", compensation="linear").vmoba_gate == "block"  # block gating mixes with SLA
    cfg = resolve_config("vmoba-paper", vmoba_chunk_size=[[3], [5, 13], [7, 5, 13]])
    assert cfg.vmoba_chunk_size == ((3,), (5, 13), (7, 5, 13))


def test_negligible_needs_a_scored_pattern_even_with_the_linear_branch():
    with pytest.raises(ValueError, match=r"^negligible=0.1 does not apply to pattern 'inward'.*'topk' or 'threshold'"):
        resolve_config("sla", pattern="inward", negligible=0.1)
    assert resolve_config("sla-paper", pattern="inward").negligible == 0.0  # the preset's 0.1 is forgotten


def test_an_option_that_applies_is_kept_and_its_default_is_always_accepted():
    assert resolve_config("rettention", pattern="threshold", tau=0.5).tau == 0.5
    assert resolve_config("vmoba", vmoba_select="threshold", tau=0.6).tau == 0.6
    assert resolve_config("sla", feature_map="elu").feature_map == "elu"
    assert resolve_config("rettention", ramp=0.04).ramp == 0.04
    assert resolve_config("rettention", tau=0.9).tau == 0.9  # the default value says nothing, so it passes
    cfg = resolve_config("rettention", sparsity=0.95, refresh_every=2)
    assert (cfg.pattern.sparsity, cfg.schedule.refresh_every) == (0.95, 2)


def test_switching_a_kind_forgets_the_presets_values_that_no_longer_apply():
    cfg = AccelConfig(method="vmoba-paper", pattern="topk")
    assert cfg.pattern.kind == "topk" and cfg.vmoba_topk is None  # the preset's (2, 6, 18) was for vmoba
    assert cfg.dense_steps == 0.25  # the schedule part is untouched
    cfg = AccelConfig(method="rettention-paper", compensation="none")
    assert (cfg.ramp, cfg.rho_clamp) == (0.0, True)  # the preset's lambda 0.04 and no-clamp were for reshape
    with pytest.raises(ValueError, match="^ramp=0.04 does not apply"):  # given by the user: refused, not dropped
        AccelConfig(method="rettention-paper", compensation="none", ramp=0.04)


def test_typed_parts_replace_the_presets_parts():
    pattern = PatternConfig(kind="threshold", tau=0.8, sparsity=0.5)
    cfg = AccelConfig(method="rettention", pattern=pattern)
    assert cfg.pattern == pattern and cfg.compensation == dit_accel.PRESETS["rettention"].compensation
    assert cfg.replace(sparsity=0.6).pattern == dataclasses.replace(pattern, sparsity=0.6)
    schedule = ScheduleConfig(dense_steps=2, refresh_every=3)
    cfg = resolve_config("sla", schedule=schedule)
    assert cfg.schedule == schedule and cfg.dense_step_count(10) == 2
    with pytest.raises(ValueError, match=r"^compensation=3 must be one of 'none', 'reshape', 'linear' or a Comp"):
        AccelConfig(compensation=3)
    with pytest.raises(ValueError, match="^schedule='fast' must be a ScheduleConfig"):
        resolve_config("sla", schedule="fast")
    with pytest.raises(ValueError, match="^tau=0.5 does not apply to pattern 'topk'"):
        PatternConfig(kind="topk", tau=0.5)
    with pytest.raises(ValueError, match="^feature_map='elu' does not apply to compensation 'reshape'"):
        CompensationConfig(kind="reshape", feature_map="elu")


def test_presets_are_read_only_objects_of_typed_parts():
    assert isinstance(dit_accel.PRESETS, types.MappingProxyType)
    with pytest.raises(TypeError):
        dit_accel.PRESETS["mine"] = dit_accel.PRESETS["sla"]  # type: ignore[index]
    for name, preset in dit_accel.PRESETS.items():
        assert isinstance(preset, Preset) and preset.name == name and preset.doc
        assert isinstance(preset.pattern, PatternConfig) and isinstance(preset.schedule, ScheduleConfig)
        with pytest.raises(dataclasses.FrozenInstanceError):
            preset.pattern.sparsity = 0.5  # type: ignore[misc]
        assert resolve_config(name).pattern == preset.pattern  # the preset is exactly what a method resolves to
    assert tuple(dit_accel.PRESETS) == tuple(dit_accel.METHODS)


def test_comparing_a_part_with_a_kind_name_fails_loudly():
    cfg = resolve_config("vmoba")
    assert cfg.pattern.kind == "vmoba"
    with pytest.raises(TypeError, match=r"compare its \.kind"):
        _ = cfg.pattern == "vmoba"  # old flat code would silently read False here


def test_the_one_line_stays_one_line():
    pipe, _ = tiny_pipeline("wan")
    with dit_accel.accelerate(pipe, "rettention", sparsity=0.9) as handle:
        assert handle.config.pattern.sparsity == 0.9 and handle.config.compensation.kind == "reshape"
    nested = handle.config.to_dict(nested=True)
    rebuilt = AccelConfig(
        method=nested["method"],
        pattern=PatternConfig(**nested["pattern"]),
        compensation=CompensationConfig(**nested["compensation"]),
        schedule=ScheduleConfig(**nested["schedule"]),
    )
    assert rebuilt == handle.config
