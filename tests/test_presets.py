"""The presets keep the effective options they had before they became typed objects.

``tests/data/presets_before_parts.json`` was dumped from ``resolve_config(name).to_dict()`` of every preset while
the presets were still flat dicts merged at import time; each preset must still resolve to exactly those values
(types included: ``dense_steps`` 0.1 is a fraction, 0 a count).
"""

import json
from pathlib import Path

import pytest

import dit_accel
from dit_accel.config import resolve_config

BEFORE = json.loads((Path(__file__).parent / "data" / "presets_before_parts.json").read_text())
#: fields added since the fixture, at their defaults in every preset unless CHANGED says otherwise
ADDED = {
    "self_block": True,
    "keep_rounding": "half_up",
    "vmoba_chunk_size": None,
    "vmoba_gate": "block",
    "vmoba_scope": "query_head",
    "kernel_backend": "auto",
    "tile_permutation": "per_call",
    "residual_update": "none",
}
#: deliberate changes since the fixture, each with its reason
CHANGED = {
    # follow SLA's official selection (issue 17): no forced diagonal, int(topk * K), no negligible class
    "sla-paper": {"self_block": False, "keep_rounding": "floor", "negligible": 0.0},
    # follow VMoBA's official selection (issue 17): every query token gated against each chunk's mean key
    "vmoba-paper": {"vmoba_gate": "token"},
    # the cached residual moves with the mean value between refreshes (issue 17 part 2: a stale R biased the toy)
    "rettention": {"residual_update": "mean"},
    "vmoba": {"residual_update": "mean"},
}


def _jsonable(value):
    return json.loads(json.dumps(value))


def test_every_preset_is_in_the_fixture():
    assert set(dit_accel.METHODS) == set(BEFORE)


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_preset_effective_options_unchanged(name):
    now = _jsonable(resolve_config(name).to_dict())
    expected = {**BEFORE[name], **ADDED, **CHANGED.get(name, {})}
    assert now == expected
    for key, value in expected.items():
        assert type(now[key]) is type(value), key  # 0.1 (a fraction) must not become 0 (a count) or vice versa
