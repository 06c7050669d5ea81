import pytest

import dit_accel
from dit_accel.config import AccelConfig, parse_layers, resolve_config


def test_methods_listed_and_default_valid():
    assert "dense" in dit_accel.METHODS and "blocktopk" in dit_accel.METHODS
    assert dit_accel.DEFAULT_METHOD in dit_accel.METHODS
    assert resolve_config().method == dit_accel.DEFAULT_METHOD


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"method": "nope"}, ["method", "nope", "blocktopk"]),
        ({"sparsity": 1.0}, ["sparsity", "1.0", "[0, 1)"]),
        ({"sparsity": -0.1}, ["sparsity", "-0.1"]),
        ({"block_m": 32}, ["block_m", "32", "(64, 128)"]),
        ({"block_n": 96}, ["block_n", "96"]),
        ({"dense_steps": -1}, ["dense_steps", "-1"]),
        ({"dense_steps": 1.5}, ["dense_steps", "1.5"]),
        ({"min_tokens": -5}, ["min_tokens", "-5"]),
        ({"dense_layers": "0,x"}, ["dense_layers", "x"]),
        ({"num_steps": -2}, ["num_steps", "-2"]),
    ],
)
def test_bad_values_name_parameter_value_and_allowed(kwargs, words):
    method = kwargs.pop("method", "blocktopk")
    with pytest.raises(ValueError) as err:
        resolve_config(method, **kwargs)
    for word in words:
        assert word in str(err.value)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="'sparsty'.*allowed"):
        resolve_config("blocktopk", sparsty=0.5)


def test_parse_layers_ranges_and_lists():
    assert parse_layers("0,1,28-29") == (0, 1, 28, 29)
    assert parse_layers(" 3 , 1-2 ") == (1, 2, 3)
    assert parse_layers([2, 0, 2]) == (0, 2)
    assert parse_layers(None) == ()
    with pytest.raises(ValueError, match="descending"):
        parse_layers("5-3")


def test_dense_steps_int_and_fraction():
    assert AccelConfig(dense_steps=3).dense_step_count(10) == 3
    assert AccelConfig(dense_steps=0.3).dense_step_count(10) == 3
    assert AccelConfig(dense_steps=1.0).dense_step_count(7) == 7


def test_options_override_preset_and_config_round_trip():
    cfg = resolve_config("blocktopk", sparsity=0.9, dense_layers="0-1")
    assert cfg.sparsity == 0.9 and cfg.dense_layers == (0, 1)
    again = resolve_config(config=cfg, min_tokens=10)
    assert again.sparsity == 0.9 and again.min_tokens == 10
    assert AccelConfig(**{k: v for k, v in cfg.to_dict().items()}) == cfg


@pytest.mark.parametrize(
    ("fraction", "steps", "count"),
    [
        (0.1, 4, 1),  # rounds to 0: a fraction asks for a warm-up, so at least one dense step
        (0.1, 8, 1),
        (0.25, 4, 1),
        (0.3, 8, 2),
        (0.9, 4, 3),  # rounds to 4: at least one step stays sparse
        (0.5, 2, 1),
        (0.1, 1, 1),  # a single step stays dense
        (0.1, 50, 5),  # long schedules keep the rounded count
        (1.0, 4, 4),
        (0.0, 4, 0),
    ],
)
def test_dense_steps_fraction_on_few_step_schedules(fraction, steps, count):
    assert AccelConfig(dense_steps=fraction).dense_step_count(steps) == count


def test_all_steps_dense_names_the_int_count_only():
    from dit_accel.schedule import all_steps_dense

    message = all_steps_dense(AccelConfig(dense_steps=15), 4)
    assert message is not None and "dense_steps=15" in message and "all 4 steps" in message
    assert all_steps_dense(AccelConfig(dense_steps=3), 4) is None
    assert all_steps_dense(AccelConfig(dense_steps=1.0), 4) is None  # a fraction of 1.0 asks for it
    assert all_steps_dense(AccelConfig(dense_steps=15), None) is None
