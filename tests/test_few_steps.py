"""Few-step schedules (4-8 steps, as distilled LoRAs such as Wan lightx2v or CausVid run) on a real pipeline:
every preset with a dense warm-up keeps one, still runs sparse, and refreshes where its statistics need it."""

import pytest
import torch

import dit_accel
from dit_accel.testing import tiny_pipeline

LETTER = {"dense": "D", "refresh": "R", "sparse": "S"}


def step_kinds(method, steps, **options):
    pipe, kwargs = tiny_pipeline("wan")
    by_step = {}
    with dit_accel.accelerate(pipe, method, min_tokens=64, **options) as handle:
        next(iter(handle.accelerators.values())).observers.append(
            lambda event: by_step.setdefault(event.step, set()).add(LETTER[event.kind])
        )
        pipe(**dict(kwargs, num_inference_steps=steps), generator=torch.Generator().manual_seed(0))
    return " ".join("".join(sorted(by_step[s])) for s in range(steps))


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("rettention", "D R S S"),  # 10 % of 4 rounds to 0: one dense step; the first sparse step refreshes
        ("sla", "D S S S"),  # no statistics: sparse right after the warm-up
        ("rettention-paper", "D R S S"),  # 30 % of 4
    ],
)
def test_presets_at_four_steps(method, expected):
    assert step_kinds(method, 4) == expected


def test_a_dense_count_covering_every_step_warns_once():
    with pytest.warns(RuntimeWarning, match=r"dense_steps=4 keeps all 3 steps") as caught:
        assert step_kinds("blocktopk", 3, dense_steps=4) == "D D D"
    assert len([w for w in caught if "keeps all" in str(w.message)]) == 1
